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
    fs, files = ingest.list_landing(str(landing))
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
    assert [c["file"] for c in found.changed] == [str(target)]
    assert len(ingest.read_events(home)) == before
    # Touching a file without changing its bytes is not a change.
    os.utime(landing / "items" / next((landing / "items").iterdir()).name)
    found, _ = ingest_all(landing, home)
    assert [c["file"] for c in found.changed] == [str(target)]


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
    fs, files = ingest.list_landing(landing.as_uri())
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
    fs, files = ingest.list_landing(str(landing))
    read = ingest.read_landing_file(fs, files[0])
    assert read.frame is None and "Parquet" in read.error
    assert read.checksum == ingest.sha256(b"not parquet at all")


def test_only_one_nightly_run_per_home(tmp_path):
    from llmrec.config import Home
    from llmrec.lock import exclusive

    home = Home(tmp_path / "home")
    with exclusive(home):
        with pytest.raises(LlmrecError, match="another nightly run"):
            with exclusive(home):
                pass
    with exclusive(home):  # released after the first run ends
        pass
