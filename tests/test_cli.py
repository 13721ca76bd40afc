"""The command line: user mistakes give one message and exit code 2, no traceback."""

import os
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


def test_monitor_history_and_compare_on_an_empty_home(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    previous = mlflow.get_tracking_uri()
    try:
        home = str(tmp_path / "home")
        result = runner.invoke(app, ["monitor", "--home", home])
        assert result.exit_code == 0 and "no nights recorded" in result.output
        result = runner.invoke(app, ["history", "--home", home])
        assert result.exit_code == 0 and "has had no champion yet" in result.output
        result = runner.invoke(app, ["versions", "--home", home, "--compare", "1", "2"])
        assert result.exit_code == 2 and "no version '1'" in result.output
    finally:
        mlflow.set_tracking_uri(previous)


def test_alerts_install_needs_a_prefect_server(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    result = runner.invoke(app, ["alerts", "install", "--webhook", "http://127.0.0.1:9/hook"])
    assert result.exit_code == 2 and "PREFECT_API_URL is not set" in result.output


@pytest.mark.parametrize("value, needle", [("gate.rule=median", "gate.rule"), ('gate.margin={"rmse":"x"}', "margin"),
                                           ('gate.margin={"future.rmse":"1%"}', "unknown part 'future'"),
                                           ("monitor.hold_columns=[\"age\"]", "monitor.hold_columns")])
def test_bad_gate_and_monitor_parameters(value, needle, tmp_path):
    result = runner.invoke(app, ["nightly", "--landing", str(tmp_path), "--set", value])
    assert result.exit_code == 2 and needle in result.output
    # The demo checks its --set the same way, before it writes anything.
    result = runner.invoke(app, ["demo", "--workdir", str(tmp_path / "demo"), "--nights", "0", "--set", value])
    assert result.exit_code == 2 and needle in result.output, result.output
    assert not (tmp_path / "demo").exists()


def test_unreachable_landing_uri_is_one_line_not_retried_no_flow_run(tmp_path):
    # Connection refused on 127.0.0.1; the user:password must not be echoed either.
    uri = "s3://user:secret@bucket/landing?endpoint_override=127.0.0.1:9&scheme=http"
    env = dict(os.environ, AWS_EC2_METADATA_DISABLED="true", AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y")
    proc = subprocess.run([sys.executable, "-m", "app.cli", "nightly", "--landing", uri, "--home", str(tmp_path / "h")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: landing='s3://bucket/landing': cannot open"), lines
    assert "secret" not in proc.stderr + proc.stdout and "flow run" not in proc.stderr + proc.stdout


def test_a_held_lock_is_one_line_for_nightly_and_rollback(tmp_path):
    from llmrec.config import Home
    from test_lock import hold_lock

    landing = tmp_path / "landing"
    (landing / "events").mkdir(parents=True)
    home = Home(tmp_path / "home")
    holder = hold_lock(home, 60)
    try:
        night = runner.invoke(app, ["nightly", "--landing", str(landing), "--home", str(home.root), "--wait", "0.5"])
        back = runner.invoke(app, ["rollback", "--home", str(home.root)])
    finally:
        holder.kill()
        holder.wait()
    for result in (night, back):
        assert result.exit_code == 2, result.output
        assert "another nightly run or rollback" in result.output and "Traceback" not in result.output
        assert "flow run" not in result.output
    assert "after waiting 0.5 s" in night.output


def test_demo_refuses_to_delete_a_folder_it_did_not_make(tmp_path):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "thesis.txt").write_text("keep me")
    result = runner.invoke(app, ["demo", "--workdir", str(precious), "--nights", "0"])
    assert result.exit_code == 2 and "was not made by the demo" in result.output
    assert (precious / "thesis.txt").read_text() == "keep me"
