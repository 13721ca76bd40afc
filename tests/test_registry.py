"""Registry life cycle on a throwaway sqlite store: log, gate, aliases, tags, rollback, history."""

import json
import os

import mlflow
import pandas as pd
import pytest

from llmrec.config import GateConfig, Home
from llmrec.errors import LlmrecError
from llmrec.gate import decide
from llmrec.registry import (
    apply_decision,
    champion_history,
    configure,
    describe_version,
    download_checkpoint,
    get_alias,
    log_model_version,
    rollback,
    version_history,
)

NAME = "llmrec"

# A models-from-code pyfunc standing in for the real llmrec one: it reads a number from the
# checkpoint folder and returns it for every input row.
MODEL_CODE = '''
import json
from pathlib import Path

import mlflow
import pandas as pd


class Constant(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        path = Path(context.artifacts["checkpoint"]) / "value.json"
        self.value = json.loads(path.read_text())["value"]

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return pd.DataFrame({"score": [float(self.value)] * len(model_input)})


mlflow.models.set_model(Constant())
'''

INPUT = pd.DataFrame({"user_id": ["u1", "u2"], "item_id": ["i1", "i2"]})


def metrics(rmse: float) -> dict:
    return {
        "held_out": {"rmse": rmse, "recall_at_10": 0.2},
        "anchor": {"rmse": rmse, "recall_at_10": 0.2},
    }


GLOBAL_MEAN = {"held_out": {"rmse": 1.2, "recall_at_10": 0.0}, "anchor": {"rmse": 1.2, "recall_at_10": 0.0}}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # Registers the variable with monkeypatch so configure's setting is undone afterwards.
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")
    previous_uri = mlflow.get_tracking_uri()
    home = Home(tmp_path / "home")
    configure(home, "test")
    yield home
    mlflow.set_tracking_uri(previous_uri)


def log_version(home: Home, value: float) -> str:
    """Log and register a checkpoint holding `value`; return the new version."""
    checkpoint = home.root / f"ckpt-{value}"
    (checkpoint / "nested").mkdir(parents=True)
    (checkpoint / "value.json").write_text(json.dumps({"value": value}))
    (checkpoint / "nested" / "weights.bin").write_bytes(bytes(range(256)))
    code = home.root / "model_code.py"
    code.write_text(MODEL_CODE)
    output = pd.DataFrame({"score": [value] * len(INPUT)})
    with mlflow.start_run():
        return log_model_version(NAME, checkpoint, str(code), INPUT, output, ["pandas"])


def gate_and_apply(version: str, rmse: float) -> None:
    champion = get_alias(NAME, "champion")
    champion_metrics = metrics(float(champion.tags["rmse"])) if champion else None
    decision = decide(metrics(rmse), champion_metrics, GLOBAL_MEAN, GateConfig(rule="point"))
    window = {"rows_trained": 100}
    apply_decision(NAME, version, decision, describe_version(window, metrics(rmse), champion_metrics,
                                                              champion.version if champion else None, decision))
    mlflow.MlflowClient().set_model_version_tag(NAME, version, "rmse", str(rmse))


@pytest.fixture
def two_versions(home):
    """v1 promoted as first model, v2 worse on rmse and rejected."""
    v1 = log_version(home, 1.0)
    gate_and_apply(v1, 0.93)
    v2 = log_version(home, 2.0)
    gate_and_apply(v2, 0.95)
    return home, v1, v2


def test_configure_uses_sqlite_in_home_and_artifacts_folder(home):
    assert mlflow.get_tracking_uri() == f"sqlite:///{home.root / 'mlflow.db'}"
    experiment = mlflow.get_experiment_by_name("test")
    assert experiment.artifact_location == home.mlflow_artifacts.as_uri()
    assert configure(home, "test") == mlflow.get_tracking_uri()  # idempotent
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"


def test_configure_prefers_env_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")
    previous_uri = mlflow.get_tracking_uri()
    try:
        assert configure(Home(tmp_path / "home"), "other") == uri
        assert mlflow.get_tracking_uri() == uri
        assert (tmp_path / "elsewhere.db").exists()
    finally:
        mlflow.set_tracking_uri(previous_uri)


def test_get_alias_is_none_when_model_or_alias_absent(home):
    assert get_alias(NAME, "champion") is None
    log_version(home, 1.0)
    assert get_alias(NAME, "champion") is None


def test_log_model_version_needs_an_active_run(home, tmp_path):
    with pytest.raises(RuntimeError, match="start_run"):
        log_model_version(NAME, tmp_path, str(tmp_path / "m.py"), INPUT, INPUT, ["pandas"])


def test_first_promoted_second_rejected_keeps_champion(two_versions):
    _, v1, v2 = two_versions
    assert (v1, v2) == ("1", "2")
    champion = get_alias(NAME, "champion")
    assert champion.version == v1 and champion.tags["decision"] == "promoted"
    assert champion.run_id and champion.name == NAME
    challenger = get_alias(NAME, "challenger")
    assert challenger.version == v2
    assert challenger.tags["decision"] == "rejected"
    assert challenger.tags["failed.held_out.rmse"] == "challenger 0.95 > champion 0.93 (tolerance 0)"
    assert challenger.tags["failed.anchor.rmse"] == "challenger 0.95 > champion 0.93 (tolerance 0)"
    assert not any(key.startswith("failed.") for key in champion.tags)
    assert challenger.description.startswith("Rejected: rmse on held_out")
    assert get_alias(NAME, "previous") is None


def test_promoted_third_moves_previous_and_rollback_restores(two_versions):
    home, v1, v2 = two_versions
    v3 = log_version(home, 3.0)
    gate_and_apply(v3, 0.90)
    assert get_alias(NAME, "champion").version == v3
    assert get_alias(NAME, "previous").version == v1
    assert get_alias(NAME, "challenger").version == v2

    assert rollback(NAME) == v1
    assert get_alias(NAME, "champion").version == v1
    assert get_alias(NAME, "previous").version == v3

    assert rollback(NAME, v2) == v2  # an explicit version, even a rejected one
    assert get_alias(NAME, "champion").version == v2
    assert get_alias(NAME, "previous").version == v1

    changes = champion_history(NAME)
    assert list(changes["version"]) == ["1", "3", "1", "2"]
    assert list(changes["how"]) == ["promotion", "promotion", "rollback", "rollback"]
    assert changes["why"].iloc[0].startswith("Promoted") and changes["why"].iloc[3] == "rolled back from v1"
    assert list(changes["until"]) == list(changes["since"].iloc[1:]) + [""]
    assert changes["since"].is_monotonic_increasing

    history = version_history(NAME)
    assert list(history["version"]) == ["1", "2", "3"]
    assert list(history["aliases"]) == ["previous", "challenger, champion", ""]
    assert list(history["decision"]) == ["promoted", "rejected", "promoted"]
    assert history["description"].str.startswith(("Promoted", "Rejected")).all()
    assert not history["description"].str.contains("\n").any()
    assert history["created"].is_monotonic_increasing


def test_rollback_errors_are_clear(two_versions):
    with pytest.raises(LlmrecError, match="no version aliased 'previous'"):
        rollback(NAME)
    with pytest.raises(LlmrecError, match="no version '9'"):
        rollback(NAME, "9")
    assert get_alias(NAME, "champion").version == "1"


def test_version_history_of_unknown_model_is_empty(home):
    history = version_history("nope")
    assert history.empty and list(history.columns) == ["version", "aliases", "decision", "created", "description"]


def test_download_checkpoint_returns_the_logged_files(home, tmp_path):
    version = log_version(home, 1.5)
    apply_decision(NAME, version, decide(metrics(0.9), None, GLOBAL_MEAN, GateConfig(rule="point")), "first")
    info = get_alias(NAME, "champion")
    local = download_checkpoint(info, tmp_path / "download")
    assert local.is_dir() and local.is_relative_to(tmp_path / "download")
    logged = home.root / "ckpt-1.5"
    files = sorted(p.relative_to(logged) for p in logged.rglob("*") if p.is_file())
    assert sorted(p.relative_to(local) for p in local.rglob("*") if p.is_file()) == files
    for rel in files:
        assert (local / rel).read_bytes() == (logged / rel).read_bytes()
    # The pyfunc sees the same folder as context.artifacts["checkpoint"].
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    assert model.predict(INPUT)["score"].tolist() == [1.5, 1.5]


def test_describe_version_has_window_both_values_and_reason():
    champion = metrics(0.93)
    challenger = metrics(0.95)
    decision = decide(challenger, champion, GLOBAL_MEAN, GateConfig(rule="point"))
    window = {"first_event_time": "2026-11-01 00:00:00", "rows_trained": 1200, "held_out_rows": 130}
    text = describe_version(window, challenger, champion, "4", decision)
    assert text.splitlines()[0] == decision.reason
    assert "| rows trained | 1200 |" in text
    assert "| rmse | 0.95 | 0.93 | 0.02 | FAIL |" in text
    assert "| recall_at_10 | 0.2 | 0.2 | 0 | pass |" in text
    assert "champion v4" in text
    assert "**Rejected, aliased `challenger`.**" in text and decision.reason in text


def test_describe_first_version_without_champion():
    challenger = metrics(0.95)
    decision = decide(challenger, None, GLOBAL_MEAN, GateConfig(rule="point"))
    text = describe_version({}, challenger, None, None, decision)
    assert "| rmse | 0.95 |  |  | pass |" in text
    assert text.startswith("Promoted") and "**Promoted, aliased `champion`.**" in text


def test_configure_does_not_leak_one_home_into_the_next(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    previous_uri = mlflow.get_tracking_uri()
    try:
        configure(Home(tmp_path / "a"), "one")
        assert "MLFLOW_TRACKING_URI" not in os.environ
        assert configure(Home(tmp_path / "b"), "two") == f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"
    finally:
        mlflow.set_tracking_uri(previous_uri)
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_compare_versions_prints_metrics_and_the_stored_paired_comparison(home):
    from llmrec.gate import Check
    from llmrec.registry import compare_versions, log_comparison

    versions = []
    for value, champion in ((1.0, None), (2.0, "1")):
        checkpoint = home.root / f"ckpt-{value}"
        checkpoint.mkdir()
        (checkpoint / "value.json").write_text("{}")
        code = home.root / "model_code.py"
        code.write_text(MODEL_CODE)
        with mlflow.start_run():
            mlflow.log_metrics({"challenger.held_out.rmse": value, "challenger.anchor.rmse": value / 2})
            check = Check("held_out", "rmse", value, 1.0, "champion", False, "rule", difference=value - 1.0,
                          low=0.5, high=1.5, margin=0.0, samples=300, status="fail")
            decision = decide(metrics(value), None, GLOBAL_MEAN, GateConfig(rule="point"))
            decision.checks = [check]
            log_comparison(decision, [{"part": "held_out", "segment": "cold users", "rows": 12}], champion)
            versions.append(log_model_version(NAME, checkpoint, str(code), INPUT,
                                              pd.DataFrame({"score": [value] * len(INPUT)}), ["pandas"]))
    text = compare_versions(NAME, *versions)
    assert "v1 - v2" not in text and "v2 - v1" in text
    assert "v2 was gated against champion v1 on the same rows" in text
    assert "[+0.5, +1.5]" in text and "cold users" in text
    run = mlflow.MlflowClient().get_model_version(NAME, "2").run_id
    assert {a.path for a in mlflow.MlflowClient().list_artifacts(run, "comparison")} == {
        "comparison/comparison.json", "comparison/comparison.md", "comparison/comparison.png"}
    with pytest.raises(LlmrecError, match="no version '7'"):
        compare_versions(NAME, "1", "7")


def test_champion_copy_is_verified_and_a_partial_one_fetched_again(home, tiny_encoder):
    from llmrec import model as llmrec_model
    from llmrec.config import ModelConfig
    from llmrec.registry import CHECKPOINT_FILES_TAG, file_digests, load_champion

    checkpoint = llmrec_model.save(llmrec_model.new_checkpoint(tiny_encoder, ModelConfig(dim=4), seed=0),
                                   home.root / "night" / "checkpoint")
    (checkpoint / "value.json").write_text(json.dumps({"value": 1.0}))
    code = home.root / "model_code.py"
    code.write_text(MODEL_CODE)
    with mlflow.start_run():
        version = log_model_version(NAME, checkpoint, str(code), INPUT, pd.DataFrame({"score": [1.0, 1.0]}),
                                    ["pandas"], tags={CHECKPOINT_FILES_TAG: json.dumps(file_digests(checkpoint))})
    apply_decision(NAME, version, decide(metrics(0.9), None, GLOBAL_MEAN, GateConfig()), "first")
    assert load_champion(home, NAME, tiny_encoder).version == version
    local = home.runs / f"champion-v{version}"
    weights = local / "model.safetensors"
    size = weights.stat().st_size
    # Cut off mid-download: the next load fetches it again instead of crashing on it.
    with open(weights, "r+b") as handle:
        handle.truncate(size // 2)
    assert load_champion(home, NAME, tiny_encoder).checkpoint is not None
    assert weights.stat().st_size == size
    (local / "optimizer.safetensors").unlink()
    load_champion(home, NAME, tiny_encoder)
    assert (local / "optimizer.safetensors").is_file()
    # Same size, other bytes: caught by the checksum.
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    load_champion(home, NAME, tiny_encoder)
    assert file_digests(local) == file_digests(checkpoint)
    # A damaged registry copy is refused, not trusted.
    stored = next(home.mlflow_artifacts.rglob("model.safetensors"))
    stored.write_bytes(b"damaged")
    weights.write_bytes(b"damaged")
    with pytest.raises(LlmrecError, match="does not match what was recorded"):
        load_champion(home, NAME, tiny_encoder)


def test_interrupted_nights_leave_no_undecided_version_and_no_running_run(home):
    from mlflow import MlflowClient

    from llmrec.registry import WATERMARK_TAG, decided_watermark, end_running_runs, settle_undecided

    client = MlflowClient()
    v1 = log_version(home, 1.0)
    gate_and_apply(v1, 0.9)
    client.set_model_version_tag(NAME, v1, WATERMARK_TAG, "5")
    v2 = log_version(home, 2.0)  # killed after the version was created
    client.set_model_version_tag(NAME, v2, WATERMARK_TAG, "9")
    v3 = log_version(home, 3.0)  # killed after its alias moved, before its decision tag
    client.set_registered_model_alias(NAME, "challenger", v3)
    left_running = client.create_run(mlflow.get_experiment_by_name("test").experiment_id).info.run_id
    assert decided_watermark(NAME) == 5
    settled = settle_undecided(NAME)
    assert [(s["version"], s["decision"]) for s in settled] == [(v2, "abandoned"), (v3, "rejected")]
    abandoned = client.get_model_version(NAME, v2)
    assert abandoned.tags["decision"] == "abandoned" and abandoned.description.startswith("Abandoned")
    assert not abandoned.aliases
    assert settle_undecided(NAME) == []
    assert decided_watermark(NAME) == 5  # an abandoned version has not been judged
    assert end_running_runs() == [left_running]
    assert client.get_run(left_running).info.status == "FAILED"
    assert end_running_runs() == []
    assert set(version_history(NAME)["decision"]) == {"promoted", "abandoned", "rejected"}
