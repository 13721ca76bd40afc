"""What an API worker reads of the history when it loads a model: every user's rated items
(excluded from their recommendations) and the items' popularity order.

    .venv/bin/python benchmarks/serving_history.py            # 10,000,000 curated events
    .venv/bin/python benchmarks/serving_history.py --quick    # 200,000

A synthetic curated history (the catalog of benchmarks/scale.py: 160,000 users, 60,000
items; one file per day, as ingest writes them) is read twice, each in a fresh process so
its peak RSS is its own: `frame`, the whole history as one pandas frame grouped by user (what
`serving.build_served_model` did before), and `scan`, `History.rated_positions` with the
counts taken from the same positions (what it does now: the two id columns scanned batch by
batch, once). Both must give the same rated sets and counts (checked by a digest). Peak RSS is counted above what the
process held after its imports.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

FULL = dict(rows=10_000_000, users=160_000, items=60_000, per_day=500_000)
QUICK = dict(rows=200_000, users=8_000, items=3_000, per_day=50_000)


def write_history(home_root: Path, rows: int, users: int, items: int, per_day: int, seed: int = 0) -> list[str]:
    """Curated event files of `rows` rows, one per day, in `home_root`; returns the item ids."""
    from scale import Catalog

    from llmrec.config import Home

    catalog, events_dir = Catalog(users, items, seed), Home(home_root).events
    for day in range(-(-rows // per_day)):
        count = min(per_day, rows - day * per_day)
        frame = catalog.events(day, count)
        start = pd.Timestamp("2020-01-01", tz="UTC") + pd.Timedelta(days=day)
        frame["timestamp"] = start + pd.to_timedelta(np.arange(count) * (86_400_000_000 // count), unit="us")
        frame["_ingest_seq"] = day + 1
        folder = events_dir / f"date={start.date()}"
        folder.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(folder / "part-0.parquet", index=False)
    return list(catalog.item_ids)


def digest(rated: dict, counts: pd.Series) -> str:
    h = hashlib.sha256()
    for user in sorted(rated):
        h.update(user.encode() + np.sort(np.asarray(rated[user], dtype=np.int64)).tobytes())
    h.update(counts.sort_index().to_json().encode())
    return h.hexdigest()[:16]


def measure(mode: str, home_root: Path, items_file: Path) -> dict:
    from llmrec.config import Home
    from llmrec.history import History
    from llmrec.ingest import read_events

    item_ids = json.loads(items_file.read_text())
    index = {item: i for i, item in enumerate(item_ids)}
    home = Home(home_root)
    common.release_memory()
    common.reset_peak_rss()  # the peak of the read, not of the imports before it
    imports = common.status_kib("VmRSS") * 1024
    started = time.perf_counter()
    if mode == "frame":
        events = read_events(home)[["user_id", "item_id"]]
        events = events[events["item_id"].isin(index)]
        positions = events["item_id"].map(index).to_numpy(dtype=np.int64)
        rated = {user: positions[rows] for user, rows in events.groupby("user_id").indices.items()}
        counts = events["item_id"].value_counts()
    else:
        rated = History.open(home).rated_positions(item_ids)
        counts = History.rated_counts(rated, item_ids)
    seconds = time.perf_counter() - started
    return {"mode": mode, "seconds": seconds, "peak_rss": common.peak_rss() - imports, "users": len(rated),
            "digest": digest(rated, counts.rename(None).rename_axis(None))}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200,000 events")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--items", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.home, args.items)))
        return []
    settings = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="serving-history-") as work:
        started = time.perf_counter()
        items = write_history(Path(work) / "home", **settings)
        (Path(work) / "items.json").write_text(json.dumps(items))
        print(f"wrote {settings['rows']:,} curated events in {time.perf_counter() - started:.0f} s", flush=True)
        results = []
        for mode in ("frame", "scan"):
            run = subprocess.run([sys.executable, __file__, "--measure", mode, "--home", str(Path(work) / "home"),
                                  "--items", str(Path(work) / "items.json")], capture_output=True, text=True)
            if run.returncode:
                raise SystemExit(run.stderr[-3000:])
            results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    if results[0]["digest"] != results[1]["digest"]:
        raise SystemExit(f"the two reads disagree: {results}")
    from llmrec.report import render_table

    frame = results[0]
    print(render_table([{"read": r["mode"], "events": f"{settings['rows']:,}", "users": r["users"],
                         "seconds": f"{r['seconds']:.1f}", "peak RSS above the imports": common.gib(r["peak_rss"]),
                         "RSS vs frame": f"{r['peak_rss'] / frame['peak_rss']:.2f}x"} for r in results]))
    return results


if __name__ == "__main__":
    main()
