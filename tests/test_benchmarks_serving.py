"""The serving compression benchmark runs end to end on a tiny MovieLens-format folder with
the tiny encoder and prints well-formed rows. No timing is asserted here."""

import numpy as np
import pytest
from test_benchmarks_speed import fake_movielens, load


def test_serving_compression_quick(tiny_encoder_dir, tmp_path, capsys):
    data = fake_movielens(tmp_path / "ml")
    result = load("serving_compression").main(["--quick", "--encoder", str(tiny_encoder_dir), "--data", str(data),
                                               "--cache", str(tmp_path / "cache"),
                                               "--variants", "fp32,int8,pruned 50%,1 layers + int8"])
    out = capsys.readouterr().out
    assert "| variant |" in out and "targets: int8 vs fp32" in out and "int8 top-10 overlap >= 0.98" in out
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == ["fp32", "int8", "pruned 50%"]  # "1 layers" is not a variant of the list
    assert rows["fp32"]["overlap@10"] == 1.0
    assert 0 <= result["item_matrix_int8"]["overlap@10"] <= 1 and "int8 item matrix only" in out
    assert rows["int8"]["memory MB"] < rows["fp32"]["memory MB"]
    assert rows["pruned 50%"]["zip MB"] < rows["fp32"]["zip MB"]
    for row in rows.values():
        assert np.isfinite(row["rmse"]) and row["enc ms/text b1"] > 0 and row["top10 ms"] > 0
        assert 0 <= row["overlap@10"] <= 1


@pytest.mark.slow
def test_serving_load_quick_drives_both_servers_and_moves_the_alias(tiny_encoder_dir, tmp_path, capsys):
    """Both servers really start and answer every request of both kinds, and the alias
    moves under load without an error or a foreign version."""
    result = load("serving_load").main(["--quick", "--encoder", str(tiny_encoder_dir),
                                        "--data", str(fake_movielens(tmp_path / "ml")), "--cache", str(tmp_path / "cache"),
                                        "--seconds", "1", "--concurrency", "1,4", "--swap-seconds", "3"])
    out = capsys.readouterr().out
    assert "| requests | concurrency | server |" in out and "alias moves under load" in out
    cells = {(r["requests"], r["concurrency"], r["server"]): r for r in result["rows"]}
    assert len(cells) == 8
    assert all(r["req/s"] > 0 and r["errors"] == 0 for r in cells.values()), cells
    assert result["phase2"]["errors"] == 0 and result["phase2"]["responses of a version never champion"] == 0
    assert len(result["worker_rss_mib"]) == 2
