"""`llmrec versions --compare A B` on versions the nightly flow registered: both scored on
the later version's night, the same rows its gate saw."""

import mlflow
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from llmrec import registry
from llmrec.config import Home, NightlyConfig
from llmrec.data import copy_drop, synthetic_drops

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def stored_checks(config: NightlyConfig, version: str) -> dict:
    run_id = MlflowClient().get_model_version(config.registered_model, version).run_id
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/comparison/comparison.json")


def test_compare_scores_any_two_versions_on_the_later_ones_night(prefect_server, tmp_path, tiny_encoder,
                                                                 monkeypatch):
    from app.cli import app
    from flows.nightly import nightly_retrain
    from llmrec.compare import paired_comparison

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    encoder_dir = tmp_path / "tiny-bert"
    tiny_encoder.model.save_pretrained(encoder_dir)
    tiny_encoder.tokenizer.save_pretrained(encoder_dir)
    drops, landing = tmp_path / "drops", tmp_path / "landing"
    tags = synthetic_drops(drops, users=40, items=60, days=5, seed=2)
    config = NightlyConfig(landing=str(landing), home=str(tmp_path / "home"),
                           model={"encoder": str(encoder_dir), "dim": 8, "max_length": 16},
                           training={"epochs": 6, "lr": 0.01, "l2": 0.05},
                           # Intervals on the few held-out rows of these tiny nights too.
                           gate={"resamples": 200, "small_sample": "ignore", "min_samples": 5})
    for night in (tags[:3], tags[3:4], tags[4:5]):
        for tag in night:
            copy_drop(drops, tag, landing)
        nightly_retrain(config=config)
    home = Home(config.home)
    registry.configure(home, config.experiment)
    [gated_against] = [stored_checks(config, "3")["champion_version"]]
    assert gated_against in ("1", "2")

    # The pair v3 was gated against: scoring again on the rebuilt night gives the stored checks.
    again = paired_comparison(home, config.registered_model, gated_against, "3", config)
    assert any(check["interval"] for check in stored_checks(config, "3")["checks"])
    for check in stored_checks(config, "3")["checks"]:
        assert f"{check['difference']} " in again and check["interval"] in again, (check, again)

    # A pair never gated against each other: printed from the CLI, scored on v3's night.
    other = "2" if gated_against == "1" else "1"
    run_id = MlflowClient().get_model_version(config.registered_model, "3").run_id
    window = mlflow.artifacts.load_dict(f"runs:/{run_id}/window.json")
    result = CliRunner().invoke(app, ["versions", "--home", config.home, "--compare", other, "3",
                                      "--set", "gate.resamples=200", "--set", "gate.min_samples=5"])
    assert result.exit_code == 0, result.output
    assert "neither was gated against the other" in result.output
    assert (f"v3 vs v{other}, both scored on v3's night: {window['held_out_rows']} held-out rows"
            in result.output), result.output
    assert f"{window['anchor_rows']} anchor rows" in result.output
    paired = result.output.split("neither was gated against the other")[1]
    assert "recall_at_10" in paired and f"v{other} " in paired and "cold users" in paired
    assert "| [" in paired.split("per segment")[0]  # a paired interval in the check table
