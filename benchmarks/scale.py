"""How the cost of one night grows with the history (issue 14, items 2 and 3).

    .venv/bin/python benchmarks/scale.py            # histories of 1M, 3M, 10M events; 160k users, 60k items; 100k new
    .venv/bin/python benchmarks/scale.py --quick    # histories of 100k, 300k; 8k users, 3k items; 10k new

For each history size, in a fresh process (so its peak RSS is its own):

1. A synthetic history is written into a fresh LLMREC_HOME with the curate stage's own
   writer (`llmrec.ingest.curate`), one ingest sequence per night of `--new` events, over
   a catalog with texts (`llmrec.data.synthetic`'s item and user generators: titles,
   genres, descriptions; ages, occupations) and ratings from latent tastes.
2. A champion is registered in MLflow that has seen all of it: trained on a sample of
   the history, its vocabularies grown to the whole catalog, its watermark at the last
   ingest sequence. Not timed, and neither is encoding the catalog texts: they are in the
   text cache before the night (`--cache`, shared by the sizes), as they would be after
   the first night in production.
3. One landing file of `--new` events arrives and the real flow (`nightly_retrain`) runs:
   ingest, validate and curate, load, drift, window, fine-tune, evaluate, register and gate. Each
   stage's wall time and the peak RSS of the process during it come from the flow's own
   progress lines (one per stage); landing-to-champion is the whole flow call.

The table gives those figures per size and the ratio of each night to the smallest
size's night: the target is <= 2x from 1M to 10M, and peak RSS <= 8 GiB at 10M.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

STAGES = ("ingest", "validate", "load", "drift", "window", "fine-tune", "evaluate", "register")
FULL = dict(sizes=[1_000_000, 3_000_000, 10_000_000], users=160_000, items=60_000, new=100_000)
QUICK = dict(sizes=[100_000, 300_000], users=8_000, items=3_000, new=10_000)


class Catalog:
    """Items and users with texts, plus the latent factors ratings are drawn from."""

    def __init__(self, users: int, items: int, seed: int):
        from llmrec.data.synthetic import _items, _users

        rng = np.random.default_rng(seed)
        self.items, self.genre_weights, self.quality, log_popularity = _items(rng, items)
        self.users, self.tastes, self.bias, activity = _users(rng, users)
        self.item_p = np.exp(log_popularity - log_popularity.max())
        self.item_p /= self.item_p.sum()
        self.user_p = activity / activity.sum()
        self.item_ids = self.items["item_id"].to_numpy()
        self.user_ids = self.users["user_id"].to_numpy()
        self.seed = seed

    def events(self, night: int, count: int) -> pd.DataFrame:
        """`count` ratings of night `night` (deterministic in the seed and the night)."""
        from llmrec.data.synthetic import MEAN_RATING

        rng = np.random.default_rng([self.seed, night])
        user = rng.choice(len(self.user_ids), size=count, p=self.user_p)
        item = rng.choice(len(self.item_ids), size=count, p=self.item_p)
        signal = (MEAN_RATING + self.bias[user] + self.quality[item]
                  + np.einsum("ij,ij->i", self.tastes[user], self.genre_weights[item]))
        rating = np.clip(np.round(signal + rng.normal(0.0, 0.5, size=count)), 1, 5)
        seconds = np.sort(rng.integers(0, 86_400, size=count))
        start = pd.Timestamp("2020-01-01", tz="UTC") + pd.Timedelta(days=night)
        return pd.DataFrame({
            "user_id": self.user_ids[user], "item_id": self.item_ids[item], "rating": rating.astype("float64"),
            "timestamp": (start + pd.to_timedelta(seconds, unit="s")).astype("datetime64[us, UTC]"),
            "event_id": [f"n{night}-{n}" for n in range(count)],
        })


def landing_read(kind: str, name: str, frame: pd.DataFrame):
    from llmrec.ingest import LandingFile, LandingRead

    checksum = hashlib.sha256(f"{kind}/{name}/{len(frame)}".encode()).hexdigest()
    return LandingRead.in_memory(LandingFile(name=f"{kind}/{name}.parquet", kind=kind, size=0, mtime_ns=0,
                                             uri=f"history://{kind}/{name}.parquet"), checksum, frame)


def write_history(home, catalog: Catalog, total: int, per_night: int) -> int:
    """`total` events as nights of `per_night`, through the curate stage's writer; returns
    the last ingest sequence."""
    from llmrec.ingest import curate

    nights = -(-total // per_night)
    for night in range(1, nights + 1):
        count = min(per_night, total - (night - 1) * per_night)
        reads = [landing_read("events", f"night-{night:04d}", catalog.events(night, count))]
        if night == 1:
            reads = [landing_read("items", "catalog", catalog.items), landing_read("users", "profiles", catalog.users)] + reads
        curate(home, reads, [], night)
    return nights


def register_champion(home, config, catalog: Catalog, sample_rows: int) -> str:
    """A champion that has seen the whole history: trained one epoch on a sample of it,
    vocabularies grown to the whole catalog, watermark at the newest ingest sequence."""
    import mlflow
    from mlflow import MlflowClient

    from llmrec import registry
    from llmrec.encoder import TextCache, load_encoder
    from llmrec.history import History
    from llmrec.ingest import read_catalog_texts
    from llmrec.model import grow, new_checkpoint, save
    from llmrec.scoring import Scorer
    from llmrec.train import fit

    encoder = load_encoder(config.model.encoder)
    history = History.open(home)
    texts = read_catalog_texts(home)
    cache = TextCache.for_model(home.cache, encoder, config.model)
    checkpoint = new_checkpoint(encoder, config.model, config.training.seed)
    sample = history.sample_older(history.watermark, sample_rows, seed=1)
    fit(checkpoint, cache, sample, texts, config.training.model_copy(update={"epochs": 1}))
    grow(checkpoint, catalog.user_ids, catalog.item_ids, config.training.seed)
    checkpoint.ingest_watermark = history.watermark
    scorer = Scorer.from_checkpoint(checkpoint, cache, texts)
    folder = save(checkpoint, home.runs / "bootstrap" / "checkpoint", *scorer.vectors())
    registry.configure(home, config.experiment)
    example = sample.head(5)[["user_id", "item_id"]].reset_index(drop=True)
    with mlflow.start_run(run_name="bootstrap"):
        version = registry.log_model_version(
            config.registered_model, folder, str(registry.PYFUNC_MODEL), example,
            pd.DataFrame({"prediction": scorer.predict(example["user_id"], example["item_id"])}),
            registry.PIP_REQUIREMENTS, code_paths=[str(registry.PYFUNC_MODEL.parent)])
    MlflowClient().set_registered_model_alias(config.registered_model, registry.CHAMPION, version)
    return version


class StageClock(logging.Handler):
    """Turns the flow's progress lines (one at the end of each stage) into per-stage wall
    time and peak RSS."""

    def __init__(self):
        super().__init__()
        self.rows: dict[str, dict] = {}
        self.last = time.perf_counter()

    def start(self) -> None:
        common.release_memory()
        common.reset_peak_rss()
        self.last = time.perf_counter()

    def emit(self, record: logging.LogRecord) -> None:
        words = record.getMessage().split()
        stage = words[1].rstrip(":") if len(words) > 1 else ""
        if stage not in STAGES:
            return
        now = time.perf_counter()
        self.rows[stage] = {"seconds": now - self.last, "peak_rss": common.peak_rss()}
        common.reset_peak_rss()
        self.last = now


def one_size(size: int, args) -> dict:
    """Build a history of `size` events, register its champion, time one night."""
    work = Path(tempfile.mkdtemp(prefix=f"llmrec-scale-{size}-", dir=args.work))
    # The flow starts a temporary Prefect server; its database lives with this run.
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from llmrec.config import Home, NightlyConfig

    home = Home(work / "home").ensure()
    args.cache.mkdir(parents=True, exist_ok=True)
    home.cache.symlink_to(args.cache.resolve(), target_is_directory=True)
    config = NightlyConfig.from_sources(None, [f"model.encoder={args.encoder}"] + args.set,
                                        landing=str(work / "landing"), home=str(home.root))
    catalog = Catalog(args.users, args.items, args.seed)
    start = time.perf_counter()
    last_seq = write_history(home, catalog, size, args.new)
    build = time.perf_counter() - start
    start = time.perf_counter()
    register_champion(home, config, catalog, min(size, args.champion_sample or args.new))
    bootstrap = time.perf_counter() - start

    landing = work / "landing" / "events"
    landing.mkdir(parents=True)
    catalog.events(last_seq + 1, args.new).to_parquet(landing / "tonight.parquet", index=False)

    from flows.nightly import nightly_retrain

    clock = StageClock()
    progress = logging.getLogger("llmrec.progress")
    progress.addHandler(clock)
    clock.start()
    start = time.perf_counter()
    summary = nightly_retrain(config=config)
    total = time.perf_counter() - start
    progress.removeHandler(clock)
    missing = [s for s in STAGES if s not in clock.rows]
    if missing or summary["status"] != "registered":
        raise SystemExit(f"history {size}: the night did not run every stage (missing {missing}): {summary['note']}")
    return {"history": size, "files": len(list(home.events.rglob("*.parquet"))), "build_s": build,
            "bootstrap_s": bootstrap, "landing_to_champion_s": total,
            "stages": clock.rows, "peak_rss": max(r["peak_rss"] for r in clock.rows.values()),
            "window": summary["window"], "decision": summary["decision"]["alias"] if summary["decision"] else None}


def history_reads(root: Path, ranked_users: int, seed: int) -> dict:
    """What a night reads from an existing home's history, each read timed alone with its
    peak RSS: the newest ingest sequence plays tonight's rows, replay asks for half of them."""
    from llmrec.config import Home
    from llmrec.history import History

    figures: dict = {"home": str(root)}

    def measured(name, read):
        common.release_memory()
        common.reset_peak_rss()
        start = time.perf_counter()
        value = read()
        figures[name] = {"seconds": time.perf_counter() - start, "peak_rss": common.peak_rss()}
        return value

    history = measured("open (footers)", lambda: History.open(Home(root)))
    tonight = measured("new rows", lambda: history.new_rows(history.watermark - 1))
    measured("replay sample", lambda: history.sample_older(history.watermark - 1, len(tonight) // 2, seed))
    users = tonight["user_id"].drop_duplicates().head(ranked_users)
    measured("seen pairs", lambda: history.pairs(users))
    figures["history"], figures["tonight"], figures["users"] = history.rows, len(tonight), len(users)
    return figures


def reads_table(results: list[dict]) -> str:
    from llmrec.report import render_table

    rows = []
    for r in results:
        row = {"history": f"{r['history']:,}", "tonight": f"{r['tonight']:,}", "ranked users": f"{r['users']:,}"}
        for name in ("open (footers)", "new rows", "replay sample", "seen pairs"):
            row[f"{name} s"] = f"{r[name]['seconds']:.2f}"
            row[f"{name} peak"] = common.gib(r[name]["peak_rss"])
        rows.append(row)
    return render_table(rows)


def table(results: list[dict]) -> str:
    from llmrec.report import render_table

    base = results[0]
    rows = []
    for r in results:
        row = {"history": f"{r['history']:,}", "files": r["files"]}
        for stage in STAGES:
            # The first progress line comes after the flow has started (a temporary Prefect
            # server when PREFECT_API_URL is unset) and ingested.
            label = "flow start + ingest s" if stage == "ingest" else f"{stage} s"
            row[label] = f"{r['stages'][stage]['seconds']:.1f}"
        row["landing->champion s"] = f"{r['landing_to_champion_s']:.1f}"
        row["x smallest"] = f"{r['landing_to_champion_s'] / base['landing_to_champion_s']:.2f}"
        row["peak RSS"] = common.gib(r["peak_rss"])
        row["peak stage"] = max(STAGES, key=lambda s: r["stages"][s]["peak_rss"])
        rows.append(row)
    return render_table(rows)


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", help="history sizes in events (default 1M 3M 10M; quick 100k 300k)")
    p.add_argument("--users", type=int, help="catalog users (default 160,000; quick 8,000)")
    p.add_argument("--items", type=int, help="catalog items (default 60,000; quick 3,000)")
    p.add_argument("--new", type=int, help="events landing tonight, and per night of history (default 100,000; quick 10,000)")
    p.add_argument("--champion-sample", type=int, help="history rows the champion is trained on (default: --new)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()), help="where the homes are built")
    p.add_argument("--set", action="append", default=[], help="NightlyConfig override KEY=VALUE (repeatable)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--reads", type=Path, nargs="+",
                   help="only time the history reads of a night on these existing homes (built by a run)")
    p.add_argument("--one", type=int, help=argparse_hidden())
    args = p.parse_args()
    if args.reads:
        common.print_machine()
        print(reads_table([history_reads(home, 5_000, args.seed) for home in args.reads]))
        return
    defaults = QUICK if args.quick else FULL
    for key in ("sizes", "users", "items", "new"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.one is not None:
        common.quiet_logs()
        print("RESULT " + json.dumps(one_size(args.one, args)), flush=True)
        return
    common.print_machine()
    results = []
    for size in args.sizes:
        command = [sys.executable, __file__, "--one", str(size)] + [a for a in sys.argv[1:]]
        print(f"history {size:,}: building, bootstrapping a champion, running one night ...", flush=True)
        run = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode or not lines:
            sys.stderr.write(run.stdout[-4000:] + run.stderr[-4000:])
            raise SystemExit(f"history {size}: the run failed (exit {run.returncode})")
        result = json.loads(lines[-1][len("RESULT "):])
        results.append(result)
        print(f"  built in {result['build_s']:.0f} s, champion in {result['bootstrap_s']:.0f} s; "
              f"night {result['landing_to_champion_s']:.1f} s, peak RSS {common.gib(result['peak_rss'])}", flush=True)
        print(table([result]).splitlines()[-1], flush=True)
        if args.json:
            # Written after every size, so a long run that is stopped keeps what it measured.
            args.json.write_text(json.dumps(results, indent=1))
    print()
    print(table(results))
    largest, smallest = results[-1], results[0]
    ratio = largest["landing_to_champion_s"] / smallest["landing_to_champion_s"]
    print(f"\nnight on {largest['history']:,} vs {smallest['history']:,} events: {ratio:.2f}x (target <= 2x); "
          f"peak RSS at {largest['history']:,}: {common.gib(largest['peak_rss'])} (target <= 8 GiB)")


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
