"""kill -9 of a real `llmrec nightly` process group at each stage of a night, then a rerun:
the end state must be that of an uninterrupted night (no duplicate and no lost rows, the
manifest matching the curated data, every version decided, no run left RUNNING, the
champion loadable, every curated row judged by a decided version)."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from llmrec import ingest, registry
from llmrec.config import Home
from llmrec.data import copy_drop, list_drops, synthetic_drops

pytestmark = pytest.mark.slow

KEY = ["user_id", "item_id", "timestamp"]
RUN_SECONDS = 600


@pytest.fixture(scope="module")
def api_url():
    """One Prefect server for every child process (each would otherwise start its own)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_encoder_dir):
    root = tmp_path_factory.mktemp("crash")
    synthetic_drops(root / "drops", users=60, items=80, days=7, seed=5)
    return root, tiny_encoder_dir


def nightly(root, encoder_dir, api_url, log) -> subprocess.Popen:
    env = dict(os.environ, PREFECT_API_URL=api_url, HF_HUB_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    command = [sys.executable, "-m", "app.cli", "nightly", "--landing", str(root / "landing"), "--home",
               str(root / "home"), "--set", f"model.encoder={encoder_dir}", "--set", "model.dim=8",
               "--set", "model.max_length=32", "--set", "training.epochs=4", "--set", "training.l2=0.05"]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def count_in_db(home: Home, query: str) -> int:
    try:
        with sqlite3.connect(f"file:{home.root / 'mlflow.db'}?mode=ro", uri=True, timeout=1) as db:
            return db.execute(query).fetchone()[0]
    except sqlite3.Error:
        return 0


def versions_in_db(home: Home) -> int:
    return count_in_db(home, "select count(*) from model_versions")


def kill_when(process, log_path, home: Home, stage: str, versions_before: int) -> str:
    """SIGKILL the whole process group once `stage` is reached: the progress line before it
    appears, the night's MLflow run is open (log-model: parameters, metrics and the model
    are being logged), or a new version row is in the registry (after-version)."""
    marks = {"ingest": " recover: ", "curate": " ingest: ", "fine-tune": " window: "}
    deadline = time.monotonic() + RUN_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        if stage == "after-version":
            reached = versions_in_db(home) > versions_before
        elif stage == "log-model":
            reached = count_in_db(home, "select count(*) from runs where status = 'RUNNING'") > 0
        else:
            reached = marks[stage] in log_path.read_text(errors="replace")
        if reached:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return "killed"
        time.sleep(0.05)
    process.wait()
    return f"finished first (rc {process.returncode})"


def check_curated(root) -> pd.DataFrame:
    """What must hold after any kill: no duplicate key, the manifest matching the curated
    data; returns the manifest's curated events entries."""
    home = Home(root / "home")
    events = ingest.read_events(home)
    assert not events.duplicated(KEY).any()
    manifest = ingest.read_manifest(home)
    assert not manifest["file"].duplicated().any()
    curated = manifest[(manifest["kind"] == "events") & (manifest["status"] == "curated")]
    assert int(curated["rows"].sum()) == len(events)
    assert set(events["_ingest_seq"]) <= set(curated["ingest_seq"])
    return curated


def check_end_state(root, encoder) -> None:
    home = Home(root / "home")
    curated = check_curated(root)
    events = ingest.read_events(home)
    landing_rows = sum(len(pd.read_parquet(p)) for p in (root / "landing" / "events").glob("*.parquet"))
    assert len(events) == landing_rows
    assert set(ingest.read_manifest(home)["file"]) == {f"{k}/{p.name}" for k in ("events", "items", "users")
                                                       for p in (root / "landing" / k).glob("*.parquet")}
    registry.configure(home, "llmrec")
    for mv in MlflowClient().search_model_versions("name = 'llmrec'"):
        assert mv.tags.get("decision") in ("promoted", "rejected", "abandoned"), mv.version
    assert not mlflow.search_runs(filter_string="attributes.status = 'RUNNING'", output_format="list")
    assert registry.decided_watermark("llmrec") == int(curated["ingest_seq"].max())
    champion = registry.load_champion(home, "llmrec", encoder)
    model = mlflow.pyfunc.load_model(f"models:/llmrec@{registry.CHAMPION}")
    assert champion.version and len(model.predict(events[["user_id", "item_id"]].head(3))) == 3


def test_kill_9_at_every_stage_then_rerun(world, api_url):
    """One night's landing; the night is killed at each stage in turn, every start being
    the rerun of the one killed before it; the last rerun runs to the end. The first night
    establishes a champion, so the killed night resumes from it."""
    from llmrec.encoder import load_encoder

    root, encoder_dir = world
    drops, home = root / "drops", Home(root / "home")
    tags = list_drops(drops)
    for tag in tags[:3]:
        copy_drop(drops, tag, root / "landing")
    with open(root / "first.log", "w") as log:
        assert nightly(root, encoder_dir, api_url, log).wait(RUN_SECONDS) == 0, (root / "first.log").read_text()[-3000:]
    copy_drop(drops, tags[3], root / "landing")
    outcomes = {}
    for stage in ["ingest", "curate", "fine-tune", "log-model", "after-version"]:
        log_path = root / f"kill-{stage}.log"
        with open(log_path, "w") as log:
            outcomes[stage] = kill_when(nightly(root, encoder_dir, api_url, log), log_path, home, stage,
                                        versions_in_db(home))
        check_curated(root)
    with open(root / "rerun.log", "w") as log:
        assert nightly(root, encoder_dir, api_url, log).wait(RUN_SECONDS) == 0, (root / "rerun.log").read_text()[-3000:]
    rerun = (root / "rerun.log").read_text()
    assert outcomes["log-model"] == outcomes["after-version"] == "killed", outcomes
    check_end_state(root, load_encoder(str(encoder_dir)))
    history = registry.version_history("llmrec")
    # The last kill aims just after the version row appears, but the signal can arrive later:
    # after the alias moved (the rerun completes that decision), or after the decision tag
    # too (the killed night was whole; seen on a quiet machine: register takes milliseconds).
    # Either way the night's rows were judged and the rerun trains nothing. A version left
    # without a decision is settled deterministically in test_registry's interrupted nights.
    completed = "had no decision: now rejected" in rerun or "had no decision: now promoted" in rerun
    already_whole = "0 version(s) settled, 0 curated rows not yet judged" in rerun
    if completed or already_whole:
        assert '"status": "skipped"' in rerun and "0 curated rows not yet judged" in rerun, rerun[-3000:]
    else:
        assert '"status": "registered"' in rerun, rerun[-3000:]
        assert "abandoned" in set(history["decision"]), history
        assert "Abandoned" in history.loc[history["decision"] == "abandoned", "description"].iloc[0]
