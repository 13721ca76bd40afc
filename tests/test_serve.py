"""`llmrec serve` against a real Prefect server on 127.0.0.1: a run of the manual
deployment, started as the UI's form would start it, executes and leaves its report."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from llmrec.data import copy_drop, synthetic_drops

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"server not healthy after {seconds}s: {log.read_text()[-2000:]}")


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def test_served_manual_deployment_runs_from_a_form_submission(tmp_path, tiny_encoder):
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               PREFECT_SERVER_ANALYTICS_ENABLED="false",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    encoder_dir = tmp_path / "tiny-bert"
    tiny_encoder.model.save_pretrained(encoder_dir)
    tiny_encoder.tokenizer.save_pretrained(encoder_dir)
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
        script = f"""
import asyncio, json
from prefect.deployments import run_deployment
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
params = {{"config": {{"landing": {str(landing)!r}, "home": {str(tmp_path / "home")!r},
          "model": {{"encoder": {str(encoder_dir)!r}, "dim": 8}}, "training": {{"epochs": 2}}}}}}
from prefect.client.schemas.filters import ArtifactFilterFlowRunId
async def registered():
    # The serve process registers its deployments a few seconds after it starts.
    async with get_client() as client:
        for attempt in range(240):
            try:
                return await client.read_deployment_by_name("nightly-retrain/manual")
            except Exception:
                await asyncio.sleep(0.5)
asyncio.run(registered())
run = run_deployment("nightly-retrain/manual", parameters=params, timeout=300)
async def read():
    async with get_client() as client:
        report = await client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["nightly-report"]), flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        nightly = await client.read_deployment_by_name("nightly-retrain/nightly")
        return report, nightly
report, nightly = asyncio.run(read())
print(json.dumps({{"state": run.state.type.value, "report": report[0].data if report else "",
                  "timezone": nightly.schedules[0].schedule.timezone}}))
"""
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:] + serve_log.read_text()[-3000:]
        import json

        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["state"] == "COMPLETED", serve_log.read_text()[-3000:]
        assert "## Decision" in result["report"] and "version **1**" in result["report"]
        assert result["timezone"] == "Europe/Berlin"
    finally:
        if served is not None:
            stop(served)
        stop(server)
