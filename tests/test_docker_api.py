"""The API image and its services in docker/compose.yaml (no Docker engine here: checked as
files; tests/test_stack_compose.py checks the compose file as a whole)."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_compose_runs_api_replicas_behind_nginx():
    compose = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())
    api, nginx = compose["services"]["api"], compose["services"]["nginx"]
    assert api["deploy"]["replicas"] >= 2 and "ports" not in api
    assert (ROOT / api["build"]["dockerfile"]).exists() and api["build"]["context"] == ".."
    assert api["environment"]["LLMREC_HOME"] == "/data/llmrec"
    assert api["environment"]["MLFLOW_TRACKING_URI"] == compose["services"]["worker"]["environment"]["MLFLOW_TRACKING_URI"]
    # The same home as the worker: the catalog, events and keys it curates.
    assert api["volumes"] == compose["services"]["worker"]["volumes"]
    assert nginx["depends_on"]["api"]["condition"] == "service_healthy"
    assert all(port.startswith("127.0.0.1:") for port in nginx["ports"])
    config_file = nginx["volumes"][0].split(":")[0]
    conf = (ROOT / "docker" / config_file).read_text()
    assert "upstream api" in conf and "server api:8000" in conf and "proxy_pass http://api;" in conf
    assert conf.count("{") == conf.count("}")


def test_api_image_runs_llmrec_api_and_copies_what_exists():
    dockerfile = (ROOT / "docker/Dockerfile.api").read_text()
    assert 'ENTRYPOINT ["llmrec", "api", "--host", "0.0.0.0", "--port", "8000"]' in dockerfile
    assert "/healthz" in dockerfile  # the HEALTHCHECK nginx's depends_on waits for
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
