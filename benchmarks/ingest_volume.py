"""Ingest, validation and curation of one big landing events file (issue 14, item 4).

    .venv/bin/python benchmarks/ingest_volume.py            # a 5,000,000-row file in batches, then in one batch
    .venv/bin/python benchmarks/ingest_volume.py --quick    # 200,000 rows in batches of 50k, then in one batch

A synthetic events file (MovieLens-25M-sized catalog: 160,000 users, 60,000 items with
texts, which land with it) is written into a fresh landing, one row group per day, and a
fresh LLMREC_HOME ingests it: `ingest.ingest` (listing, streamed checksum, Parquet footers)
then `curate.validate_and_curate` (the Great Expectations suites on every record batch of
`--batch-rows` rows, the duplicate check, the curated day files written batch by batch).
Each run is a fresh process, so its peak RSS is its own. The second run reads the whole
file in one batch, as ingestion did before it streamed (the whole file as one frame, one
GX run over it; before, the file's bytes were held too).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

FULL = dict(runs=[(5_000_000, None), (5_000_000, 5_000_000)], users=160_000, items=60_000, per_day=500_000)
QUICK = dict(runs=[(200_000, 50_000), (200_000, 200_000)], users=8_000, items=3_000, per_day=50_000)


def write_landing(landing: Path, rows: int, users: int, items: int, per_day: int, seed: int) -> None:
    """Items, users and one events file of `rows` rows, written a day (row group) at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from scale import Catalog

    catalog = Catalog(users, items, seed)
    for kind, frame in (("items", catalog.items), ("users", catalog.users)):
        (landing / kind).mkdir(parents=True, exist_ok=True)
        frame.to_parquet(landing / kind / f"{kind}.parquet", index=False)
    (landing / "events").mkdir(parents=True, exist_ok=True)
    writer = None
    for day in range(-(-rows // per_day)):
        count = min(per_day, rows - day * per_day)
        events = catalog.events(day, count)
        # Evenly spread distinct times within the day, so every (user, item, timestamp) is unique.
        start = pd.Timestamp("2020-01-01", tz="UTC") + pd.Timedelta(days=day)
        events["timestamp"] = (start + pd.to_timedelta(np.arange(count) * (86_400_000_000 // count), unit="us")
                               ).astype("datetime64[us, UTC]")
        table = pa.Table.from_pandas(events, preserve_index=False)
        writer = writer or pq.ParquetWriter(landing / "events" / "big.parquet", table.schema)
        writer.write_table(table)
    writer.close()


def one_run(landing: Path, work: Path, batch_rows: int) -> dict:
    """Ingest, validate and curate the landing into a fresh home, timed, with peak RSS."""
    from llmrec import curate, ingest
    from llmrec.config import Home
    from llmrec.history import History

    home = Home(Path(tempfile.mkdtemp(prefix="home-", dir=work))).ensure()
    common.release_memory()
    common.reset_peak_rss()
    start = time.perf_counter()
    batch = ingest.ingest(str(landing), home)
    opened = time.perf_counter() - start
    result = curate.validate_and_curate(home, batch, batch_rows=batch_rows)
    total = time.perf_counter() - start
    events = next(r for r in batch.reads if r.file.kind == "events")
    curated = History.open(home).rows
    if result.files_quarantined or curated != events.total_rows:
        raise SystemExit(f"the file was not curated whole ({curated:,} rows curated): {result.summary()}\n"
                         f"{result.validation_markdown}")
    return {"rows": events.total_rows, "batch_rows": batch_rows, "file_mb": events.file.size / 1e6,
            "ingest_s": opened, "validate_curate_s": total - opened, "total_s": total,
            "rows_per_s": events.total_rows / total, "peak_rss": common.peak_rss()}


def table(results: list[dict]) -> str:
    from llmrec.report import render_table

    return render_table([{
        "events rows": f"{r['rows']:,}", "rows per batch": f"{r['batch_rows']:,}", "file MB": f"{r['file_mb']:.0f}",
        "ingest s (list, checksum, footers)": f"{r['ingest_s']:.1f}",
        "validate + curate s": f"{r['validate_curate_s']:.1f}", "total s": f"{r['total_s']:.1f}",
        "rows/s": f"{r['rows_per_s']:,.0f}", "peak RSS": common.gib(r["peak_rss"])} for r in results])


def main() -> None:
    from llmrec.ingest import BATCH_ROWS

    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", help="events rows of each run's file (default 5M 5M; quick 200k 200k)")
    p.add_argument("--batch-rows", type=int, nargs="+",
                   help=f"rows per batch of each run (default {BATCH_ROWS:,}, then the whole file; quick 50k, 200k)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()), help="where landings and homes are built")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--one", nargs=2, help=argparse_hidden())
    args = p.parse_args()
    if args.one:
        common.quiet_logs()
        print("RESULT " + json.dumps(one_run(Path(args.one[0]), args.work, int(args.one[1]))), flush=True)
        return
    defaults = QUICK if args.quick else FULL
    rows = args.sizes or [n for n, _ in defaults["runs"]]
    batches = args.batch_rows or [b or BATCH_ROWS for _, b in defaults["runs"]]
    if len(rows) != len(batches):
        raise SystemExit(f"--sizes ({len(rows)} values) and --batch-rows ({len(batches)} values) must pair up")
    common.print_machine()
    work = Path(tempfile.mkdtemp(prefix="llmrec-ingest-volume-", dir=args.work))
    results = []
    for count, batch_rows in zip(rows, batches):
        landing = work / f"landing-{count}"
        if not landing.exists():
            start = time.perf_counter()
            write_landing(landing, count, defaults["users"], defaults["items"], defaults["per_day"], args.seed)
            print(f"{count:,} rows: landing written in {time.perf_counter() - start:.0f} s", flush=True)
        command = [sys.executable, __file__, "--one", str(landing), str(batch_rows), "--work", str(work)]
        run = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode or not lines:
            sys.stderr.write(run.stdout[-4000:] + run.stderr[-4000:])
            raise SystemExit(f"{count} rows in batches of {batch_rows}: the run failed (exit {run.returncode})")
        results.append(json.loads(lines[-1][len("RESULT "):]))
        print(table(results[-1:]).splitlines()[-1], flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(results))


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
