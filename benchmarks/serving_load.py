"""Load test, side by side in one run (issue 10, item 6): `llmrec api` and MLflow's own
scoring server (`mlflow models serve -m models:/llmrec@champion --env-manager local`) on the
same registry, driven by the same bounded request mix.

    .venv/bin/python benchmarks/serving_load.py                 # 10 s per cell
    .venv/bin/python benchmarks/serving_load.py --quick         # 3 s per cell, 1 epoch

A throwaway LLMREC_HOME is built from MovieLens-100k (curated catalog and events, three
registered versions of one trained checkpoint, `champion` on version 1). Both servers bind
127.0.0.1 on free ports with the same number of worker processes and run in their own
process groups, stopped at the end. The load generator is an async aiohttp client with a fixed
concurrency (1, 8, 32) and a fixed duration per cell, one server at a time. (An httpx client
was the bottleneck before: against the same 2-worker API it managed 540 requests/s at
concurrency 8 and 220 at 32, where aiohttp drove 920-1,050 and 1,050-1,290.)

  scores   POST 100 random (user, item) pairs; API /v1/scores, MLflow /invocations
  top10    one random user's top-10; API GET /v1/users/{id}/recommendations?k=10 (rated items
           excluded), MLflow /invocations with params {"k": 10} (the pyfunc's Scorer.top_k)

Phase 2 keeps 8 concurrent mixed requests on the API for --swap-seconds while the champion
alias moves 1 -> 2 -> 3, and counts errors, responses per version, responses whose version
was never champion during the phase, and how long each move took to show up (poll 1 s).
MLflow's server loads the alias once at start, so it has no phase 2.
Memory: resident set size of each API worker process after the load.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

import aiohttp  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402

from llmrec.config import Home, ModelConfig, TrainingConfig  # noqa: E402
from llmrec.encoder import TextCache  # noqa: E402
from llmrec.ingest import upsert, write_atomic  # noqa: E402
from llmrec.model import new_checkpoint, save  # noqa: E402
from llmrec.report import render_table  # noqa: E402
from llmrec.schema import CatalogTexts  # noqa: E402
from llmrec.scoring import Scorer  # noqa: E402
from llmrec.train import fit  # noqa: E402

NAME = "llmrec"
VENV_BIN = Path(sys.executable).parent
TARGETS = ("0 errors (also during alias moves); llmrec api >= 2x MLflow requests/s on scores at concurrency 8; "
           "top-10 p99 <= 25 ms at concurrency 8")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_home(root: Path, args) -> tuple[Home, list[str], list[str]]:
    """Curated MovieLens in `root`, and versions 1-3 of one trained checkpoint registered."""
    import mlflow
    from mlflow import MlflowClient

    from llmrec.registry import PIP_REQUIREMENTS, PYFUNC_MODEL, configure, log_model_version, recommender_signature

    data = common.load_data(args.data, args.rows)
    home = Home(root).ensure()
    items = pd.DataFrame({"item_id": list(data.item_texts), "title": list(data.item_texts.values())})
    users = pd.DataFrame({"user_id": list(data.user_texts), "profile": list(data.user_texts.values())})
    upsert(home.items, items, "item_id")
    upsert(home.users, users, "user_id")
    events = data.events.assign(_ingest_seq=1)
    write_atomic(pa.Table.from_pandas(events, preserve_index=False), home.events / "date=1998-01-01" / "part-0.parquet")
    encoder = common.load_encoder(args.encoder)
    config = ModelConfig(encoder=args.encoder)
    cache = TextCache.for_model(args.cache, encoder, config)
    texts = CatalogTexts(users=data.user_texts, items=data.item_texts)
    checkpoint = new_checkpoint(encoder, config, args.seed)
    fit(checkpoint, cache, data.events, texts, TrainingConfig(epochs=1, seed=args.seed))
    folder = save(checkpoint, root / "checkpoint", *Scorer.from_checkpoint(checkpoint, cache, texts).vectors())
    configure(home, NAME)
    example = data.events[["user_id", "item_id"]].head(3)
    output = pd.DataFrame({"prediction": Scorer.load(folder).predict(example["user_id"], example["item_id"])})
    for _ in range(3):
        with mlflow.start_run():
            log_model_version(NAME, folder, str(PYFUNC_MODEL), example, output, PIP_REQUIREMENTS,
                              code_paths=[str(PYFUNC_MODEL.parent)], signature=recommender_signature(example, output))
    MlflowClient().set_registered_model_alias(NAME, "champion", "1")
    return home, sorted(data.user_texts), sorted(data.item_texts)


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_ready(url: str, headers: dict, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited ({process.returncode}); see {log}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:  # refused, or an HTTP error status while the model loads
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready after {timeout:.0f} s; see {log}")


class Side:
    """How one server is asked for the two request kinds."""

    def __init__(self, name: str, base: str, headers: dict, users: list[str], items: list[str]):
        self.name, self.base, self.headers, self.users, self.items = name, base, headers, users, items

    def request(self, kind: str, rng: random.Random) -> tuple[str, str, dict | None]:
        if kind == "scores":
            pairs = [(rng.choice(self.users), rng.choice(self.items)) for _ in range(100)]
            if self.name == "llmrec api":
                return "POST", "/v1/scores", {"pairs": [{"user_id": u, "item_id": i} for u, i in pairs]}
            return "POST", "/invocations", {"dataframe_split": {"columns": ["user_id", "item_id"],
                                                                 "data": [list(p) for p in pairs]}}
        user = rng.choice(self.users)
        if self.name == "llmrec api":
            return "GET", f"/v1/users/{user}/recommendations?k=10", None
        return "POST", "/invocations", {"dataframe_split": {"columns": ["user_id"], "data": [[user]]},
                                        "params": {"k": 10}}


async def drive(side: Side, kinds: list[str], concurrency: int, seconds: float, seed: int,
                during=None) -> dict:
    """`concurrency` clients send requests back to back for `seconds`; returns latencies,
    errors and the version of each API response."""
    latencies, errors, versions, stamps = [], [], [], []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base_url=side.base, headers=side.headers, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        end = time.perf_counter() + seconds

        async def worker(index: int):
            rng = random.Random(seed * 1000 + index)
            while time.perf_counter() < end:
                method, path, body = side.request(rng.choice(kinds), rng)
                start = time.perf_counter()
                try:
                    async with session.request(method, path, json=body) as response:
                        status, payload = response.status, await response.read()
                except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                    status, payload = repr(error), b""
                latencies.append(time.perf_counter() - start)
                if status != 200:
                    errors.append(str(status))
                elif side.name == "llmrec api":
                    versions.append(json.loads(payload).get("version"))
                    stamps.append(time.perf_counter())

        tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
        if during is not None:
            await during()
        await asyncio.gather(*tasks)
    return {"latencies": latencies, "errors": errors, "versions": versions, "stamps": stamps, "seconds": seconds}


def summary(result: dict) -> dict:
    lat = sorted(result["latencies"])

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")

    return {"req/s": len(lat) / result["seconds"], "p50 ms": pct(0.50), "p95 ms": pct(0.95), "p99 ms": pct(0.99),
            "errors": len(result["errors"])}


def worker_rss(parent_pid: int) -> list[float]:
    import psutil

    parent = psutil.Process(parent_pid)
    # With --workers N uvicorn spawns N worker processes (plus a resource tracker, skipped);
    # with one worker the parent serves.
    workers = [p for p in parent.children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    return sorted(p.memory_info().rss / 2**20 for p in workers or [parent])


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--seconds", type=float, default=None, help="seconds per cell (default 10, --quick 3)")
    p.add_argument("--workers", type=int, default=2, help="worker processes of each server")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--swap-seconds", type=float, default=None, help="phase 2 duration (default 15, --quick 8)")
    args = p.parse_args(argv)
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    swap_seconds = args.swap_seconds or (8.0 if args.quick else 15.0)
    common.print_machine()
    work = Path(tempfile.mkdtemp(prefix="llmrec-load-"))
    home, users, items = build_home(work / "home", args)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {"LLMREC_HOME": str(home.root), "HF_HUB_OFFLINE": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            # mlflow models serve runs `uvicorn` from PATH.
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    from llmrec.keys import KeyStore, keys_file

    key = KeyStore(keys_file(home.root)).create("load-test", "read")
    api_port, mlflow_port = free_port(), free_port()
    api = start([str(VENV_BIN / "llmrec"), "api", "--home", str(home.root), "--port", str(api_port),
                 "--workers", str(args.workers), "--poll", "1"], env, work / "api.log")
    # One intra-op thread for MLflow's workers too, as `llmrec api` sets for its own: the same
    # footing, and the faster setting for both on small per-request products.
    mlflow_env = env | {"MLFLOW_TRACKING_URI": home.mlflow_uri(), "OMP_NUM_THREADS": "1"}
    mlflow_server = start([str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion",
                           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(mlflow_port),
                           "-w", str(args.workers)], mlflow_env, work / "mlflow.log")
    results: dict = {}
    try:
        api_side = Side("llmrec api", f"http://127.0.0.1:{api_port}", {"X-API-Key": key}, users, items)
        mlflow_side = Side("mlflow models serve", f"http://127.0.0.1:{mlflow_port}", {}, users, items)
        wait_ready(api_side.base + "/readyz", api_side.headers, api, work / "api.log")
        wait_ready(mlflow_side.base + "/ping", {}, mlflow_server, work / "mlflow.log")
        # This process imported torch, pandas and MLflow to build the home: a full garbage
        # collection over that heap pauses the load generator (every request in flight looks
        # 50-100 ms slower). Freeze what exists now; requests only make short-lived garbage.
        gc.collect()
        gc.freeze()
        # Warm both (first requests load lazily-built pieces).
        for side in (api_side, mlflow_side):
            asyncio.run(drive(side, ["scores", "top10"], 2, 2.0, 99))
        rows = []
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            for kind in ("scores", "top10"):
                cell = {}
                for side in (api_side, mlflow_side):
                    cell[side.name] = summary(asyncio.run(drive(side, [kind], concurrency, seconds, concurrency)))
                    rows.append({"requests": kind, "concurrency": concurrency, "server": side.name, **cell[side.name]})
                ratio = cell["llmrec api"]["req/s"] / max(cell["mlflow models serve"]["req/s"], 1e-9)
                rows[-2]["api/mlflow req/s"] = ratio
                print(f"  {kind} c={concurrency}: api {cell['llmrec api']['req/s']:.0f} req/s, "
                      f"mlflow {cell['mlflow models serve']['req/s']:.0f} req/s", flush=True)
        results["rows"] = rows
        rss = worker_rss(api.pid)

        # Phase 2: the alias moves twice under load.
        from mlflow import MlflowClient

        import mlflow

        mlflow.set_tracking_uri(home.mlflow_uri())
        moves: list[tuple[str, float]] = []

        async def move_alias():
            for version in ("2", "3"):
                await asyncio.sleep(swap_seconds / 3)
                MlflowClient().set_registered_model_alias(NAME, "champion", version)
                moves.append((version, time.perf_counter()))

        swap = asyncio.run(drive(api_side, ["scores", "top10"], 8, swap_seconds, 7, during=move_alias))
        counts = pd.Series(swap["versions"]).value_counts().sort_index().to_dict()
        foreign = sum(1 for v in swap["versions"] if v not in {"1", "2", "3"})
        delays = []
        for version, moved in moves:
            first = next((t for v, t in zip(swap["versions"], swap["stamps"]) if v == version and t >= moved), None)
            delays.append(f"v{version}: {first - moved:.2f} s" if first else f"v{version}: not seen")
        phase2 = {"requests": len(swap["latencies"]), "errors": len(swap["errors"]), "responses per version": counts,
                  "responses of a version never champion": foreign, "alias move -> first response": ", ".join(delays)}
        results["phase2"] = phase2
    finally:
        stop(api)
        stop(mlflow_server)

    def fmt(value, column):
        if isinstance(value, float):
            return f"{value:.2f}x" if column == "api/mlflow req/s" else f"{value:.1f}"
        return "" if value is None else str(value)

    print()
    print(render_table(rows, ["requests", "concurrency", "server", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors",
                              "api/mlflow req/s"], fmt=fmt))
    print()
    print("alias moves under load (llmrec api, concurrency 8, 1 -> 2 -> 3): "
          + "; ".join(f"{k}: {v}" for k, v in phase2.items()))
    print(f"llmrec api worker RSS (MiB, {args.workers} workers): {', '.join(f'{r:.0f}' for r in rss)}")
    print("targets: " + TARGETS)
    scores8 = [r for r in rows if r["requests"] == "scores" and r["concurrency"] == 8]
    top8 = [r for r in rows if r["requests"] == "top10" and r["concurrency"] == 8 and r["server"] == "llmrec api"]
    if scores8 and top8:
        checks = {
            "0 errors": sum(r["errors"] for r in rows) + phase2["errors"] == 0,
            "api >= 2x mlflow req/s, scores c=8": scores8[0]["api/mlflow req/s"] >= 2,
            "api top-10 p99 <= 25 ms at c=8": top8[0]["p99 ms"] <= 25,
        }
        for name, passed in checks.items():
            print(f"  {'met' if passed else 'MISSED'}: {name}")
    results["worker_rss_mib"] = rss
    return results


if __name__ == "__main__":
    main()
