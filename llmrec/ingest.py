"""Ingestion: find landing files not yet ingested, read them, and append the valid ones to
the curated dataset with a manifest entry each.

The landing folder is read through pyarrow's filesystem layer, so a local path and an
object-store URI (s3://, gs://, file://) go through the same code. Nothing in landing is
ever modified or deleted. Curated events are Parquet partitioned by event date; every
write goes to a temp file first and is renamed into place.
"""

from __future__ import annotations

import hashlib
import io
import logging
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
from llmrec.schema import EVENTS, ITEMS, KINDS, USERS, CatalogTexts, empty_events, render_text

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
    """One landing entry read into memory: its bytes by name (for the checksum and, if it
    fails validation, the quarantine copy) and its rows, or why it could not be read."""

    file: LandingFile
    contents: dict[str, bytes]
    checksum: str
    frame: pd.DataFrame | None
    error: str | None = None
    # Event rows left out of `frame` because their key was already curated.
    duplicates: int = 0

    @property
    def rows(self) -> int:
        return 0 if self.frame is None else len(self.frame)


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
        checksum = entry_checksum(read_contents(fs, file))
        if checksum != entry.checksum:
            changed.append({"file": file.name, "ingested_checksum": entry.checksum, "checksum_now": checksum,
                            "ingested_size": int(entry.size), "size_now": file.size})
    return Discovery(new=new, changed=changed, already_ingested=same)


def read_contents(fs: pafs.FileSystem, file: LandingFile) -> dict[str, bytes]:
    """The bytes of a file (under its own name) or of each data file of a folder (under
    `folder/inner/path`)."""
    base = file.name.split("/", 1)[1]
    if file.entry == FILE:
        with fs.open_input_stream(file.path) as stream:
            return {base: stream.read()}
    contents = {}
    for path, inner, _, _ in file.members:
        with fs.open_input_stream(path) as stream:
            contents[f"{base}/{inner}"] = stream.read()
    return contents


def sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def entry_checksum(contents: dict[str, bytes]) -> str:
    """A file's sha256; for a folder, the sha256 of its members' names and sha256s."""
    if len(contents) == 1 and "/" not in next(iter(contents)):
        return sha256(next(iter(contents.values())))
    return sha256("".join(f"{name}\0{sha256(raw)}\n" for name, raw in sorted(contents.items())).encode())


def read_landing_file(fs: pafs.FileSystem, file: LandingFile) -> LandingRead:
    """Read one entry; whatever goes wrong becomes the read's `error` (it is quarantined
    with that reason), never an exception that would stop this night and every later one."""
    if file.entry == OTHER:
        return LandingRead(file, {}, "", None, "not a regular file or folder; nothing was read")
    try:
        contents = read_contents(fs, file)
    except OSError as error:
        return LandingRead(file, {}, "", None, f"cannot read ({error})")
    if not contents:
        return LandingRead(file, {}, "", None, "folder holds no data files")
    checksum = entry_checksum(contents)
    try:
        tables = [pq.read_table(io.BytesIO(raw)) for raw in contents.values()]
        frame = pa.concat_tables(tables, promote_options="permissive").to_pandas()
    except (pa.ArrowException, OSError, ValueError) as error:
        return LandingRead(file, contents, checksum, None, f"not a readable Parquet {file.entry}: {error}")
    return LandingRead(file, contents, checksum, frame)


def next_ingest_seq(manifest: pd.DataFrame) -> int:
    return int(manifest["ingest_seq"].max()) + 1 if len(manifest) else 1


def write_atomic(table: pa.Table, path: Path) -> None:
    replace_atomically(path, lambda tmp: pq.write_table(table, tmp))


def manifest_entry(read: LandingRead, status: str, seq: int, quarantine_path: str | None = None) -> dict:
    max_ts = None
    if read.frame is not None and read.file.kind == EVENTS and "timestamp" in read.frame and len(read.frame):
        max_ts = pd.to_datetime(read.frame["timestamp"], utc=True, errors="coerce").max()
    return {
        "file": read.file.name,
        "kind": read.file.kind,
        "size": read.file.size,
        "mtime_ns": read.file.mtime_ns,
        "checksum": read.checksum,
        "rows": read.rows,
        "max_timestamp": None if max_ts is None or pd.isna(max_ts) else max_ts,
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


def curate(home: Home, accepted: list[LandingRead], quarantined: list[tuple[LandingRead, str]], seq: int) -> pd.DataFrame:
    """Append accepted entries (events without their duplicate rows) to the curated data,
    then record every entry (accepted and quarantined) in the manifest. Data is written
    before the manifest, and partition files are named by content, so a crash in between
    re-writes rather than duplicates (`recovery` sets aside what such a crash left)."""
    for kind, id_column, path in ((ITEMS, "item_id", home.items), (USERS, "user_id", home.users)):
        frames = [r.frame for r in accepted if r.file.kind == kind]
        if frames:
            upsert(path, pd.concat(frames, ignore_index=True), id_column)
    for read in accepted:
        if read.file.kind != EVENTS:
            continue
        events = read.frame.copy()
        events["timestamp"] = pd.to_datetime(events["timestamp"], utc=True)
        events["_ingest_seq"] = seq
        stem = Path(read.file.name).stem
        for day, rows in events.groupby(events["timestamp"].dt.strftime("%Y-%m-%d")):
            target = home.events / f"date={day}" / bounded_name(f"part-{stem}-{read.checksum[:12]}.parquet")
            write_atomic(pa.Table.from_pandas(rows.reset_index(drop=True), preserve_index=False), target)
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
    between writing data and writing the manifest) to `home/interrupted/`, kept but never
    read: their landing entries are not in the manifest, so the next curate reads them again,
    and its duplicate check must not count them against rows it has not recorded."""
    if not home.events.exists():
        return []
    recorded = set(read_manifest(home)["ingest_seq"].astype(int))
    moved = []
    for path in sorted(home.events.rglob("*.parquet")):
        if ignored_name(path.name):
            continue
        seqs = set(pq.read_table(path, columns=["_ingest_seq"]).column(0).to_pylist())
        if seqs <= recorded:
            continue
        target = home.interrupted / path.relative_to(home.curated)
        target.parent.mkdir(parents=True, exist_ok=True)
        path.replace(target)
        moved.append(str(path.relative_to(home.curated)))
    return moved


def read_events(home: Home) -> pd.DataFrame:
    """All curated events, with the ingest sequence number each arrived in."""
    if not home.events.exists():
        frame = empty_events()
        frame["_ingest_seq"] = pd.Series(dtype="int64")
        return frame
    dataset = ds.dataset(str(home.events), format="parquet", partitioning="hive")
    columns = [c for c in dataset.schema.names if c != "date"]
    frame = dataset.to_table(columns=columns).to_pandas()
    return frame.sort_values(["timestamp", "user_id", "item_id"], kind="stable").reset_index(drop=True)


def read_event_keys(home: Home) -> pd.DataFrame:
    """(user_id, item_id, timestamp) of every curated event: the duplicate check's input,
    three columns instead of the whole history."""
    if not home.events.exists():
        return empty_events()[["user_id", "item_id", "timestamp"]]
    dataset = ds.dataset(str(home.events), format="parquet", partitioning="hive")
    return dataset.to_table(columns=["user_id", "item_id", "timestamp"]).to_pandas()


def read_catalog_texts(home: Home) -> CatalogTexts:
    return CatalogTexts(users=render_text(read_catalog(home, USERS), "user_id").to_dict(),
                        items=render_text(read_catalog(home, ITEMS), "item_id").to_dict())


def read_catalog(home: Home, kind: str) -> pd.DataFrame:
    path = home.items if kind == ITEMS else home.users
    id_column = "item_id" if kind == ITEMS else "user_id"
    if not path.exists():
        return pd.DataFrame({id_column: pd.Series(dtype=str)})
    return pd.read_parquet(path)
