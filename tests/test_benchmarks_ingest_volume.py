"""benchmarks/ingest_volume.py --quick ingests, validates and curates a 200k-row landing file
in batches and in one batch and prints rows/s and peak RSS. No timing is asserted here
(docs/benchmarks.md holds the figures)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "ingest_volume.py"


@pytest.mark.slow
def test_ingest_volume_quick_curates_the_file_whole_in_batches_and_in_one(tmp_path):
    out = tmp_path / "ingest.json"
    run = subprocess.run([sys.executable, str(BENCHMARK), "--quick", "--work", str(tmp_path), "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [(r["rows"], r["batch_rows"]) for r in results] == [(200_000, 50_000), (200_000, 200_000)]
    assert all(r["rows_per_s"] > 0 and r["peak_rss"] > 0 for r in results)
    assert "| events rows | rows per batch |" in run.stdout and "rows/s" in run.stdout
