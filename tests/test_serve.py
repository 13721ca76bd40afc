"""`llmrec serve` against a real Prefect server on 127.0.0.1: a run of the manual
deployment, started as the UI's form would start it, executes and leaves its report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from servers import free_port, stop, wait_healthy

from llmrec.data import copy_drop, synthetic_drops

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def test_served_manual_deployment_runs_from_a_form_submission(tmp_path, tiny_encoder_dir):
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               PREFECT_SERVER_ANALYTICS_ENABLED="false",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    drops, landing = tmp_path / "drops", tmp_path / "landing"
    for tag in synthetic_drops(drops, users=40, items=50, days=2, seed=5):
        copy_drop(drops, tag, landing)
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    server = subprocess.Popen([BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
                               "--analytics-off"], env=env, stdout=server_log.open("w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    served = None
    try:
        wait_healthy(f"http://127.0.0.1:{port}/api/health", server, server_log)
        served = subprocess.Popen([BIN / "llmrec", "serve", "--landing", str(landing), "--home", str(tmp_path / "home")],
                                  env=env, stdout=serve_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        params = {"config": {"landing": str(landing), "home": str(tmp_path / "home"),
                             "model": {"encoder": str(tiny_encoder_dir), "dim": 8}, "training": {"epochs": 2}}}
        proc = subprocess.run([sys.executable, Path(__file__).with_name("run_manual_deployment.py"), json.dumps(params)],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:] + serve_log.read_text()[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["state"] == "COMPLETED", serve_log.read_text()[-3000:]
        assert "## Decision" in result["report"] and "version **1**" in result["report"]
        assert result["nightly_timezone"] == "Europe/Berlin"
    finally:
        if served is not None:
            stop(served)
        stop(server)
