"""The serving compression benchmark runs end to end on a tiny MovieLens-format folder with
the tiny encoder and prints well-formed rows. No timing is asserted here."""

import numpy as np
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
