"""benchmarks/finetune_quality.py runs the weekly protocol for a setting, writes its JSON,
and --merge builds the docs section from separate runs' JSON (how slow settings are run side
by side). tl0 over the bootstrap step only: seconds, not the fine-tuned settings' minutes."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_finetune_quality_runs_a_setting_and_merges_runs(movielens, tmp_path):
    part = tmp_path / "tl0.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/finetune_quality.py"), "--settings", "tl0", "--steps", "1",
                          "--data", str(movielens), "--json", str(part), "--no-write"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "step 1/1" in run.stderr  # progress, one line per weekly step
    result = json.loads(part.read_text())["result"]["tl0"]
    assert result["set"] == ["model.trainable_layers=0"] and result["steps"] == 1
    assert all(math.isfinite(result["means"][m]) for m in ("rmse", "recall_at_10", "ndcg_at_10"))
    assert 0 < result["means"]["rmse"] < 3 and result["train_s"] > 0

    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Serving\n\nkept as is\n")
    merge = subprocess.run([sys.executable, str(ROOT / "benchmarks/finetune_quality.py"), "--merge", str(part),
                            "--docs", str(docs), "--img", str(tmp_path / "img")],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert merge.returncode == 0, merge.stderr[-4000:]
    page = docs.read_text()
    assert page.count("## Fine-tuning the encoder: quality and time") == 1 and "kept as is" in page
    row = next(line for line in page.splitlines() if line.startswith("| model.trainable_layers=0 |"))
    assert f"{result['means']['rmse']:.4f}" in row
