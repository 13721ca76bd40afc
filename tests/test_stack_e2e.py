"""The production topology, natively (docker/stack.py, `make stack`): Postgres, an S3
endpoint, MLflow with basic-auth, Prefect with an auth string. Two nights run through the
served manual deployment with landing on s3://; then the bucket is checked through boto3,
the registry through Postgres, the servers for 401 without credentials, `llmrec versions`
and `rollback` with credentials from the environment, and every log, database row and
report for the credentials."""

import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from servers import stop

from llmrec.data import synthetic_drops

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STACK = ROOT / "docker" / "stack.py"
LANDING_BUCKET, ARTIFACTS_BUCKET = "llmrec-landing", "llmrec-mlflow"


def read_env(path: Path) -> dict[str, str]:
    pairs = (shlex.split(line)[1].split("=", 1) for line in path.read_text().splitlines())
    return dict(pairs)


def status_of(url: str, method: str = "GET", auth: str | None = None) -> int:
    import base64

    request = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None,
                                     headers={"Content-Type": "application/json"})
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        # Generous: MLflow checks a password with a deliberately slow hash, on a busy CI machine.
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def upload_drop(s3, drops: Path, tag: str) -> list[str]:
    keys = []
    for path in sorted(drops.glob(f"*/*-{tag}.parquet")):
        key = f"{path.parent.name}/{path.name}"
        s3.upload_file(str(path), LANDING_BUCKET, key)
        keys.append(f"s3://{LANDING_BUCKET}/{key}")
    return keys


def test_two_nights_on_the_native_production_stack(tmp_path, tiny_encoder_dir):
    import boto3
    import pandas as pd
    import psycopg

    stack_dir, home = tmp_path / "stack", tmp_path / "home"
    started = time.time()
    up = subprocess.run([sys.executable, str(STACK), "up", "--dir", str(stack_dir)], capture_output=True, text=True,
                        timeout=400)
    served = None
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        print(f"stack up in {time.time() - started:.1f}s")
        stack_env = read_env(stack_dir / "env.sh")
        secrets = [stack_env["PGPASSWORD"], stack_env["AWS_SECRET_ACCESS_KEY"], stack_env["MLFLOW_TRACKING_PASSWORD"],
                   stack_env["PREFECT_API_AUTH_STRING"].split(":", 1)[1]]
        outputs = [up.stdout, up.stderr]
        env = {**os.environ, **stack_env, "PREFECT_HOME": str(tmp_path / "prefect-client")}
        env.pop("LLMREC_HOME", None)
        mlflow_url, prefect_api = stack_env["MLFLOW_TRACKING_URI"], stack_env["PREFECT_API_URL"]

        # Both servers refuse a request without credentials, and take one with them.
        search = f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert status_of(search) == 401
        assert status_of(search, auth=f"admin:{stack_env['MLFLOW_TRACKING_PASSWORD']}") == 200
        assert status_of(f"{prefect_api}/flows/filter", "POST") == 401
        assert status_of(f"{prefect_api}/flows/filter", "POST", auth=stack_env["PREFECT_API_AUTH_STRING"]) == 200

        drops = tmp_path / "drops"
        tags = synthetic_drops(drops, users=40, items=50, days=2, seed=5)
        s3 = boto3.client("s3", endpoint_url=stack_env["AWS_ENDPOINT_URL"], region_name=stack_env["AWS_DEFAULT_REGION"],
                          aws_access_key_id=stack_env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=stack_env["AWS_SECRET_ACCESS_KEY"])
        landing = f"s3://{LANDING_BUCKET}/"
        serve_log = tmp_path / "serve.log"
        served = subprocess.Popen([BIN / "llmrec", "serve", "--landing", landing, "--home", str(home)], env=env,
                                  stdout=serve_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        # Gated on recall only by the point rule with full tolerance, drift never holding: both nights
        # are promoted whatever the tiny random encoder scores, so night 2 resumes from version
        # 1's checkpoint, which comes back from the bucket through MLflow's artifact proxy.
        parameters = {"config": {"landing": landing, "home": str(home), "model": {"encoder": str(tiny_encoder_dir), "dim": 8},
                                 "training": {"epochs": 2},
                                 "gate": {"rule": "point", "metrics": ["recall_at_10"], "tolerance": 1.0},
                                 "monitor": {"hold_columns": [], "drift_threshold": 1.0}}}
        uploaded, reports = [], []
        for tag in tags:
            uploaded += upload_drop(s3, drops, tag)
            night = subprocess.run([sys.executable, Path(__file__).with_name("run_manual_deployment.py"),
                                    json.dumps(parameters)], env=env,
                                   capture_output=True, text=True, timeout=500)
            outputs += [night.stdout, night.stderr]
            assert night.returncode == 0, night.stderr[-3000:] + serve_log.read_text()[-3000:]
            result = json.loads(night.stdout.strip().splitlines()[-1])
            assert result["state"] == "COMPLETED", serve_log.read_text()[-3000:]
            reports.append(result["report"])
        assert "version **1** -> alias `champion`" in reports[0] and "version **2** -> alias `champion`" in reports[1]
        assert "resumed from: v1" in reports[1]

        # Landing was read from the bucket: the manifest records the s3:// URIs uploaded, each
        # named by its path relative to the landing root.
        manifest = pd.read_parquet(home / "manifest.parquet")
        assert sorted(manifest["source"]) == sorted(uploaded)
        assert sorted(manifest["file"]) == sorted(uri.removeprefix(landing) for uri in uploaded)

        # The registry's rows are in Postgres.
        with psycopg.connect(dbname="mlflow", host=stack_env["PGHOST"], port=stack_env["PGPORT"],
                             user=stack_env["PGUSER"], password=stack_env["PGPASSWORD"]) as db:
            sources = dict(db.execute("SELECT version, source FROM model_versions WHERE name = 'llmrec'").fetchall())
            aliases = dict(db.execute("SELECT alias, version FROM registered_model_aliases WHERE name = 'llmrec'"))
        assert sorted(sources) == [1, 2]
        assert aliases == {"champion": 2, "previous": 1}

        # Each version's checkpoint is in the artifacts bucket (read with boto3, not MLflow).
        keys = {o["Key"]: o["Size"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=ARTIFACTS_BUCKET)
                for o in page.get("Contents", [])}
        for version, source in sources.items():
            model_id = source.removeprefix("models:/")
            checkpoint = [k for k in keys if f"/models/{model_id}/artifacts/" in k and "/checkpoint/" in k]
            assert {k.rsplit("/", 1)[1] for k in checkpoint} >= {"model.safetensors", "state.json"}, (version, checkpoint)
            assert all(keys[k] > 0 for k in checkpoint)
            state_key = next(k for k in checkpoint if k.endswith("/state.json"))
            json.loads(s3.get_object(Bucket=ARTIFACTS_BUCKET, Key=state_key)["Body"].read())

        # The CLI against the servers, credentials from the environment.
        versions = subprocess.run([BIN / "llmrec", "versions"], env=env, capture_output=True, text=True, timeout=120)
        outputs += [versions.stdout, versions.stderr]
        assert versions.returncode == 0, versions.stderr
        assert {line.split()[0] for line in versions.stdout.splitlines()[1:]} == {"1", "2"}
        rollback = subprocess.run([BIN / "llmrec", "rollback"], env=env, capture_output=True, text=True, timeout=120)
        outputs += [rollback.stdout, rollback.stderr]
        assert rollback.returncode == 0, rollback.stderr
        assert "champion is now version 1" in rollback.stdout
        with psycopg.connect(dbname="mlflow", host=stack_env["PGHOST"], port=stack_env["PGPORT"],
                             user=stack_env["PGUSER"], password=stack_env["PGPASSWORD"]) as db:
            aliases = dict(db.execute("SELECT alias, version FROM registered_model_aliases WHERE name = 'llmrec'"))
        assert aliases == {"champion": 1, "previous": 2}

        # No credential anywhere: the nightly reports, every output and log, the home folder,
        # and every database (MLflow params and tags, Prefect's logs, flow-run parameters and
        # artifacts), dumped with pg_dump as the README's backup does (plain, to search it).
        stop(served)
        served = None
        texts = {"reports": "\n".join(reports), "outputs": "\n".join(outputs)}
        for database in ("prefect", "mlflow", "mlflow_auth"):
            dump = subprocess.run(["pg_dump", "-d", database], env=env, capture_output=True, text=True, timeout=120)
            assert dump.returncode == 0, dump.stderr
            texts[f"database {database}"] = dump.stdout
        assert "nightly-report" in texts["database prefect"] and "model_versions" in texts["database mlflow"]
        for path in [*stack_dir.glob("*.log"), serve_log, *(p for p in home.rglob("*") if p.is_file())]:
            texts[str(path)] = path.read_bytes().decode("utf-8", errors="replace")
        leaked = [(where, index) for where, text in texts.items() for index, s in enumerate(secrets) if s in text]
        assert not leaked, f"credential(s) found in {leaked}"
    finally:
        if served is not None:
            stop(served)
        down = subprocess.run([sys.executable, str(STACK), "down", "--dir", str(stack_dir)], capture_output=True, text=True,
                              timeout=120)
        assert down.returncode == 0, down.stderr


