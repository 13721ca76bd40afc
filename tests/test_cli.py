"""The command line: user mistakes give one message and exit code 2, no traceback."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from app.cli import app

runner = CliRunner()


def test_missing_movielens_folder_names_the_path(tmp_path):
    result = runner.invoke(app, ["data", "movielens", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "nope" in result.output and "Traceback" not in result.output


def test_bad_period_names_the_parameter(tmp_path):
    result = runner.invoke(app, ["data", "movielens", "--source", str(tmp_path), "--out", str(tmp_path / "o"),
                                 "--period", "3H"])
    assert result.exit_code == 2


def test_synthetic_writes_drops(tmp_path):
    result = runner.invoke(app, ["data", "synthetic", "--out", str(tmp_path / "d"), "--days", "2", "--users", "10",
                                 "--items", "10"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "d" / "events").glob("*.parquet"))) == 2


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--set", "training.epochs=0"], "training.epochs"),
        (["--set", "training.loss=hinge"], "training.loss"),
        (["--set", "gate.metrics=[\"auc\"]"], "gate.metrics"),
        (["--set", "nonsense"], "KEY=VALUE"),
        (["--config", "/no/such.json"], "/no/such.json"),
    ],
)
def test_bad_nightly_parameters(args, needle, tmp_path):
    result = runner.invoke(app, ["nightly", "--landing", str(tmp_path)] + args)
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output


def test_missing_landing_exits_2_from_the_real_console_script(tmp_path):
    # Run as a user would; the flow fails on the landing folder before any training.
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "nightly", "--landing", str(tmp_path / "missing"),
         "--home", str(tmp_path / "home")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "missing" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr.split("error:")[-1]
