"""benchmarks/scale.py --quick runs one real night on histories of 100k and 300k events
and prints every stage's time and peak RSS. No timing is asserted here (docs/benchmarks.md
holds the figures)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCALE = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


@pytest.mark.slow
def test_scale_benchmark_quick_times_every_stage_of_a_night(tiny_encoder, tmp_path):
    encoder_dir = tmp_path / "tiny-bert"
    tiny_encoder.model.save_pretrained(encoder_dir)
    tiny_encoder.tokenizer.save_pretrained(encoder_dir)
    out = tmp_path / "scale.json"
    run = subprocess.run(
        [sys.executable, str(SCALE), "--quick", "--encoder", str(encoder_dir), "--work", str(tmp_path),
         "--cache", str(tmp_path / "cache"), "--set", "model.dim=16", "--set", "training.epochs=1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=1500, env=os.environ | {"PREFECT_HOME": str(tmp_path / "prefect")})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [r["history"] for r in results] == [100_000, 300_000]
    for result in results:
        assert set(result["stages"]) == {"ingest", "validate", "load", "drift", "window", "fine-tune", "evaluate",
                                         "register"}
        assert all(stage["seconds"] > 0 and stage["peak_rss"] > 0 for stage in result["stages"].values())
        assert result["landing_to_champion_s"] >= sum(stage["seconds"] for stage in result["stages"].values())
        # Tonight's 10k rows, not the history, are the window's new rows; replay is drawn from history.
        assert result["window"]["new_rows"] <= 10_000 and result["window"]["replay_rows"] > 0
    assert "| history |" in run.stdout and "(target <= 2x)" in run.stdout
