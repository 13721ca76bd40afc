"""benchmarks/serving_history.py --quick reads a 200k-event history both ways (whole frame,
batch scan), checks they agree and prints time and peak RSS. No figure is asserted here
(docs/benchmarks.md holds them)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "serving_history.py"


@pytest.mark.slow
def test_serving_history_quick_reads_the_same_sets_both_ways():
    run = subprocess.run([sys.executable, str(BENCHMARK), "--quick"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("| frame |") or line.startswith("| scan |")]
    assert len(lines) == 2 and all("| 200,000 |" in line and "GiB" in line for line in lines), run.stdout
