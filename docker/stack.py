"""The production topology on this machine, for development and the end-to-end test:
PostgreSQL (databases for Prefect, MLflow and MLflow's users), an S3 endpoint, the MLflow
server (basic-auth, Postgres backend, artifacts proxied to a bucket) and the Prefect server
(Postgres, auth string). Every server listens on 127.0.0.1 on a free port, keeps its data
in one throwaway folder and runs in its own process group, so `down` stops it by pid.

    python docker/stack.py up   [--dir .stack]   # `make stack`: start, print URLs and env
    python docker/stack.py down [--dir .stack]   # `make stack-stop`

docker/compose.yaml runs the same servers in containers. The environment and command line
of each server are built here, by one function each, for both: tests/test_stack_compose.py
checks that every service of the compose file sets exactly what these functions produce.

S3 here is moto's server mode (no MinIO server can be installed on this machine); nothing
in llmrec or MLflow knows that: they only see an endpoint URL and keys. Moto accepts any
keys, so authentication on object storage is exercised by the compose stack only.

Standard library only at import time, so `down` and `pg-bindir` run with any python3.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
POSTGRES_INIT = HERE / "postgres-init.sql"
MLFLOW_AUTH_INI = HERE / "mlflow-auth.ini"

DB_ROLE = "llmrec"
MLFLOW_DATABASE, PREFECT_DATABASE = "mlflow", "prefect"
ARTIFACTS_BUCKET, LANDING_BUCKET = "llmrec-mlflow", "llmrec-landing"
MLFLOW_ADMIN, PREFECT_USER = "admin", "llmrec"
REGION = "us-east-1"


class StackError(Exception):
    """Something the user can fix (missing PostgreSQL, a stack already running...)."""


@dataclass
class Secrets:
    """Every credential of the stack. In compose these are `${VARIABLE}` references to .env."""

    postgres_password: str
    s3_access_key: str
    s3_secret_key: str
    mlflow_admin_password: str
    mlflow_secret_key: str
    prefect_auth_string: str  # user:password, sent as HTTP basic auth by Prefect clients

    @classmethod
    def generate(cls) -> "Secrets":
        token = lambda: secrets.token_urlsafe(18)  # noqa: E731
        return cls(token(), "llmrec" + secrets.token_hex(6), token(), token(), token(), f"{PREFECT_USER}:{token()}")


@dataclass
class Endpoints:
    """Where each server is reached from the process being configured."""

    postgres_host: str
    postgres_port: int
    s3_url: str
    mlflow_url: str
    prefect_api_url: str


def postgres_env(end: Endpoints, sec: Secrets) -> dict[str, str]:
    # libpq (psycopg, for MLflow) and asyncpg (for Prefect) both read these, so the database
    # URLs and the auth ini carry no host or password.
    return {"PGHOST": end.postgres_host, "PGPORT": str(end.postgres_port), "PGUSER": DB_ROLE,
            "PGPASSWORD": sec.postgres_password}


def s3_env(end: Endpoints, sec: Secrets) -> dict[str, str]:
    # AWS_ENDPOINT_URL is read by botocore and by pyarrow's S3 filesystem (landing s3:// URIs).
    return {"AWS_ACCESS_KEY_ID": sec.s3_access_key, "AWS_SECRET_ACCESS_KEY": sec.s3_secret_key,
            "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": end.s3_url}


def mlflow_server_env(end: Endpoints, sec: Secrets, auth_ini: str) -> dict[str, str]:
    return {
        **postgres_env(end, sec),
        **s3_env(end, sec),
        "MLFLOW_S3_ENDPOINT_URL": end.s3_url,
        "MLFLOW_AUTH_CONFIG_PATH": auth_ini,
        "MLFLOW_AUTH_ADMIN_PASSWORD": sec.mlflow_admin_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": sec.mlflow_secret_key,
    }


def mlflow_server_command(host: str, port: int, allowed_hosts: str, workers: int) -> list[str]:
    # --allowed-hosts: the Host headers the server answers (MLflow's DNS-rebinding guard).
    return ["mlflow", "server", "--app-name", "basic-auth", "--host", host, "--port", str(port),
            "--backend-store-uri", f"postgresql+psycopg:///{MLFLOW_DATABASE}",
            "--artifacts-destination", f"s3://{ARTIFACTS_BUCKET}/artifacts",
            "--allowed-hosts", allowed_hosts, "--workers", str(workers)]


def prefect_server_env(end: Endpoints, sec: Secrets, ui_api_url: str) -> dict[str, str]:
    """`ui_api_url`: the API as the browser showing Prefect's UI reaches it."""
    return {
        **postgres_env(end, sec),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"postgresql+asyncpg:///{PREFECT_DATABASE}",
        "PREFECT_SERVER_API_AUTH_STRING": sec.prefect_auth_string,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": ui_api_url,
    }


def prefect_server_command(host: str, port: int) -> list[str]:
    # One process runs the API and the background services (scheduler, event triggers...):
    # Prefect's services only share events with the API in-process unless Redis is added.
    return ["prefect", "server", "start", "--host", host, "--port", str(port)]


def client_env(end: Endpoints, sec: Secrets) -> dict[str, str]:
    """What `llmrec` (a worker, the CLI) needs to use the stack: MLflow and Prefect with
    credentials, and S3 for landing URIs. Artifacts go through MLflow's proxy, so MLflow
    needs no S3 keys on the client."""
    return {
        "MLFLOW_TRACKING_URI": end.mlflow_url,
        "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN,
        "MLFLOW_TRACKING_PASSWORD": sec.mlflow_admin_password,
        "PREFECT_API_URL": end.prefect_api_url,
        "PREFECT_API_AUTH_STRING": sec.prefect_auth_string,
        **s3_env(end, sec),
    }


def create_buckets(attempts: int = 60) -> None:
    """Create the artifacts and landing buckets at $AWS_ENDPOINT_URL (kept when they exist),
    retrying while the object store starts."""
    import boto3
    from botocore.exceptions import ClientError, EndpointConnectionError

    s3 = boto3.client("s3")
    for attempt in range(attempts):
        try:
            existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
            break
        except (EndpointConnectionError, ClientError):
            if attempt == attempts - 1:
                raise
            time.sleep(1)
    for bucket in (ARTIFACTS_BUCKET, LANDING_BUCKET):
        if bucket not in existing:
            s3.create_bucket(Bucket=bucket)


# ---------------------------------------------------------------- the native stack


def pg_bindir() -> Path:
    """The directory of PostgreSQL's server programs (initdb, pg_ctl): Debian keeps them
    off PATH, under /usr/lib/postgresql/<version>/bin."""
    candidates = [str(Path(p).resolve().parent) for p in [shutil.which("initdb")] if p]
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for directory in candidates:
        if directory and (Path(directory) / "initdb").is_file() and (Path(directory) / "pg_ctl").is_file():
            return Path(directory)
    raise StackError("PostgreSQL server programs (initdb, pg_ctl) not found: install them with "
                     "`make postgres` (as root: apt-get install -y postgresql)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_postgres_user() -> list[str]:
    # PostgreSQL refuses to run as root; root runs it as the `postgres` system user.
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def start_postgres(state: dict, sec: Secrets, port: int) -> None:
    bindir = pg_bindir()
    if os.geteuid() == 0:
        # Its own folder outside --dir: the postgres user cannot enter root's private folders.
        data_root = Path(tempfile.mkdtemp(prefix="llmrec-stack-pg-"))
    else:
        data_root = Path(state["dir"]) / "postgres"
        data_root.mkdir()
    state["postgres_root"] = str(data_root)
    data, sockets, pwfile = data_root / "data", data_root / "sock", data_root / "pwfile"
    sockets.mkdir()
    pwfile.touch(mode=0o600)
    pwfile.write_text(sec.postgres_password + "\n")
    if os.geteuid() == 0:
        postgres = pwd.getpwnam("postgres")
        for path in (data_root, sockets, pwfile):
            os.chown(path, postgres.pw_uid, postgres.pw_gid)

    def run(argv: list[str]) -> None:
        done = subprocess.run(as_postgres_user() + argv, capture_output=True, text=True)
        if done.returncode:
            raise StackError(f"{Path(argv[0]).name} failed: {(done.stderr or done.stdout).strip()[-500:]}")

    try:
        # The password goes in a file, never on a command line that `ps` shows.
        run([str(bindir / "initdb"), "-D", str(data), "-U", DB_ROLE, f"--pwfile={pwfile}",
             "--auth=scram-sha-256", "-E", "UTF8"])
    finally:
        pwfile.unlink()
    # pg_ctl writes the server log under data/ (owned by postgres); `down` copies it to --dir.
    run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(data / "server.log"), "-w", "start",
         "-o", f"-p {port} -c listen_addresses=127.0.0.1 -k {sockets}"])
    state["pids"]["postgres"] = int((data / "postmaster.pid").read_text().split()[0])


def start_server(state: dict, name: str, argv: list[str], env: dict[str, str]) -> None:
    # The servers are the ones installed beside this interpreter (the project's venv).
    program = Path(sys.executable).parent / argv[0]
    log = open(Path(state["dir"]) / f"{name}.log", "w")
    process = subprocess.Popen([str(program) if program.exists() else argv[0], *argv[1:]], env={**os.environ, **env},
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True, cwd=state["dir"])
    state["pids"][name] = process.pid


def wait_healthy(state: dict, name: str, url: str, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not alive(state["pids"][name]):
            raise StackError(f"{name} exited while starting; see {state['dir']}/{name}.log")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:  # refused, timed out, or an error status while it starts
            time.sleep(0.3)
    raise StackError(f"{name} not healthy after {seconds:.0f}s at {url}; see {state['dir']}/{name}.log")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def up(directory: Path) -> dict:
    directory = directory.resolve()
    state_file = directory / "stack.json"
    if state_file.exists():
        raise StackError(f"{state_file} exists: a stack is running there; stop it first (make stack-stop)")
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    started = time.time()
    sec = Secrets.generate()
    ports = {name: free_port() for name in ("postgres", "s3", "mlflow", "prefect")}
    end = Endpoints("127.0.0.1", ports["postgres"], f"http://127.0.0.1:{ports['s3']}",
                    f"http://127.0.0.1:{ports['mlflow']}", f"http://127.0.0.1:{ports['prefect']}/api")
    state = {"dir": str(directory), "pids": {}, "ports": ports}
    try:
        start_server(state, "s3", ["moto_server", "-H", "127.0.0.1",
                                   "-p", str(ports["s3"])], {})
        start_postgres(state, sec, ports["postgres"])
        psql = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "postgres", "-f", str(POSTGRES_INIT)],
                              env={**os.environ, **postgres_env(end, sec)}, capture_output=True, text=True)
        if psql.returncode:
            raise StackError(f"{POSTGRES_INIT.name} failed: {psql.stderr.strip()}")
        wait_healthy(state, "s3", end.s3_url)
        os.environ.update(s3_env(end, sec))
        create_buckets()
        start_server(state, "mlflow", mlflow_server_command("127.0.0.1", ports["mlflow"], f"127.0.0.1:{ports['mlflow']}", 1),
                     mlflow_server_env(end, sec, str(MLFLOW_AUTH_INI)))
        start_server(state, "prefect", prefect_server_command("127.0.0.1", ports["prefect"]),
                     {**prefect_server_env(end, sec, end.prefect_api_url), "PREFECT_HOME": str(directory / "prefect")})
        wait_healthy(state, "mlflow", f"{end.mlflow_url}/health")
        wait_healthy(state, "prefect", f"{end.prefect_api_url}/health")
    except BaseException:
        state_file.write_text(json.dumps(state))
        down(directory)
        raise
    state["endpoints"] = asdict(end)
    state["seconds_to_start"] = round(time.time() - started, 1)
    env = {**client_env(end, sec), **postgres_env(end, sec)}
    env_file = directory / "env.sh"
    env_file.touch(mode=0o600)
    env_file.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
    state_file.write_text(json.dumps(state, indent=1))
    return state


def down(directory: Path) -> list[str]:
    """Stop every server of the stack in `directory` by its pid and delete its databases."""
    state_file = directory.resolve() / "stack.json"
    if not state_file.exists():
        return []
    state = json.loads(state_file.read_text())
    stopped = []
    for name, pid in reversed(state["pids"].items()):  # clients of postgres and s3 first
        if not alive(pid):
            continue
        # postgres: SIGINT is its "fast" shutdown; the others are process-group leaders.
        if name == "postgres":
            os.kill(pid, signal.SIGINT)
        else:
            os.killpg(pid, signal.SIGTERM)
        deadline = time.time() + 20
        while alive(pid) and time.time() < deadline:
            time.sleep(0.2)
        if alive(pid):
            (os.kill if name == "postgres" else os.killpg)(pid, signal.SIGKILL)
        stopped.append(name)
    if "postgres_root" in state:
        server_log = Path(state["postgres_root"]) / "data" / "server.log"
        if server_log.exists():
            shutil.copy(server_log, Path(state["dir"]) / "postgres.log")
        shutil.rmtree(state["postgres_root"], ignore_errors=True)
    state_file.unlink()
    (directory.resolve() / "env.sh").unlink(missing_ok=True)
    return stopped


SECRET_NAMES = ("PASSWORD", "SECRET", "AUTH_STRING")


def show(state: dict) -> str:
    end = state["endpoints"]
    env_file = Path(state["dir"]) / "env.sh"
    lines = [f"stack up in {state['seconds_to_start']}s (data in {state['dir']})",
             f"  MLflow:   {end['mlflow_url']}   (basic auth, user {MLFLOW_ADMIN})",
             f"  Prefect:  {end['prefect_api_url'].removesuffix('/api')}   (auth string)",
             f"  S3:       {end['s3_url']}   buckets {ARTIFACTS_BUCKET} (artifacts), {LANDING_BUCKET} (landing)",
             f"  Postgres: 127.0.0.1:{end['postgres_port']}   role {DB_ROLE}",
             "", f"Export the environment (credentials are only in that file): . {env_file}"]
    for line in env_file.read_text().splitlines():
        name = line.split()[1].split("=")[0]
        lines.append(f"  {name}=<secret>" if any(s in name for s in SECRET_NAMES) else "  " + line.split(" ", 1)[1])
    lines += ["", f"Then e.g.: llmrec serve --landing s3://{LANDING_BUCKET}/   |   stop: make stack-stop"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "buckets", "pg-bindir"])
    parser.add_argument("--dir", type=Path, default=Path(".stack"), help="throwaway folder of the stack")
    args = parser.parse_args()
    try:
        if args.command == "up":
            print(show(up(args.dir)))
        elif args.command == "down":
            stopped = down(args.dir)
            print(f"stopped {', '.join(stopped)}" if stopped else f"no stack running in {args.dir}")
        elif args.command == "buckets":
            create_buckets()
        else:
            print(pg_bindir())
    except StackError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
