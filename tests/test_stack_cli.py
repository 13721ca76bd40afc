"""docker/stack.py's mistakes the user can fix: one line, exit code 2, nothing started."""

import subprocess
import sys
from pathlib import Path

STACK = Path(__file__).resolve().parents[1] / "docker" / "stack.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(STACK), *args], capture_output=True, text=True, timeout=60)


def test_up_refuses_a_folder_where_a_stack_runs(tmp_path):
    (tmp_path / "stack.json").write_text("{}")
    result = run("up", "--dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'stack.json'} exists: a stack is running there; stop it first (make stack-stop)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stack.json"]


def test_down_without_a_stack_says_so(tmp_path):
    result = run("down", "--dir", str(tmp_path))
    assert result.returncode == 0 and result.stdout.strip() == f"no stack running in {tmp_path}"
