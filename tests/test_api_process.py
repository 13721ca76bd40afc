"""A real `llmrec api` with 2 worker processes on 127.0.0.1: both workers answer, metrics
are merged across them, and both follow an alias move."""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from servers import free_port, stop, wait_healthy
from serving_world import add_item, move_champion

from llmrec.keys import KeyStore, keys_file

pytestmark = pytest.mark.slow


def metric_lines(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name)]


def test_two_workers_serve_follow_the_alias_and_merge_metrics(served_home, tmp_path):
    world = served_home
    add_item(world.home, "i_new", "film new; genres: action")  # makes each worker load the encoder folder
    key = KeyStore(keys_file(world.home.root)).create("test", "read")
    headers = {"X-API-Key": key}
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PROMETHEUS_MULTIPROC_DIR")}
    log = tmp_path / "api.log"
    cli = Path(sys.executable).with_name("llmrec")
    process = subprocess.Popen([str(cli), "api", "--home", str(world.home.root), "--port", str(port), "--workers", "2",
                                "--poll", "1"], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        # Uvicorn accepts requests once the lifespan has run, which loads the champion.
        wait_healthy(base + "/healthz", process, log, seconds=180)
        assert httpx.get(base + "/readyz", headers=headers).json()["version"] == "1"
        assert httpx.get(base + "/healthz").json() == {"status": "ok"}
        assert httpx.get(base + "/readyz").status_code == 401
        with httpx.Client(base_url=base, headers=headers) as client:
            answers = [client.get("/v1/users/u0/recommendations", params={"k": 3}) for _ in range(30)]
            assert {(r.status_code, r.json()["version"]) for r in answers} == {(200, "1")}
            assert len({tuple(i["item_id"] for i in r.json()["items"]) for r in answers}) == 1
            scored = client.post("/v1/scores", json={"pairs": [{"user_id": "u0", "item_id": "i_new"}]}).json()
            # One series per worker process (multiprocess mode "all" labels them by pid), both on
            # v1; the second worker may still be loading (series at 0) when the first answers.
            deadline = time.time() + 90
            while True:
                served = metric_lines(client.get("/metrics").text, "llmrec_api_served_version")
                if len(served) == 2 and all(line.endswith(" 1.0") for line in served):
                    break
                assert time.time() < deadline, served
                time.sleep(0.5)
            cold = metric_lines(client.get("/metrics").text, "llmrec_api_cold_start_items")
            assert len(cold) == 2 and all(line.endswith(" 1.0") for line in cold), cold
            total = metric_lines(client.get("/metrics").text, 'llmrec_api_requests_total{method="GET",'
                                 'route="/v1/users/{user_id}/recommendations",status="200"}')
            assert total and float(total[0].rsplit(" ", 1)[1]) == 30.0
            assert scored["version"] == "1" and len(scored["scores"]) == 1

            move_champion("2")
            deadline = time.time() + 60
            versions = []
            while time.time() < deadline:
                response = client.get("/v1/users/u0/recommendations", params={"k": 3})
                assert response.status_code == 200
                versions.append(response.json()["version"])
                if versions[-6:] == ["2"] * 6:
                    break
                time.sleep(0.1)
            assert versions[-6:] == ["2"] * 6 and set(versions) <= {"1", "2"}, versions
            while True:  # both workers follow (each polls on its own)
                served = metric_lines(client.get("/metrics").text, "llmrec_api_served_version")
                if len(served) == 2 and all(line.endswith(" 2.0") for line in served):
                    break
                assert time.time() < deadline, served
                time.sleep(0.5)
    finally:
        stop(process)
    assert key not in log.read_text()
