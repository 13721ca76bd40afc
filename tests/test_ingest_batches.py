"""A landing events file validated and curated in record batches ends exactly as in one
batch: the same curated rows, manifest and failures; one bad row in a late batch
quarantines the whole file; a curate killed mid-file leaves nothing the next night reads."""

import numpy as np
import pandas as pd
import pytest

from llmrec import curate, ingest
from llmrec.config import Home
from llmrec.history import History

pytestmark = pytest.mark.slow
ROWS = 60
SMALL = 7  # rows per batch: 60 rows are 9 batches
ONE = 1_000  # every row in one batch


def events(rows: int = ROWS, night: int = 0) -> pd.DataFrame:
    hours = np.arange(rows) * 5 + night * 24 * 20  # a row every 5 hours: several days per file
    return pd.DataFrame({
        "user_id": [f"u{i % 9}" for i in range(rows)],
        "item_id": [f"i{i % 11}" for i in range(rows)],
        "rating": (np.arange(rows) % 5 + 1).astype("float64"),
        "timestamp": (pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(hours, unit="h")).astype(
            "datetime64[us, UTC]"),
    })


def landing_with(tmp_path, files: dict[str, pd.DataFrame]):
    landing = tmp_path / "landing"
    (landing / "items").mkdir(parents=True, exist_ok=True)
    (landing / "events").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"item_id": [f"i{i}" for i in range(11)], "title": [f"t{i}" for i in range(11)]}).to_parquet(
        landing / "items" / "items.parquet", index=False)
    for name, frame in files.items():
        frame.to_parquet(landing / "events" / name, index=False)
    return landing


def night(landing, home: Home, batch_rows: int) -> curate.CurateResult:
    return curate.validate_and_curate(home, ingest.ingest(str(landing), home), batch_rows=batch_rows)


def curated(home: Home) -> dict:
    manifest = ingest.read_manifest(home).drop(columns=["ingested_at", "quarantine_path", "mtime_ns", "source"])
    files = sorted(str(p.relative_to(home.events)) for p in home.events.rglob("*.parquet"))
    return {"events": ingest.read_events(home), "manifest": manifest, "files": files}


def assert_same(a: dict, b: dict):
    pd.testing.assert_frame_equal(a["events"], b["events"])
    pd.testing.assert_frame_equal(a["manifest"], b["manifest"])
    assert a["files"] == b["files"]


def test_batches_cover_the_file_in_order(tmp_path):
    landing = landing_with(tmp_path, {"e.parquet": events()})
    fs, files, _ = ingest.list_landing(str(landing))
    read = ingest.read_landing_file(fs, next(f for f in files if f.kind == "events"))
    batches = list(read.batches(SMALL))
    assert [len(b) for b in batches] == [SMALL] * (ROWS // SMALL) + [ROWS % SMALL]
    pd.testing.assert_frame_equal(pd.concat(batches, ignore_index=True), events())


def test_small_batches_curate_what_one_batch_curates(tmp_path):
    """Two nights, the second repeating rows of the first (dropped as duplicates) and
    sending one file twice under two names (the second copy dropped whole)."""
    ends = {}
    for batch_rows in (SMALL, ONE):
        root = tmp_path / str(batch_rows)
        home = Home(root / "home").ensure()
        landing = landing_with(root, {"first.parquet": events()})
        first = night(landing, home, batch_rows)
        second_rows = pd.concat([events(night=1), events().iloc[40:55]], ignore_index=True)
        landing_with(root, {"second.parquet": second_rows, "second-again.parquet": second_rows})
        second = night(landing, home, batch_rows)
        ends[batch_rows] = curated(home), first.summary(), second.summary()
    assert ends[SMALL][2]["rows_duplicate"] == 15 + len(events()) + 15
    assert_same(ends[SMALL][0], ends[ONE][0])
    assert ends[SMALL][1:] == ends[ONE][1:]


def test_failures_add_up_over_batches_as_in_one_batch(tmp_path):
    """Bad values in several batches, and a key repeated across batches (row 3 again as row
    50): the same failures, counts and examples as one batch."""
    frame = events()
    frame.loc[[2, 30, 58], "rating"] = [9.0, 0.0, 7.0]
    frame.loc[20, "user_id"] = " "
    frame.loc[45, "timestamp"] = pd.Timestamp("2100-01-01", tz="UTC")
    frame.loc[50, ["user_id", "item_id", "timestamp"]] = frame.loc[3, ["user_id", "item_id", "timestamp"]]
    results = {}
    for batch_rows in (SMALL, ONE):
        root = tmp_path / str(batch_rows)
        home = Home(root / "home").ensure()
        result = night(landing_with(root, {"bad.parquet": frame}), home, batch_rows)
        validation = next(v for v in result.validation if v["kind"] == "events")
        for failure in validation["failures"]:
            if failure["column"] == "timestamp":
                failure["rule"] = failure["rule"].split(" 2")[0]  # the night's own `now`
        results[batch_rows] = {k: v for k, v in validation.items() if k not in ("data_docs", "source")}
        assert result.rows_quarantined == ROWS and result.rows_curated == 0
    by_rule = {f["rule"]: f for f in results[SMALL]["failures"]}
    assert by_rule["(user_id, item_id, timestamp) unique"]["unexpected_count"] == 2
    assert by_rule["rating between 1.0 and 5.0"]["unexpected_count"] == 3
    assert results[SMALL] == results[ONE]


def test_one_bad_row_in_the_last_batch_quarantines_the_whole_file(tmp_path):
    frame = events()
    frame.loc[ROWS - 1, "rating"] = 9.0
    landing = landing_with(tmp_path, {"late-bad.parquet": frame})
    home = Home(tmp_path / "home").ensure()
    result = night(landing, home, SMALL)
    assert result.rows_curated == 0 and result.rows_quarantined == ROWS
    assert [q["file"] for q in result.files_quarantined] == ["events/late-bad.parquet"]
    assert not list(home.events.rglob("*.parquet"))
    copy = next(home.quarantine.iterdir()) / "late-bad.parquet"
    assert copy.read_bytes() == (landing / "events" / "late-bad.parquet").read_bytes()
    assert (landing / "events" / "late-bad.parquet").exists()
    entry = ingest.read_manifest(home).set_index("file").loc["events/late-bad.parquet"]
    assert entry["status"] == "quarantined" and entry["rows"] == ROWS


def test_a_curate_killed_mid_file_leaves_only_staging_which_is_set_aside(tmp_path, monkeypatch):
    landing = landing_with(tmp_path, {"e.parquet": events()})
    home = Home(tmp_path / "home").ensure()
    calls = []
    real = ingest.pq.ParquetWriter.write_table

    def die_on_third(self, table, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(self, table, *args, **kwargs)

    monkeypatch.setattr(ingest.pq.ParquetWriter, "write_table", die_on_third)
    with pytest.raises(KeyboardInterrupt):
        night(landing, home, SMALL)
    monkeypatch.undo()
    assert History.open(home).rows == 0 and ingest.read_manifest(home).empty
    assert list(home.events.glob(".staging-*/date=*/*.parquet"))
    moved = ingest.set_aside_unrecorded(home)
    assert [m.split("/")[1].startswith(".staging-") for m in moved] == [True]
    assert not list(home.events.glob(".staging-*"))
    redo = night(landing, home, SMALL)
    assert redo.rows_curated == ROWS and redo.rows_duplicate == 0
    assert len(ingest.read_events(home)) == ROWS
