"""The speed benchmarks (issue 3) run end to end on a tiny MovieLens-format folder with
the tiny encoder, and print well-formed results. No timing is asserted here."""

import importlib.util
import sys
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
GENRES = ["unknown", "Action", "Comedy", "Drama"]


def load(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_movielens(folder: Path, n_users=30, n_items=40, n=1500, days=34, seed=0) -> Path:
    """A few weeks of ratings in the raw ML-100k file formats (u.data, u.item, u.genre, u.user)."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    start = 880_000_000
    times = np.sort(rng.integers(start, start + days * 86400, n))
    users = rng.integers(1, n_users + 1, n)
    items = rng.integers(1, n_items + 1, n)
    ratings = np.where(users % 3 == items % 3, 5, rng.integers(1, 4, n))
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in zip(users, items, ratings, times)))
    (folder / "u.genre").write_text("".join(f"{g}|{k}\n" for k, g in enumerate(GENRES)))
    (folder / "u.item").write_text("".join(
        f"{i}|Film {i} (1995)|01-Jan-1995||http://x|" + "|".join("1" if k == i % 4 else "0" for k in range(4)) + "\n"
        for i in range(1, n_items + 1)))
    (folder / "u.user").write_text("".join(f"{u}|{20 + u}|{'MF'[u % 2]}|student|{10000 + u}\n" for u in range(1, n_users + 1)))
    return folder


def test_cpu_benchmarks_run_quick_and_print_results(tiny_encoder_dir, tmp_path, capsys):
    data = fake_movielens(tmp_path / "ml")
    common = ["--quick", "--encoder", str(tiny_encoder_dir), "--data", str(data), "--cache", str(tmp_path / "cache")]

    train = load("train_throughput").main(common + ["--ratings", "64", "--batch-size", "32", "--micro-batch", "16",
                                                    "--held-out", "40", "--epoch-rows", "300",
                                                    "--peak-n", "512", "--layers", "0,1,1:lora1"])
    out = capsys.readouterr().out
    assert "peak:" in out and "| trainable_layers |" in out and "target (tl=0)" in out
    assert [row["trainable_layers"] for row in train["same_count"]] == ["0", "1", "1:lora1"]
    for row in train["same_count"]:
        assert row["naive r/s"] > 0 and row["llmrec step r/s"] > 0 and row["ratio (step)"] > 0
        assert np.isfinite(row["naive RMSE"]) and np.isfinite(row["llmrec RMSE"])
        assert row["llmrec peak RSS GiB"] > 0
    assert [row["rows"] for row in train["epoch"]] == [300, 300, 300]
    # tl=0's training loop runs no transformer layer, only the heads' small matmuls.
    tl0_loop, tl1_loop = (row["FLOP/s (train loop)"] * row["train loop s"] for row in train["epoch"][:2])
    assert 0 < tl0_loop < tl1_loop
    assert train["epoch"][1]["FLOP/s (train loop)"] > 0 and 0 < train["epoch"][1]["of peak (fit)"]
    # LoRA: same layers run, but frozen weights need no weight gradients. Rank 1: next to
    # the tiny encoder's 32-wide maps, rank-8 adapters would cost more than that saves.
    full, lora = train["epoch"][1], train["epoch"][2]
    assert 0 < lora["TFLOP (cache + train)"] < full["TFLOP (cache + train)"]
    assert train["peak_flops"] > 0

    score = load("score_throughput").main(common + ["--repeats", "1"])
    out = capsys.readouterr().out
    assert "scores/s" in out and "target >= 1,000,000" in out
    assert score["rows"][0]["users"] == 30 and score["rows"][0]["items"] == 40
    assert all(row["scores/s"] > 0 for row in score["rows"])

    incremental = load("incremental_vs_full").main(common + ["--days", "29,31", "--epochs", "1",
                                                             "--min-eval-rows", "20"])
    out = capsys.readouterr().out
    assert "| day |" in out and "peak RSS of a nightly update" in out
    assert [row["day"] for row in incremental["rows"]] == [29, 31]
    for row in incremental["rows"]:
        assert row["incr. s"] > 0 and row["full s"] > 0
        assert row["incr. train rows"] < row["full train rows"] <= row["history rows"]
        assert np.isfinite(row["incr. RMSE"]) and np.isfinite(row["full RMSE"])
    assert incremental["process_peak_rss"] > 0
