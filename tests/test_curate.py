"""Validate-and-curate over hostile landings: every entry gets an outcome, no key is
curated twice, names of any legal length, and a curate killed before its manifest."""

import os

import pandas as pd
import pytest

from llmrec import curate, ingest
from llmrec.config import Home
from llmrec.data import copy_drop, synthetic_drops

KEY = ["user_id", "item_id", "timestamp"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def drops(tmp_path_factory):
    folder = tmp_path_factory.mktemp("drops")
    return folder, synthetic_drops(folder, users=30, items=40, days=3, seed=2)


@pytest.fixture
def world(tmp_path, drops):
    folder, tags = drops
    landing, home = tmp_path / "landing", Home(tmp_path / "home").ensure()
    copy_drop(folder, tags[0], landing)
    return landing, home, tags


def night(landing, home) -> curate.CurateResult:
    return curate.validate_and_curate(home, ingest.ingest(str(landing), home))


def events_file(landing, tag):
    return landing / "events" / f"events-{tag}.parquet"


def assert_conserved(result: curate.CurateResult):
    assert result.rows_in == result.rows_curated + result.rows_quarantined + result.rows_duplicate


def assert_unique_and_consistent(home: Home):
    events = ingest.read_events(home)
    assert not events.duplicated(KEY).any()
    manifest = ingest.read_manifest(home)
    curated = manifest[(manifest["kind"] == "events") & (manifest["status"] == "curated")]
    assert int(curated["rows"].sum()) == len(events)
    assert set(events["_ingest_seq"]) <= set(manifest["ingest_seq"])


def test_duplicates_across_files_and_nights_are_dropped_and_counted(world, drops):
    landing, home, tags = world
    first = night(landing, home)
    assert first.rows_duplicate == 0 and first.rows_curated > 0
    original = pd.read_parquet(events_file(landing, tags[0]))
    # The same rows again under another name, next night; and within one batch, a second
    # drop delivered twice under two names.
    original.to_parquet(landing / "events" / "resent.parquet", index=False)
    copy_drop(drops[0], tags[1], landing)
    second_day = pd.read_parquet(events_file(landing, tags[1]))
    second_day.iloc[:10].to_parquet(landing / "events" / "zz-partial-copy.parquet", index=False)
    second = night(landing, home)
    assert second.rows_duplicate == len(original) + 10
    assert second.rows_curated == len(second_day)
    assert_conserved(second)
    assert_unique_and_consistent(home)
    manifest = ingest.read_manifest(home).set_index("file")
    assert manifest.loc["events/resent.parquet", "duplicates"] == len(original)
    assert manifest.loc["events/resent.parquet", "rows"] == 0
    assert "duplicates dropped" in __import__("llmrec.report", fromlist=["x"]).run_report(
        "r", ingest.IngestResult([], [], 0), second)


def test_a_255_byte_name_is_curated_and_quarantined_without_a_crash(world):
    landing, home, tags = world
    good = pd.read_parquet(events_file(landing, tags[0]))
    long_good = "g" * 247 + ".parquet"
    long_bad = "b" * 247 + ".parquet"
    events_file(landing, tags[0]).rename(landing / "events" / long_good)
    bad = good.head(5).assign(rating=9.0)
    bad.to_parquet(landing / "events" / long_bad, index=False)
    result = night(landing, home)
    assert result.rows_curated == len(good) and result.rows_quarantined == 5
    assert [q["file"] for q in result.files_quarantined] == [f"events/{long_bad}"]
    folder = next(home.quarantine.iterdir())
    assert (folder / long_bad).read_bytes() == (landing / "events" / long_bad).read_bytes()
    assert all(len(p.name.encode()) <= 255 for p in home.root.rglob("*"))
    again = night(landing, home)  # the next night is not wedged
    assert again.rows_in == 0 and not again.files_quarantined
    assert_unique_and_consistent(home)


def test_every_landing_entry_gets_an_outcome_and_none_blocks_the_next_night(world):
    landing, home, tags = world
    original = pd.read_parquet(events_file(landing, tags[0]))
    spark = landing / "events" / "late.parquet"
    spark.mkdir()
    late = original.assign(timestamp=original["timestamp"] - pd.Timedelta(days=400))
    late.iloc[:7].to_parquet(spark / "part-0000.parquet", index=False)
    late.iloc[7:12].to_parquet(spark / "part-0001.parquet", index=False)
    (spark / "_SUCCESS").write_bytes(b"")
    (landing / "events" / "empty").mkdir()
    os.mkfifo(landing / "events" / "a-fifo")
    (landing / "events" / "notes.csv").write_text("user_id,item_id\n1,2\n")
    (landing / "events" / ".tmp-upload").write_bytes(b"partial")
    result = night(landing, home)
    assert result.rows_curated == len(original) + 12
    assert sorted(q["file"] for q in result.files_quarantined) == ["events/a-fifo", "events/empty", "events/notes.csv"]
    reasons = {v["source"].rsplit("/", 1)[-1]: v["read_error"] for v in result.validation if v["read_error"]}
    assert "not a regular file" in reasons["a-fifo"] and "no data files" in reasons["empty"]
    manifest = ingest.read_manifest(home).set_index("file")
    assert manifest.loc["events/late.parquet", "entry"] == "folder"
    assert manifest.loc["events/a-fifo", "status"] == "quarantined"
    assert "events/.tmp-upload" not in manifest.index
    again = ingest.ingest(str(landing), home)
    assert again.reads == [] and again.ignored == ["events/.tmp-upload"]
    # An entry that could not be read is tried again once it changes: the folder filled.
    late.iloc[12:15].to_parquet(landing / "events" / "empty" / "part-0.parquet", index=False)
    refilled = night(landing, home)
    assert refilled.rows_curated == 3 and refilled.files_curated == ["events/empty"]
    assert_unique_and_consistent(home)


def test_a_curate_killed_before_its_manifest_is_redone_exactly(world, monkeypatch, drops):
    landing, home, tags = world
    night(landing, home)
    copy_drop(drops[0], tags[1], landing)
    write = ingest.write_atomic

    def die_at_manifest(table, path):
        if path == home.manifest:
            raise KeyboardInterrupt("killed")  # what a kill between data and manifest leaves
        write(table, path)

    monkeypatch.setattr(ingest, "write_atomic", die_at_manifest)
    with pytest.raises(KeyboardInterrupt):
        night(landing, home)
    monkeypatch.setattr(ingest, "write_atomic", write)
    assert len(ingest.read_events(home)) > int(ingest.read_manifest(home)["rows"].sum())
    moved = ingest.set_aside_unrecorded(home)
    assert moved and all((home.interrupted / path).exists() for path in moved)
    redo = night(landing, home)
    assert redo.rows_duplicate == 0 and redo.rows_curated == len(pd.read_parquet(events_file(landing, tags[1])))
    assert_unique_and_consistent(home)
    assert ingest.set_aside_unrecorded(home) == []
