"""One home everywhere: what `make ui` shows is where `make demo` and a run started from
the deployments that `make serve` publishes write."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def dry_run(*args: str) -> str:
    return subprocess.run(["make", "-n", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("override", [None, "/srv/llmrec-home"])
def test_make_targets_share_one_home(override):
    args = ["ui", "serve", "demo"] + ([f"LLMREC_HOME={override}"] if override else [])
    out = dry_run(*args)
    home = override or str(ROOT / "demo-data" / "home")
    ui_store = re.search(r"sqlite:///(\S+)/mlflow\.db", out).group(1)
    served = re.search(r"llmrec serve .*--home (\S+)", out).group(1)
    demo = re.search(r"llmrec demo .*--home (\S+)", out).group(1)
    assert ui_store == served == demo == home


def test_served_deployments_default_to_the_home_of_the_environment(monkeypatch, tmp_path):
    from app.serve import deployments
    from llmrec.config import Home, NightlyConfig

    monkeypatch.setenv("LLMREC_HOME", str(tmp_path / "home"))
    nightly, manual = deployments(NightlyConfig.from_sources(landing=str(tmp_path)), "30 1 * * *", "Europe/Berlin")
    for deployment in (nightly, manual):
        assert Home(deployment.parameters["config"]["home"]).root == (tmp_path / "home").resolve()


def test_demo_refuses_a_home_outside_its_workdir_that_holds_state(tmp_path):
    from app.demo import run_demo
    from llmrec.errors import LlmrecError

    home = tmp_path / "prod-home"
    home.mkdir()
    (home / "manifest.parquet").write_bytes(b"state")
    with pytest.raises(LlmrecError, match="already holds state"):
        run_demo(None, 0, tmp_path / "work", {}, home)
    assert (home / "manifest.parquet").exists()
