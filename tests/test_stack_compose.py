"""docker/compose.yaml cannot be started here (no Docker engine), so it is checked against
the native stack that the end-to-end test runs: each server's environment and command are
exactly what docker/stack.py builds for it, every variable set is one its program reads,
every ${VARIABLE} is documented in .env.example, and the services the code expects exist."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
EXPECTED_SERVICES = {"postgres", "s3", "buckets", "mlflow", "prefect", "worker"}
# Read by the official postgres image's docker-entrypoint.sh (documented on its image page);
# no Python package here reads them.
POSTGRES_IMAGE_VARIABLES = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "POSTGRES_INITDB_ARGS", "PGDATA"}


def load_stack():
    spec = importlib.util.spec_from_file_location("llmrec_stack", DOCKER / "stack.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


stack = load_stack()


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def interpolations(text: str) -> set[str]:
    """${NAME} references compose fills from .env ($$ escapes a literal $ for the container)."""
    return set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)\}", text))


def in_compose(compose: dict):
    """Endpoints and secrets as compose spells them: service names, container ports, ${...}."""
    end = stack.Endpoints("postgres", 5432, "http://s3:8333", "http://mlflow:5000", "http://prefect:4200/api")
    sec = stack.Secrets("${POSTGRES_PASSWORD}", "${S3_ACCESS_KEY}", "${S3_SECRET_KEY}", "${MLFLOW_ADMIN_PASSWORD}",
                        "${MLFLOW_SECRET_KEY}", "${PREFECT_AUTH_STRING}")
    return end, sec


def test_the_services_the_code_expects_are_there(compose):
    services = compose["services"]
    assert EXPECTED_SERVICES <= set(services)
    for name, service in services.items():
        assert "image" in service, f"{name}: no image"
        image = service["image"]
        if "build" not in service:  # pulled from a registry: the same image on every machine
            assert ":" in image and not image.endswith(":latest"), f"{name}: image {image} not pinned by tag"
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} not declared"
        if "build" in service:
            context = DOCKER / service["build"]["context"]
            assert (context / service["build"]["dockerfile"]).is_file(), f"{name}: Dockerfile missing"
    # MinIO's community images are no longer published.
    assert "minio" not in services["s3"]["image"]
    assert "postgres-init.sql" in " ".join(services["postgres"]["volumes"])


def test_each_server_is_configured_as_the_native_stack_configures_it(compose):
    services = compose["services"]
    end, sec = in_compose(compose)
    auth_ini = "/opt/llmrec/mlflow-auth.ini"
    assert services["mlflow"]["environment"] == stack.mlflow_server_env(end, sec, auth_ini)
    assert services["mlflow"]["command"] == stack.mlflow_server_command("0.0.0.0", 5000, "${MLFLOW_ALLOWED_HOSTS}", 4)
    assert services["prefect"]["environment"] == stack.prefect_server_env(end, sec, "${PREFECT_UI_API_URL}")
    assert services["prefect"]["command"] == stack.prefect_server_command("0.0.0.0", 4200)
    assert services["worker"]["environment"] == stack.client_env(end, sec)
    assert services["buckets"]["environment"] == stack.s3_env(end, sec)
    assert services["postgres"]["environment"]["POSTGRES_USER"] == stack.DB_ROLE
    # The worker serves the deployments on the landing bucket the stack creates.
    assert f"s3://{stack.LANDING_BUCKET}/" in services["worker"]["command"]
    # The auth ini and bucket script the image copies are the ones the native stack uses.
    dockerfile = (DOCKER / "mlflow.Dockerfile").read_text()
    assert f"COPY {stack.MLFLOW_AUTH_INI.name} {Path(stack.__file__).name} {Path(auth_ini).parent}/" in dockerfile
    assert services["buckets"]["command"] == ["python", f"{Path(auth_ini).parent}/stack.py", "buckets"]


def test_the_images_run_the_versions_the_project_pins(compose):
    pyproject = (ROOT / "pyproject.toml").read_text()
    mlflow_pin = re.search(r'"mlflow(?:\[[a-z,]+\])?==([0-9.]+)"', pyproject).group(1)
    prefect_pin = re.search(r'"prefect==([0-9.]+)"', pyproject).group(1)
    assert f"ARG MLFLOW_VERSION={mlflow_pin}\n" in (DOCKER / "mlflow.Dockerfile").read_text()
    assert compose["services"]["mlflow"]["image"].endswith(f":{mlflow_pin}")
    assert compose["services"]["prefect"]["image"].startswith(f"prefecthq/prefect:{prefect_pin}-")


def readers() -> dict[str, bytes]:
    """The programs the containers run, as bytes to search for variable names: MLflow's
    variables, botocore's, pyarrow's C++ S3 client, libpq (in psycopg's wheel), asyncpg,
    and llmrec. Prefect's are enumerated from its settings model instead."""
    import asyncpg
    import botocore
    import mlflow
    import psycopg  # noqa: F401  (psycopg_binary refuses to be imported first)
    import psycopg_binary
    import pyarrow

    site = [Path(mlflow.__file__).parent / "environment_variables.py",
            Path(botocore.__file__).parent / "credentials.py", Path(botocore.__file__).parent / "configprovider.py",
            *Path(pyarrow.__file__).parent.glob("libarrow.so*"),
            *Path(psycopg_binary.__file__).parent.parent.glob("psycopg_binary.libs/libpq*"),
            Path(asyncpg.__file__).parent / "connect_utils.py", ROOT / "llmrec" / "config.py"]
    return {str(path): path.read_bytes() for path in site if path.is_file()}


def test_every_variable_set_is_read_by_its_program(compose):
    from prefect.settings.legacy import _get_settings_fields
    from prefect.settings.models.root import Settings

    prefect_names = set(_get_settings_fields(Settings))
    sources = readers()
    assert any("libarrow" in p for p in sources) and any("libpq" in p for p in sources)
    for name, service in compose["services"].items():
        command = " ".join(service.get("command", []))
        for variable in service.get("environment", {}):
            if name == "postgres":
                assert variable in POSTGRES_IMAGE_VARIABLES, f"postgres: {variable} is not read by the image"
            elif variable.startswith("PREFECT_"):
                assert variable in prefect_names, f"{name}: {variable} is no Prefect setting"
            elif f"$${variable}" in command:
                continue  # read by the service's own start command
            else:
                assert any(re.search(rb"\b" + variable.encode() + rb"\b", text) for text in sources.values()), (
                    f"{name}: nothing reads {variable}")


def test_every_compose_variable_is_in_env_example():
    documented = {line.split("=", 1)[0] for line in (DOCKER / ".env.example").read_text().splitlines()
                  if line and not line.startswith("#")}
    assert interpolations((DOCKER / "compose.yaml").read_text()) == documented
