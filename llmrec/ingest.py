"""Ingestion: find landing files not yet ingested, open them, and append the valid ones to
the curated dataset with a manifest entry each.

The landing folder is read through pyarrow's filesystem layer, so a local path and an
object-store URI (s3://, gs://, file://) go through the same code. Nothing in landing is
ever modified or deleted. An entry is never held in memory whole: its checksum streams its
bytes, and its rows are scanned in record batches of `BATCH_ROWS` (validated, then written
batch by batch). Curated events are Parquet partitioned by event date; every file is
written under a hidden staging name first and renamed into place once the entry is whole.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from llmrec.config import Home
from llmrec.errors import LlmrecError
from llmrec.files import bounded_name, replace_atomically
from llmrec.schema import EVENT_KEY, EVENTS, ITEMS, KINDS, USERS, CatalogTexts, empty_events, render_text

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = pa.schema(
    [
        # Identity of a landing entry: its path relative to the landing root (plus its
        # checksum), so the same landing reached by another path or URI is recognised.
        ("file", pa.string()),
        ("kind", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("checksum", pa.string()),
        ("rows", pa.int64()),
        ("max_timestamp", pa.timestamp("us", tz="UTC")),
        ("status", pa.string()),
        ("ingest_seq", pa.int64()),
        ("ingested_at", pa.timestamp("us", tz="UTC")),
        ("quarantine_path", pa.string()),
        # Where it was read from that night (a path or URI, credentials removed).
        ("source", pa.string()),
        # file, folder (read as one Parquet dataset) or other (a fifo, socket, ...).
        ("entry", pa.string()),
        # Event rows dropped because their (user_id, item_id, timestamp) was already curated.
        ("duplicates", pa.int64()),
    ]
)
FILE, FOLDER, OTHER = "file", "folder", "other"
# Rows of a landing entry in memory at a time while it is validated and curated. Each batch
# costs a fixed few seconds of Great Expectations on top of its rows (docs/benchmarks.md:
# 5M rows took 89 s and peaked at 1.8 GiB in batches of 1M; 78 s and 4.3 GiB in one batch;
# 2.6x the time and 1.3 GiB in batches of 250k).
BATCH_ROWS = 1_000_000
# Bytes read at a time for a checksum or a quarantine copy.
CHUNK_BYTES = 8 << 20


def ignored_name(name: str) -> bool:
    """Names starting with `.` or `_` are a producer's temp files or markers (_SUCCESS)."""
    return name.startswith((".", "_"))


def redact(uri: str) -> str:
    """`uri` without credentials: user:password@ and query parameters such as
    secret_key=... are dropped, so the landing can be logged and recorded."""
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass
class LandingFile:
    """One entry of a landing kind folder. `name` (kind/relative path) is its identity;
    `uri` says where it was found this time."""

    name: str
    kind: str
    size: int
    mtime_ns: int
    uri: str
    path: str = field(repr=False, default="")
    entry: str = FILE
    # A folder's data files: (path, name inside the folder, size, mtime_ns), sorted.
    members: list[tuple[str, str, int, int]] = field(repr=False, default_factory=list)


@dataclass
class LandingRead:
    """One landing entry opened: its checksum, its data files by name (for the quarantine
    copy) and its rows as a dataset scanned in record batches, or why it could not be read."""

    file: LandingFile
    checksum: str
    dataset: ds.Dataset | None
    error: str | None = None
    fs: pafs.FileSystem | None = field(default=None, repr=False)
    # Name inside the entry (as the quarantine copy names it) -> path in the landing.
    members: dict[str, str] = field(default_factory=dict)
    total_rows: int = 0
    # Event rows not curated because their key was already curated.
    duplicates: int = 0
    # Newest event timestamp: of every row once validated, of the rows curated once curated.
    max_timestamp: pd.Timestamp | None = None

    @classmethod
    def in_memory(cls, file: LandingFile, checksum: str, frame: pd.DataFrame) -> "LandingRead":
        """Rows that are already a frame (a benchmark's synthetic history)."""
        table = pa.Table.from_pandas(frame, preserve_index=False)
        return cls(file, checksum, ds.dataset(table), total_rows=len(frame))

    @property
    def rows(self) -> int:
        return self.total_rows - self.duplicates

    @functools.cached_property
    def frame(self) -> pd.DataFrame | None:
        """Every row at once: for the catalogs, whose ids are checked unique over the whole
        file and merged into one catalog file anyway."""
        return None if self.dataset is None else self.dataset.to_table().to_pandas()

    def batches(self, batch_rows: int = BATCH_ROWS) -> Iterator[pd.DataFrame]:
        """The rows in order, `batch_rows` at a time (the last batch shorter); one empty
        frame with the entry's columns when it has no rows, so every check still runs once."""
        pending: list[pa.RecordBatch] = []
        held = 0
        yielded = False
        scan = self.dataset.to_batches(batch_size=batch_rows, batch_readahead=1, fragment_readahead=1)
        for batch in scan:
            pending.append(batch)
            held += batch.num_rows
            while held >= batch_rows:
                table = pa.Table.from_batches(pending, schema=self.dataset.schema)
                yield table.slice(0, batch_rows).to_pandas()
                pending, held = table.slice(batch_rows).to_batches(), held - batch_rows
                yielded = True
        if held or not yielded:
            yield pa.Table.from_batches(pending, schema=self.dataset.schema).to_pandas()

    def openers(self) -> dict[str, Callable]:
        """Per data file, a function opening it as a stream (for the quarantine copy)."""
        return {name: functools.partial(self.fs.open_input_stream, path) for name, path in self.members.items()}


@dataclass
class Discovery:
    new: list[LandingFile]
    changed: list[dict]
    already_ingested: int
    ignored: list[str] = field(default_factory=list)


@dataclass
class IngestResult:
    """Tonight's new landing entries, read, what was found changed since ingestion, and
    the names ignored (starting with `.` or `_`)."""

    reads: list[LandingRead]
    changed: list[dict]
    already_ingested: int
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "new_files": len(self.reads),
            "already_ingested": self.already_ingested,
            "changed_after_ingestion": self.changed,
            "ignored": self.ignored,
        }


def ingest(landing: str, home: Home) -> IngestResult:
    """Find and read the landing entries not yet in the manifest."""
    fs, files, ignored = list_landing(landing)
    found = discover(fs, files, read_manifest(home))
    for change in found.changed:
        log.warning("%s changed after it was ingested (checksum %s, now %s); it is not re-read",
                    change["file"], change["ingested_checksum"][:12], change["checksum_now"][:12])
    for name in ignored:
        log.info("ignored %s (names starting with '.' or '_' are not landing files)", name)
    reads = [read_landing_file(fs, f) for f in found.new]
    log.info("landing %s: %d new file(s), %d already ingested, %d ignored", redact(landing), len(reads),
             found.already_ingested, len(ignored))
    return IngestResult(reads=reads, changed=found.changed, already_ingested=found.already_ingested, ignored=ignored)


def open_landing(landing: str) -> tuple[pafs.FileSystem, str]:
    """The landing's file system and root path; a user error when it cannot be reached."""
    if "://" in landing:
        try:
            fs, base = pafs.FileSystem.from_uri(landing)
            root = fs.get_file_info(base)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as error:
            raise LlmrecError(f"landing={redact(landing)!r}: cannot open this URI ({error})") from error
        if root.type != pafs.FileType.Directory:
            raise LlmrecError(f"landing={redact(landing)!r}: no such folder; it must hold events/, items/, users/")
        return fs, base.rstrip("/")
    path = Path(landing).expanduser().resolve()
    if not path.is_dir():
        raise LlmrecError(f"landing={landing!r}: folder {path} does not exist; it must hold events/, items/, users/")
    return pafs.LocalFileSystem(), str(path)


def list_landing(landing: str) -> tuple[pafs.FileSystem, list[LandingFile], list[str]]:
    """Every entry of the landing kind folders: files, folders (a Parquet dataset, as
    Spark writes `x.parquet/part-0000.parquet`) and anything else, each to be given an
    outcome; plus the names ignored."""
    fs, base = open_landing(landing)
    scheme = landing.split("://")[0] + "://" if "://" in landing else ""
    found, ignored = [], []
    for kind in KINDS:
        selector = pafs.FileSelector(f"{base}/{kind}", allow_not_found=True)
        for info in fs.get_file_info(selector):
            name = f"{kind}/{info.base_name}"
            if ignored_name(info.base_name):
                ignored.append(name)
                continue
            entry = LandingFile(name=name, kind=kind, size=int(info.size or 0), mtime_ns=int(info.mtime_ns or 0),
                                uri=redact(scheme + info.path), path=info.path)
            if info.type == pafs.FileType.Directory:
                entry.entry = FOLDER
                entry.members = folder_members(fs, info.path)
                entry.size = sum(size for _, _, size, _ in entry.members)
                entry.mtime_ns = max([entry.mtime_ns] + [mtime for _, _, _, mtime in entry.members])
            elif info.type != pafs.FileType.File:
                entry.entry = OTHER
            found.append(entry)
    if not found and not any(fs.get_file_info(f"{base}/{k}").type == pafs.FileType.Directory for k in KINDS):
        raise LlmrecError(f"landing={redact(landing)!r}: has none of the sub-folders {', '.join(KINDS)}")
    return fs, sorted(found, key=lambda f: (KINDS.index(f.kind), f.name)), sorted(ignored)


def folder_members(fs: pafs.FileSystem, folder: str) -> list[tuple[str, str, int, int]]:
    """The data files of a folder entry, at any depth, with names starting with `.` or `_`
    (Spark's _SUCCESS, a writer's temp files) left out."""
    members = []
    for info in fs.get_file_info(pafs.FileSelector(folder, recursive=True)):
        inner = info.path[len(folder):].lstrip("/")
        if info.type == pafs.FileType.File and not any(ignored_name(part) for part in inner.split("/")):
            members.append((info.path, inner, int(info.size or 0), int(info.mtime_ns or 0)))
    return sorted(members, key=lambda member: member[1])


def read_manifest(home: Home) -> pd.DataFrame:
    if not home.manifest.exists():
        return MANIFEST_SCHEMA.empty_table().to_pandas()
    manifest = pq.read_table(home.manifest).to_pandas()
    if "source" not in manifest:
        # Manifests written before entries were named relative to the landing root held the
        # absolute path of a file directly under its kind folder.
        manifest["source"] = manifest["file"]
        manifest["file"] = manifest["kind"] + "/" + manifest["file"].str.rsplit("/", n=1).str[-1]
        manifest["entry"] = FILE
        manifest["duplicates"] = 0
    return manifest


def discover(fs: pafs.FileSystem, files: list[LandingFile], manifest: pd.DataFrame) -> Discovery:
    """Split landing entries into new ones and ones already in the manifest; a known entry
    whose bytes changed since is reported, never silently re-read. An entry recorded
    without a checksum (it could not be read) is tried again once its size or mtime moves."""
    known = {row.file: row for row in manifest.itertuples(index=False)}
    new, changed, same = [], [], 0
    for file in files:
        entry = known.get(file.name)
        moved = entry is not None and (file.size != entry.size or file.mtime_ns != entry.mtime_ns)
        if entry is None or (moved and not entry.checksum):
            new.append(file)
            continue
        same += 1
        if not moved or file.entry == OTHER:
            continue
        checksum = entry_checksum(fs, file)
        if checksum != entry.checksum:
            changed.append({"file": file.name, "ingested_checksum": entry.checksum, "checksum_now": checksum,
                            "ingested_size": int(entry.size), "size_now": file.size})
    return Discovery(new=new, changed=changed, already_ingested=same)


def entry_members(file: LandingFile) -> dict[str, str]:
    """The data file of a file entry (under its own name) or of each member of a folder
    (under `folder/inner/path`), by name -> path."""
    base = file.name.split("/", 1)[1]
    if file.entry == FILE:
        return {base: file.path}
    return {f"{base}/{inner}": path for path, inner, _, _ in file.members}


def sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def file_sha256(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as stream:
        while chunk := stream.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def entry_checksum(fs: pafs.FileSystem, file: LandingFile) -> str:
    """A file's sha256; for a folder, the sha256 of its members' names and sha256s."""
    if file.entry == FILE:
        return file_sha256(fs, file.path)
    members = sorted(entry_members(file).items())
    return sha256("".join(f"{name}\0{file_sha256(fs, path)}\n" for name, path in members).encode())


def read_landing_file(fs: pafs.FileSystem, file: LandingFile) -> LandingRead:
    """Open one entry: checksum and Parquet footers, no rows yet. Whatever goes wrong
    becomes the read's `error` (it is quarantined with that reason), never an exception
    that would stop this night and every later one."""
    if file.entry == OTHER:
        return LandingRead(file, "", None, "not a regular file or folder; nothing was read")
    members = entry_members(file)
    if not members:
        return LandingRead(file, "", None, "folder holds no data files")
    try:
        checksum = entry_checksum(fs, file)
    except OSError as error:
        return LandingRead(file, "", None, f"cannot read ({error})")
    schemas, rows = [], 0
    try:
        for path in members.values():
            with pq.ParquetFile(path, filesystem=fs) as footer:
                schemas.append(footer.schema_arrow)
                rows += footer.metadata.num_rows
        # Members may differ as far as pyarrow's permissive promotion allows (a column
        # missing from one reads as nulls, int32 widens to int64).
        schema = pa.unify_schemas(schemas, promote_options="permissive")
        dataset = ds.dataset(list(members.values()), schema=schema, format="parquet", filesystem=fs)
    except (pa.ArrowException, OSError, ValueError) as error:
        return LandingRead(file, checksum, None, f"not a readable Parquet {file.entry}: {error}", fs, members)
    return LandingRead(file, checksum, dataset, None, fs, members, rows)


def next_ingest_seq(manifest: pd.DataFrame) -> int:
    return int(manifest["ingest_seq"].max()) + 1 if len(manifest) else 1


def write_atomic(table: pa.Table, path: Path) -> None:
    replace_atomically(path, lambda tmp: pq.write_table(table, tmp))


def newest(frame: pd.DataFrame) -> pd.Timestamp | None:
    """The newest parseable event timestamp of `frame`, or None."""
    if "timestamp" not in frame or not len(frame):
        return None
    value = pd.to_datetime(frame["timestamp"], utc=True, errors="coerce").max()
    return None if pd.isna(value) else value


def later(a: pd.Timestamp | None, b: pd.Timestamp | None) -> pd.Timestamp | None:
    return b if a is None else a if b is None else max(a, b)


def manifest_entry(read: LandingRead, status: str, seq: int, quarantine_path: str | None = None) -> dict:
    return {
        "file": read.file.name,
        "kind": read.file.kind,
        "size": read.file.size,
        "mtime_ns": read.file.mtime_ns,
        "checksum": read.checksum,
        "rows": read.rows,
        "max_timestamp": read.max_timestamp if read.file.kind == EVENTS else None,
        "status": status,
        "ingest_seq": seq,
        "ingested_at": datetime.now(timezone.utc),
        "quarantine_path": quarantine_path,
        "source": read.file.uri,
        "entry": read.file.entry,
        "duplicates": read.duplicates,
    }


def upsert(path: Path, new: pd.DataFrame, id_column: str) -> int:
    """Catalog upsert: the newest row per id wins; returns the catalog size."""
    frames = [pd.read_parquet(path)] if path.exists() else []
    merged = pd.concat(frames + [new], ignore_index=True).drop_duplicates(id_column, keep="last")
    merged = merged.astype({id_column: str})
    write_atomic(pa.Table.from_pandas(merged, preserve_index=False), path)
    return len(merged)


def event_keys(events: pd.DataFrame) -> pd.MultiIndex:
    """(user_id, item_id, timestamp in UTC nanoseconds) of each row, comparable across
    files whatever their timestamp unit."""
    stamps = pd.to_datetime(events["timestamp"], utc=True).dt.as_unit("ns").astype("int64")
    return pd.MultiIndex.from_arrays([events["user_id"].astype(str).to_numpy(), events["item_id"].astype(str).to_numpy(),
                                      stamps.to_numpy()])


def curated_keys(home: Home, day: str) -> pd.MultiIndex:
    """`event_keys` of the events curated for one day (the duplicate check reads only the
    days a batch touches)."""
    folder = home.events / f"date={day}"
    paths = sorted(str(p) for p in folder.glob("*.parquet") if not ignored_name(p.name))
    if not paths:
        return event_keys(empty_events())
    return event_keys(ds.dataset(paths, format="parquet").to_table(columns=EVENT_KEY).to_pandas())


def write_events(home: Home, read: LandingRead, seq: int, batch_rows: int = BATCH_ROWS) -> None:
    """Append one events entry to the curated data batch by batch, without the rows whose
    key is already curated (an earlier night, or an earlier entry of tonight: each entry
    is in place before the next is written); their count goes to `read.duplicates`. Each
    day's rows stream into a hidden staging file, renamed into place once the whole entry
    is written; a crash leaves staging files, which `set_aside_unrecorded` moves away."""
    name = bounded_name(f"part-{Path(read.file.name).stem}-{read.checksum[:12]}.parquet")
    staging = home.events / f".staging-{seq}-{read.checksum[:12]}"
    shutil.rmtree(staging, ignore_errors=True)
    writers: dict[str, pq.ParquetWriter] = {}
    seen: dict[str, pd.MultiIndex] = {}
    read.duplicates, read.max_timestamp = 0, None
    try:
        for events in read.batches(batch_rows):
            if events.empty:
                continue
            events["timestamp"] = pd.to_datetime(events["timestamp"], utc=True)
            days = events["timestamp"].dt.strftime("%Y-%m-%d")
            for day in days.unique():
                if day not in seen:
                    seen[day] = curated_keys(home, day)
            known = functools.reduce(pd.MultiIndex.append, [seen[day] for day in days.unique()])
            repeated = event_keys(events).isin(known)
            read.duplicates += int(repeated.sum())
            events, days = events[~repeated], days[~repeated]
            events["_ingest_seq"] = seq
            read.max_timestamp = later(read.max_timestamp, newest(events))
            for day, rows in events.groupby(days):
                table = pa.Table.from_pandas(rows.reset_index(drop=True), preserve_index=False)
                if day not in writers:
                    (staging / f"date={day}").mkdir(parents=True, exist_ok=True)
                    writers[day] = pq.ParquetWriter(staging / f"date={day}" / name, table.schema)
                writers[day].write_table(table.cast(writers[day].schema))
    finally:
        for writer in writers.values():
            writer.close()
    for day in sorted(writers):
        staged = staging / f"date={day}" / name
        replace_atomically(home.events / f"date={day}" / name, functools.partial(os.replace, staged))
    shutil.rmtree(staging, ignore_errors=True)


def curate(home: Home, accepted: list[LandingRead], quarantined: list[tuple[LandingRead, str]], seq: int,
           batch_rows: int = BATCH_ROWS) -> pd.DataFrame:
    """Append accepted entries (events without their duplicate rows) to the curated data,
    then record every entry (accepted and quarantined) in the manifest. Data is written
    before the manifest, and partition files are named by content, so a crash in between
    re-writes rather than duplicates (`recovery` sets aside what such a crash left)."""
    for kind, id_column, path in ((ITEMS, "item_id", home.items), (USERS, "user_id", home.users)):
        frames = [r.frame for r in accepted if r.file.kind == kind]
        if frames:
            upsert(path, pd.concat(frames, ignore_index=True), id_column)
    for read in accepted:
        if read.file.kind == EVENTS:
            write_events(home, read, seq, batch_rows)
    entries = [manifest_entry(r, "curated", seq) for r in accepted]
    entries += [manifest_entry(r, "quarantined", seq, path) for r, path in quarantined]
    manifest = read_manifest(home)
    if entries:
        added = pa.Table.from_pylist(entries, schema=MANIFEST_SCHEMA).to_pandas()
        manifest = pd.concat([manifest, added], ignore_index=True) if len(manifest) else added
        write_atomic(pa.Table.from_pandas(manifest, schema=MANIFEST_SCHEMA, preserve_index=False), home.manifest)
    return manifest


def set_aside_unrecorded(home: Home) -> list[str]:
    """Move curated event files whose ingest sequence has no manifest entry (a curate killed
    between writing data and writing the manifest), and the staging folders of an entry
    killed while it was written, to `home/interrupted/`, kept but never read: their landing
    entries are not in the manifest, so the next curate reads them again, and its duplicate
    check must not count them against rows it has not recorded."""
    if not home.events.exists():
        return []
    recorded = set(read_manifest(home)["ingest_seq"].astype(int))
    moved = []
    for path in sorted(home.events.glob(".staging-*")):
        moved.append(set_aside(home, path))
    for path in sorted(home.events.rglob("*.parquet")):
        if any(ignored_name(part) for part in path.relative_to(home.events).parts):
            continue
        seqs = set(pq.read_table(path, columns=["_ingest_seq"]).column(0).to_pylist())
        if not seqs <= recorded:
            moved.append(set_aside(home, path))
    return moved


def set_aside(home: Home, path: Path) -> str:
    target = home.interrupted / path.relative_to(home.curated)
    target.parent.mkdir(parents=True, exist_ok=True)
    path.replace(target)
    return str(path.relative_to(home.curated))


def read_events(home: Home) -> pd.DataFrame:
    """All curated events, with the ingest sequence number each arrived in."""
    dataset = ds.dataset(str(home.events), format="parquet", partitioning="hive") if home.events.exists() else None
    if dataset is None or not dataset.files:
        # No curated file yet (hidden files, e.g. an interrupted write's temporary, are not read).
        frame = empty_events()
        frame["_ingest_seq"] = pd.Series(dtype="int64")
        return frame
    columns = [c for c in dataset.schema.names if c != "date"]
    frame = dataset.to_table(columns=columns).to_pandas()
    return frame.sort_values(["timestamp", "user_id", "item_id"], kind="stable").reset_index(drop=True)


def read_catalog_texts(home: Home) -> CatalogTexts:
    return CatalogTexts(users=render_text(read_catalog(home, USERS), "user_id").to_dict(),
                        items=render_text(read_catalog(home, ITEMS), "item_id").to_dict())


def read_catalog(home: Home, kind: str) -> pd.DataFrame:
    path = home.items if kind == ITEMS else home.users
    id_column = "item_id" if kind == ITEMS else "user_id"
    if not path.exists():
        return pd.DataFrame({id_column: pd.Series(dtype=str)})
    return pd.read_parquet(path)
