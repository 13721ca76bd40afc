"""Alerts end to end: a real Prefect server and a webhook receiver on 127.0.0.1, the
automations from `llmrec alerts install`, and nights that fail, crash (the process killed),
are promoted, drift, are rejected and quarantine a file; each delivers exactly one
notification naming the night and the reason. Approval: resumed through the API, or
unanswered until gate.approval_timeout, which rejects."""

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from servers import free_port, stop, wait_healthy

from llmrec.config import NightlyConfig
from llmrec.data import copy_drop, synthetic_drops
from llmrec.errors import LlmrecError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """`prefect server start` on a free port in its own process group, stopped by group id."""
    home, port = tmp_path_factory.mktemp("prefect-home"), free_port()
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log_path = home / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host",
                                   "127.0.0.1", "--port", str(port), "--analytics-off"], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(f"{url}/health", server, log_path, seconds=240)
        yield url
    finally:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        # Flush the queues bound to this server while it is up: a queue left for a stopped
        # server blocks the next drain (another module's test harness, or the exit) for good.
        EventsWorker.drain_all(timeout=60)
        APILogWorker.drain_all(timeout=60)
        stop(server)


@pytest.fixture(scope="module")
def receiver():
    """An HTTP server on 127.0.0.1 keeping every POSTed body."""
    bodies: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            bodies.append(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", bodies
    server.shutdown()


def wait_for(bodies, predicate, count=1, timeout=90):
    """The bodies matching `predicate` once `count` arrived, after a grace period for extras."""
    deadline = time.time() + timeout
    while time.time() < deadline and sum(map(predicate, bodies)) < count:
        time.sleep(0.5)
    time.sleep(5)  # a duplicate would arrive within this
    return [b for b in bodies if predicate(b)]


def tiny_nights(tmp_path, encoder_dir, seed):
    """(config, drops, landing, tags): four synthetic daily drops and a nightly config on the
    tiny random encoder saved in `encoder_dir`."""
    drops, landing = tmp_path / "drops", tmp_path / "landing"
    tags = synthetic_drops(drops, users=40, items=60, days=4, seed=seed)
    config = NightlyConfig(landing=str(landing), home=str(tmp_path / "home"),
                           model={"encoder": str(encoder_dir), "dim": 8, "max_length": 16},
                           # As in test_flow_e2e: the tiny random encoder learns with a lighter penalty.
                           training={"epochs": 6, "lr": 0.01, "l2": 0.05},
                           gate={"resamples": 200, "small_sample": "ignore"})
    return config, drops, landing, tags


def night_awaiting_approval(prefect_api, tmp_path, encoder_dir, monkeypatch, timeout: int):
    """A first night promoted on the tiny nights, the next day's drop landed, and the config
    that asks for approval of the next night with `gate.approval_timeout` = `timeout`."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.nightly import nightly_retrain

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config, drops, landing, tags = tiny_nights(tmp_path, encoder_dir, seed=2)
    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        for tag in tags[:3]:
            copy_drop(drops, tag, landing)
        assert nightly_retrain(config=config)["decision"]["promote"]
    copy_drop(drops, tags[3], landing)
    return config.model_copy(update={"gate": config.gate.model_copy(update={"require_approval": True,
                                                                           "approval_timeout": timeout})})


def test_alerts_deliver_one_notification_per_night_event(prefect_api, receiver, tmp_path, tiny_encoder_dir,
                                                         monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from app.alerts import install
    from flows.nightly import nightly_retrain

    url, bodies = receiver
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        names = install(url)
        assert len(names) == 6 and install(url) == names  # re-installing replaces, never duplicates

        config, drops, landing, tags = tiny_nights(tmp_path, tiny_encoder_dir, seed=1)

        # A forced failure: the landing folder does not exist.
        with pytest.raises(LlmrecError, match="does not exist"):
            nightly_retrain(config=config)
        [failed] = wait_for(bodies, lambda b: b.startswith("llmrec.night.failed"))
        assert "does not exist" in failed and "| night nightly-" in failed and "| flow run " in failed

        # Night 1 trains the first model; a quarantined file rides along.
        for tag in tags[:3]:
            copy_drop(drops, tag, landing)
        (landing / "events" / "corrupt.parquet").write_bytes(b"not parquet")
        first = nightly_retrain(config=config)
        assert first["decision"]["promote"], first["decision"]["reason"]
        [quarantined] = wait_for(bodies, lambda b: b.startswith("llmrec.data.quarantined"))
        assert first["run"] in quarantined and "corrupt.parquet" in quarantined
        [promoted] = wait_for(bodies, lambda b: b.startswith("llmrec.night.promoted"))
        assert f"| night {first['run']} |" in promoted and "Promoted: first model" in promoted

        # Night 2: inverted ratings, rejected (the drift holds it).
        copy_drop(drops, tags[3], landing)
        events = landing / "events" / f"events-{tags[3]}.parquet"
        inverted = pd.read_parquet(events)
        inverted["rating"] = 6.0 - inverted["rating"]
        inverted.to_parquet(landing / "events" / f"inverted-{tags[3]}.parquet", index=False)
        events.unlink()
        second = nightly_retrain(config=config)
        assert not second["decision"]["promote"]
        [rejected] = wait_for(bodies, lambda b: b.startswith("llmrec.night.rejected"))
        assert second["run"] in rejected and "Rejected" in rejected
        [drift] = wait_for(bodies, lambda b: b.startswith("llmrec.data.drift"))
        assert f"| night {second['run']} |" in drift and "rating drifted" in drift

    assert sum(b.startswith("llmrec.night.failed") for b in bodies) == 1
    assert sum(b.startswith("llmrec.data.quarantined") for b in bodies) == 1
    assert sum(b.startswith("llmrec.night.rejected") for b in bodies) == 1
    assert sum(b.startswith("llmrec.night.promoted") for b in bodies) == 1
    assert sum(b.startswith("llmrec.data.drift") for b in bodies) == 1


def test_approval_pauses_the_night_and_a_resume_through_the_api_promotes(prefect_api, tmp_path, tiny_encoder_dir,
                                                                          monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.nightly import nightly_retrain
    from llmrec import registry
    from llmrec.config import Home

    config = night_awaiting_approval(prefect_api, tmp_path, tiny_encoder_dir, monkeypatch, timeout=600)
    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        result = {}

        def paused_night():
            # Settings contexts do not cross threads: the night must be told the server too.
            with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
                result.update(nightly_retrain(config=config))

        night = threading.Thread(target=paused_night, daemon=True)
        night.start()
        paused = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
        with get_client(sync_client=True) as client:
            for _ in range(600):
                runs = client.read_flow_runs(flow_run_filter=paused)
                if runs:
                    break
                assert night.is_alive(), result
                time.sleep(1)
        [run] = runs
        registry.configure(Home(config.home), config.experiment)
        waiting_version = registry.get_alias(config.registered_model, "challenger")
        assert waiting_version.description.startswith("Awaiting approval")
        resume_flow_run(run.id, run_input={"approve": True, "comment": "checked the segments", "reviewer": "alice"})
        night.join(timeout=600)
    assert result["decision"]["promote"] and result["version"] == waiting_version.version
    registry.configure(Home(config.home), config.experiment)
    champion = registry.get_alias(config.registered_model, "champion")
    assert champion.version == waiting_version.version
    assert champion.tags["approval"] == "approved" and champion.tags["approval_comment"] == "checked the segments"
    assert champion.description.startswith("Promoted: approved by alice (checked the segments)")
    changes = registry.champion_history(config.registered_model)
    assert list(changes["how"]) == ["promotion", "approval"]
    assert changes["why"].iloc[-1] == "approved by alice: checked the segments"


def test_approval_timeout_rejects_the_waiting_version(prefect_api, tmp_path, tiny_encoder_dir, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.nightly import nightly_retrain
    from llmrec import registry
    from llmrec.config import Home

    # Nobody answers: the shortest timeout the config accepts.
    config = night_awaiting_approval(prefect_api, tmp_path, tiny_encoder_dir, monkeypatch, timeout=10)
    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        started = time.monotonic()
        state = nightly_retrain(config=config, return_state=True)
        result = state.result()
        # The night rejected its own form in time: the run completes (an expired pause fails it).
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.state_type == StateType.COMPLETED, run.state
    assert time.monotonic() - started >= 10
    decision = result["decision"]
    assert not decision["promote"] and decision["alias"] == "challenger"
    assert decision["reason"].startswith("Rejected: timed out (no answer within gate.approval_timeout=10 s)")
    registry.configure(Home(config.home), config.experiment)
    waited = registry.get_alias(config.registered_model, "challenger")
    assert waited.version == result["version"]
    assert waited.tags["approval"] == "timed out" and waited.tags["decision"] == "rejected"
    assert registry.get_alias(config.registered_model, "champion").version != result["version"]
    assert list(registry.champion_history(config.registered_model)["how"]) == ["promotion"]


CRASHING_NIGHT = """
import sys
from flows.nightly import nightly_retrain
from llmrec.config import NightlyConfig
nightly_retrain(config=NightlyConfig.model_validate_json(sys.argv[1]))
"""


def test_a_killed_night_delivers_one_crash_notification(prefect_api, receiver, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from app.alerts import install
    from llmrec.config import Home
    from llmrec.lock import exclusive

    url, bodies = receiver
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    config = NightlyConfig(landing=str(tmp_path / "landing"), home=str(tmp_path / "home"), lock_wait=600)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"PREFECT_API_URL": prefect_api}
    running = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])))
    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        install(url)
        # The night waits for the home's lock, which this test holds: a run in progress to kill.
        with exclusive(Home(config.home)):
            night = subprocess.Popen([sys.executable, "-c", CRASHING_NIGHT, config.model_dump_json()], env=env,
                                     cwd=Path(__file__).resolve().parents[1], start_new_session=True)
            try:
                with get_client(sync_client=True) as client:
                    for _ in range(240):
                        runs = client.read_flow_runs(flow_run_filter=running)
                        if runs:
                            break
                        assert night.poll() is None, "the night ended before it could be killed"
                        time.sleep(0.5)
                [run] = runs
                night.send_signal(signal.SIGTERM)
                night.wait(timeout=60)
            finally:
                if night.poll() is None:
                    night.kill()
        crashed = wait_for(bodies, lambda b: b.startswith("prefect.flow-run.Crashed"))
    assert crashed == [f"prefect.flow-run.Crashed | flow run {run.name} | "
                       "Execution was aborted by a termination signal."]
    assert not [b for b in bodies if b.startswith("llmrec.night.failed") and run.name in b]
