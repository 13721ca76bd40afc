"""Deployments: prefect.yaml points at the real flow, schedules carry a timezone, and the
flow's parameters are one pydantic model (the UI form)."""

from pathlib import Path

import yaml

from llmrec.config import NightlyConfig

ROOT = Path(__file__).resolve().parents[1]


def test_prefect_yaml_deployments_are_valid():
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert set(by_name) == {"nightly", "manual"}
    for deployment in by_name.values():
        path, function = deployment["entrypoint"].split(":")
        assert f"def {function}(" in (ROOT / path).read_text()
        NightlyConfig(**deployment["parameters"]["config"])
    (schedule,) = by_name["nightly"]["schedules"]
    assert schedule["timezone"] and len(schedule["cron"].split()) == 5
    assert "schedules" not in by_name["manual"]


def test_served_deployments_and_ui_form():
    from flows.nightly import nightly_retrain
    from flows.serve import deployments

    nightly, manual = deployments(NightlyConfig(landing="/data/landing"), "30 2 * * *", "Europe/Berlin")
    (schedule,) = nightly.schedules
    assert schedule.schedule.cron == "30 2 * * *" and schedule.schedule.timezone == "Europe/Berlin"
    assert not manual.schedules
    assert nightly.parameters["config"]["landing"] == "/data/landing"
    schema = nightly_retrain.parameters.model_dump()
    definitions = schema["definitions"]
    assert "NightlyConfig" in definitions
    training = definitions["TrainingConfig"]["properties"]
    assert training["replay_fraction"]["description"]
    assert training["epochs"]["minimum"] == 1


def test_library_imports_no_prefect():
    import subprocess
    import sys

    code = (
        "import sys, llmrec.nightly, llmrec.data, llmrec.registry, llmrec.gate, llmrec.validate;"
        "print('prefect' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
