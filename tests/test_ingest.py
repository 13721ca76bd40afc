"""Code tests of ingestion: discovery, manifest, partitioned atomic writes, change reports."""

import os

import pandas as pd
import pytest

from llmrec import ingest
from llmrec.config import Home
from llmrec.data import copy_drop, synthetic_drops
from llmrec.errors import LlmrecError


@pytest.fixture
def drops(tmp_path):
    folder = tmp_path / "drops"
    tags = synthetic_drops(folder, users=30, items=40, days=3, seed=1)
    return folder, tags


def ingest_all(landing, home):
    fs, files, _ = ingest.list_landing(str(landing))
    manifest = ingest.read_manifest(home)
    found = ingest.discover(fs, files, manifest)
    reads = [ingest.read_landing_file(fs, f) for f in found.new]
    ingest.curate(home, reads, [], ingest.next_ingest_seq(manifest))
    return found, reads


def test_ingest_appends_partitioned_events_and_records_manifest(tmp_path, drops):
    folder, tags = drops
    landing, home = tmp_path / "landing", Home(tmp_path / "home").ensure()
    copy_drop(folder, tags[0], landing)
    found, reads = ingest_all(landing, home)
    events = ingest.read_events(home)
    landed = sum(r.rows for r in reads if r.file.kind == "events")
    assert len(events) == landed > 0
    partitions = sorted(p.name for p in home.events.iterdir())
    assert partitions and all(p.startswith("date=") for p in partitions)
    manifest = ingest.read_manifest(home)
    assert set(manifest["status"]) == {"curated"}
    assert len(manifest) == len(found.new)
    assert (manifest["checksum"].str.len() == 64).all()
    assert manifest.loc[manifest["kind"] == "events", "max_timestamp"].notna().all()
    assert set(ingest.read_catalog(home, "items")["item_id"]) >= set(events["item_id"])


@pytest.fixture
def first_drop_ingested(tmp_path, drops):
    """Landing and home after the first drop was ingested, and how many events it curated."""
    folder, tags = drops
    landing, home = tmp_path / "landing", Home(tmp_path / "home").ensure()
    copy_drop(folder, tags[0], landing)
    ingest_all(landing, home)
    return landing, home, len(ingest.read_events(home))


def test_second_ingest_of_same_files_adds_nothing(first_drop_ingested, drops):
    folder, tags = drops
    landing, home, before = first_drop_ingested
    found, reads = ingest_all(landing, home)
    assert found.new == [] and reads == []
    assert found.already_ingested > 0
    assert len(ingest.read_events(home)) == before
    copy_drop(folder, tags[1], landing)
    found, _ = ingest_all(landing, home)
    assert len(found.new) >= 1
    seqs = ingest.read_events(home)["_ingest_seq"].unique()
    assert sorted(seqs) == [1, 2]


def test_changed_file_is_reported_not_reread(first_drop_ingested):
    landing, home, before = first_drop_ingested
    target = next((landing / "events").iterdir())
    frame = pd.read_parquet(target)
    frame.head(3).to_parquet(target)
    found, reads = ingest_all(landing, home)
    assert reads == []
    assert [c["file"] for c in found.changed] == [f"events/{target.name}"]
    assert len(ingest.read_events(home)) == before
    # Touching a file without changing its bytes is not a change.
    os.utime(landing / "items" / next((landing / "items").iterdir()).name)
    found, _ = ingest_all(landing, home)
    assert [c["file"] for c in found.changed] == [f"events/{target.name}"]


def test_landing_is_never_modified(tmp_path, drops):
    folder, tags = drops
    landing, home = tmp_path / "landing", Home(tmp_path / "home").ensure()
    copy_drop(folder, tags[0], landing)
    before = {p: p.read_bytes() for p in landing.rglob("*.parquet")}
    ingest_all(landing, home)
    assert {p: p.read_bytes() for p in landing.rglob("*.parquet")} == before
    assert not list(home.root.rglob("*.tmp"))


def test_uri_landing_goes_through_the_same_code(tmp_path, drops):
    folder, tags = drops
    landing, home = tmp_path / "landing", Home(tmp_path / "home").ensure()
    copy_drop(folder, tags[0], landing)
    fs, files, _ = ingest.list_landing(landing.as_uri())
    assert files and all(f.uri.startswith("file://") for f in files)
    reads = [ingest.read_landing_file(fs, f) for f in files]
    assert all(r.frame is not None for r in reads)


def test_missing_landing_folder_is_a_user_error(tmp_path):
    with pytest.raises(LlmrecError, match="does not exist"):
        ingest.list_landing(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LlmrecError, match="events"):
        ingest.list_landing(str(tmp_path / "empty"))


def test_corrupt_file_is_read_as_an_error_not_an_exception(tmp_path):
    landing = tmp_path / "landing"
    (landing / "events").mkdir(parents=True)
    (landing / "events" / "bad.parquet").write_bytes(b"not parquet at all")
    fs, files, _ = ingest.list_landing(str(landing))
    read = ingest.read_landing_file(fs, files[0])
    assert read.frame is None and "Parquet" in read.error
    assert read.checksum == ingest.sha256(b"not parquet at all")


def test_the_same_landing_by_another_path_or_uri_is_recognised(tmp_path, drops):
    folder, tags = drops
    landing, home = tmp_path / "landing", Home(tmp_path / "home").ensure()
    copy_drop(folder, tags[0], landing)
    ingest_all(landing, home)
    before = len(ingest.read_events(home))
    mount = tmp_path / "another-mount"
    mount.symlink_to(landing, target_is_directory=True)
    for other in (str(mount), landing.as_uri(), mount.as_uri(), f"{landing}/"):
        found, reads = ingest_all(other, home)
        assert found.new == [] and found.already_ingested == len(ingest.read_manifest(home)), other
    assert len(ingest.read_events(home)) == before
    assert set(ingest.read_manifest(home)["file"]) == {
        f"{kind}/{p.name}" for kind in ("events", "items", "users") for p in (landing / kind).iterdir()}


def test_a_manifest_of_absolute_paths_is_read_as_relative_names(tmp_path, drops):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder, tags = drops
    landing, home = tmp_path / "landing", Home(tmp_path / "home").ensure()
    copy_drop(folder, tags[0], landing)
    ingest_all(landing, home)
    old = pq.read_table(home.manifest).drop_columns(["source", "entry", "duplicates"]).to_pandas()
    old["file"] = [str(landing / name) for name in old["file"]]
    pq.write_table(pa.Table.from_pandas(old, preserve_index=False), home.manifest)
    found, _ = ingest_all(landing.as_uri(), home)
    assert found.new == [] and found.already_ingested == len(old)


def test_dot_and_underscore_names_are_ignored_and_reported(tmp_path, drops):
    folder, tags = drops
    landing, home = tmp_path / "landing", Home(tmp_path / "home").ensure()
    copy_drop(folder, tags[0], landing)
    (landing / "events" / ".day-2.parquet.inprogress").write_bytes(b"half written")
    (landing / "events" / "_SUCCESS").write_bytes(b"")
    result = ingest.ingest(str(landing), home)
    assert result.ignored == ["events/.day-2.parquet.inprogress", "events/_SUCCESS"]
    assert all(not r.file.name.split("/")[1].startswith((".", "_")) for r in result.reads)
    assert result.summary()["ignored"] == result.ignored


def test_every_entry_is_listed_folders_and_fifos_included(tmp_path, drops):
    folder, tags = drops
    landing = tmp_path / "landing"
    copy_drop(folder, tags[0], landing)
    spark = landing / "events" / "day.parquet"
    (spark / "date=1").mkdir(parents=True)
    frame = pd.read_parquet(next((landing / "events").glob("events-*.parquet")))
    frame.iloc[:5].to_parquet(spark / "part-0000.parquet", index=False)
    frame.iloc[5:9].to_parquet(spark / "date=1" / "part-0001.parquet", index=False)
    (spark / "_SUCCESS").write_bytes(b"")
    (landing / "events" / "empty-folder").mkdir()
    os.mkfifo(landing / "events" / "a-fifo")
    (landing / "events" / "notes.csv").write_text("a,b\n")
    fs, files, _ = ingest.list_landing(str(landing))
    by_name = {f.name: f for f in files}
    assert by_name["events/day.parquet"].entry == "folder"
    assert by_name["events/a-fifo"].entry == "other"
    reads = {f.name: ingest.read_landing_file(fs, f) for f in files}
    assert reads["events/day.parquet"].rows == 9 and reads["events/day.parquet"].error is None
    assert sorted(reads["events/day.parquet"].members) == ["day.parquet/date=1/part-0001.parquet",
                                                            "day.parquet/part-0000.parquet"]
    assert "not a regular file" in reads["events/a-fifo"].error
    assert "no data files" in reads["events/empty-folder"].error
    assert "Parquet" in reads["events/notes.csv"].error


def test_an_unreadable_file_is_an_outcome_not_a_crash(tmp_path, drops):
    folder, tags = drops
    landing = tmp_path / "landing"
    copy_drop(folder, tags[0], landing)
    target = next((landing / "events").glob("*.parquet"))
    fs, files, _ = ingest.list_landing(str(landing))
    target.unlink()  # gone between listing and reading, as on a flaky mount
    read = ingest.read_landing_file(fs, next(f for f in files if f.name == f"events/{target.name}"))
    assert read.frame is None and "cannot read" in read.error and read.checksum == ""


def test_credentials_never_reach_a_recorded_uri():
    assert ingest.redact("s3://AKIA:secret@bucket/landing?secret_key=abc&region=x") == "s3://bucket/landing"
    assert ingest.redact("/plain/path") == "/plain/path"


def test_bounded_names_fit_and_stay_distinct():
    from llmrec.files import bounded_name

    short = "part-a.parquet"
    assert bounded_name(short) == short
    one, two = bounded_name("x" * 300 + "1.parquet"), bounded_name("x" * 300 + "2.parquet")
    assert one != two and one.endswith(".parquet") and len(one.encode()) == 255
    multibyte = bounded_name("é" * 200 + ".parquet")
    assert len(multibyte.encode()) <= 255 and multibyte.endswith(".parquet")


def test_curated_folder_without_a_visible_file_reads_as_no_events(tmp_path):
    """A curated folder holding only hidden files (an interrupted write's temporary, or every
    file set aside by recovery) is an empty history, not a crash."""
    home = Home(tmp_path / "home").ensure()
    partition = home.events / "date=2026-01-01"
    partition.mkdir(parents=True)
    (partition / ".part-0.parquet.tmp").write_bytes(b"half a file")
    events = ingest.read_events(home)
    assert events.empty and {"user_id", "item_id", "rating", "timestamp", "_ingest_seq"} <= set(events.columns)
