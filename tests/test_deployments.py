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
    from app.serve import deployments

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


LAYERS = {"llmrec": 0, "tasks": 1, "flows": 2, "app": 3}


def imported_packages(path: Path) -> set[str]:
    """Top-level names a module imports, anywhere in it (function-level imports count)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_imports_point_down_only():
    """llmrec/ < tasks/ < flows/ < app/: a module imports only its own layer or lower ones,
    and nothing below the entry points imports prefect except tasks/ and flows/."""
    checked = 0
    for layer, rank in LAYERS.items():
        for path in sorted((ROOT / layer).rglob("*.py")):
            imported = imported_packages(path)
            upward = {name for name in imported if LAYERS.get(name, -1) > rank}
            assert not upward, f"{path.relative_to(ROOT)} imports {sorted(upward)} from a layer above it"
            if layer == "llmrec":
                assert "prefect" not in imported, f"{path.relative_to(ROOT)} imports prefect"
            checked += 1
    assert checked > 20


def test_library_imports_no_prefect_at_run_time():
    import subprocess
    import sys

    modules = sorted(f"llmrec.{p.stem}" for p in (ROOT / "llmrec").glob("*.py") if p.stem != "__init__"
                     and p.stem != "pyfunc_model")
    code = f"import sys, {', '.join(modules)}, llmrec.data; print('prefect' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_one_schedule_everywhere():
    from llmrec.config import NIGHTLY_CRON, NIGHTLY_TIMEZONE

    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    (schedule,) = {d["name"]: d for d in spec["deployments"]}["nightly"]["schedules"]
    assert (schedule["cron"], schedule["timezone"]) == (NIGHTLY_CRON, NIGHTLY_TIMEZONE)
    for path in [*ROOT.glob("app/*.py"), *ROOT.glob("flows/*.py"), ROOT / "README.md"]:
        assert "2 * * *" not in path.read_text(), f"{path.name} spells a schedule of its own"
