"""benchmarks/quality.py runs end to end (its --quick mode: six weekly steps and fold u1; then
--smoke, to check a rerun replaces its section) on the real MovieLens-100k and writes well-formed output: the tables, finite numbers,
the plots and its section of the benchmarks page. No assertion on the targets."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_quality_benchmark_quick(movielens, tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Training throughput\n\nkept as is\n")
    img = tmp_path / "img"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/quality.py"), "--quick", "--data", str(movielens),
         "--docs", str(docs), "--img", str(img)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    out = run.stdout
    for heading in ("## Recommendation quality", "### Continual protocol", "### The method's metrics",
                    "### Forgetting on the anchor set",
                    "### Cold start", "### Canonical u1..u5 splits", "### Targets"):
        assert heading in out
    for method in ("llmrec (replay)", "llmrec (no replay)", "llmrec (retrain)", "biased MF", "global mean",
                   "item mean", "popularity", "item-kNN", "EASE", "BPR", "implicit ALS", "GLocal-K"):
        assert f"| {method}" in out or f"| **{method}" in out

    # Every number in the continual table (the ranking-only baselines have no rating metrics) is finite.
    rank_only = ("| popularity", "| item-kNN", "| EASE", "| BPR", "| implicit ALS")
    table = out.split("### Continual protocol")[1].split("###")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert len(rows) == 11
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")][1:5]
        values = [float(c) for c in cells if c]
        assert len(values) == (2 if row.startswith(rank_only) else 4)
        assert all(math.isfinite(v) for v in values)
    # The method's metrics: ten columns, all in [0, 1]; the rating-based five empty for ranking-only rows.
    table = out.split("### The method's metrics")[1].split("###")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert len(rows) == 11
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        assert len(cells) == 10
        values = [float(c) for c in cells if c]
        assert len(values) == (5 if row.startswith(rank_only) else 10)
        assert all(0.0 <= v <= 1.0 for v in values)

    result = json.loads((img / "quality_results.json").read_text())
    steps = result["continual"]["per_step"]["llmrec (replay)"]
    assert len(steps) == 6 and all(math.isfinite(s["rmse"]) and 0 < s["rmse"] < 3 for s in steps)
    assert all(0 <= s["recall_at_10"] <= 1 for s in steps)
    for name in ("EASE", "item-kNN", "BPR", "implicit ALS", "popularity"):
        assert all(0 <= s["recall_at_10"] <= 1 and 0 < s["coverage_at_10"] <= 1
                   for s in result["continual"]["per_step"][name])
    for name in ("llmrec (replay)", "llmrec (no replay)", "biased MF"):
        forgetting = result["continual"]["forgetting"][name]
        assert forgetting[0] == 0.0 and all(math.isfinite(x) for x in forgetting)
    fold = result["folds"]["llmrec"][0]
    assert math.isfinite(fold["rmse"]) and math.isfinite(fold["mae"])

    for png in ("quality_steps.png", "quality_forgetting.png"):
        assert (img / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = docs.read_text()
    assert "## Training throughput\n\nkept as is" in page
    assert page.count("## Recommendation quality") == 1
    assert re.search(r"Measured \d{4}-\d\d-\d\d", page)
    assert "benchmarks/quality.py --quick" in page

    # A second run replaces the section rather than appending another one.
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/quality.py"), "--smoke", "--data", str(movielens), "--folds", "0", "--steps", "1",
         "--variants", "replay,no-replay", "--docs", str(docs), "--img", str(img)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    page = docs.read_text()
    assert page.count("## Recommendation quality") == 1 and "kept as is" in page
