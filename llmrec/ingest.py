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

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from llmrec.config import Home
from llmrec.errors import LlmrecError
from llmrec.files import replace_atomically
from llmrec.schema import EVENTS, ITEMS, KINDS, USERS, CatalogTexts, empty_events, render_text

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = pa.schema(
    [
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
    ]
)


@dataclass
class LandingFile:
    uri: str
    kind: str
    size: int
    mtime_ns: int
    path: str = field(repr=False, default="")


@dataclass
class LandingRead:
    """One landing file read into memory: its bytes (for the checksum and, if it fails
    validation, the quarantine copy) and its rows, or why it could not be read."""

    file: LandingFile
    raw: bytes
    checksum: str
    frame: pd.DataFrame | None
    error: str | None = None

    @property
    def rows(self) -> int:
        return 0 if self.frame is None else len(self.frame)


@dataclass
class Discovery:
    new: list[LandingFile]
    changed: list[dict]
    already_ingested: int


@dataclass
class IngestResult:
    """Tonight's new landing files, read, and what was found changed since ingestion."""

    reads: list[LandingRead]
    changed: list[dict]
    already_ingested: int

    def summary(self) -> dict:
        return {
            "new_files": len(self.reads),
            "already_ingested": self.already_ingested,
            "changed_after_ingestion": self.changed,
        }


def ingest(landing: str, home: Home) -> IngestResult:
    """Find and read the landing files not yet in the manifest."""
    fs, files = list_landing(landing)
    found = discover(fs, files, read_manifest(home))
    for change in found.changed:
        log.warning("%s changed after it was ingested (checksum %s, now %s); it is not re-read",
                    change["file"], change["ingested_checksum"][:12], change["checksum_now"][:12])
    reads = [read_landing_file(fs, f) for f in found.new]
    log.info("landing %s: %d new file(s), %d already ingested", landing, len(reads), found.already_ingested)
    return IngestResult(reads=reads, changed=found.changed, already_ingested=found.already_ingested)


def open_landing(landing: str) -> tuple[pafs.FileSystem, str]:
    if "://" in landing:
        try:
            return pafs.FileSystem.from_uri(landing)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as error:
            raise LlmrecError(f"landing={landing!r}: cannot open this URI ({error})") from error
    path = Path(landing).expanduser().resolve()
    if not path.is_dir():
        raise LlmrecError(f"landing={landing!r}: folder {path} does not exist; it must hold events/, items/, users/")
    return pafs.LocalFileSystem(), str(path)


def list_landing(landing: str) -> tuple[pafs.FileSystem, list[LandingFile]]:
    fs, base = open_landing(landing)
    found = []
    for kind in KINDS:
        selector = pafs.FileSelector(f"{base}/{kind}", allow_not_found=True)
        for info in fs.get_file_info(selector):
            if info.type != pafs.FileType.File or not info.base_name.endswith(".parquet"):
                continue
            uri = info.path if "://" not in landing else f"{landing.split('://')[0]}://{info.path}"
            found.append(LandingFile(uri=uri, kind=kind, size=int(info.size), mtime_ns=int(info.mtime_ns or 0), path=info.path))
    if not found and not any(fs.get_file_info(f"{base}/{k}").type == pafs.FileType.Directory for k in KINDS):
        raise LlmrecError(f"landing={landing!r}: has none of the sub-folders {', '.join(KINDS)}")
    return fs, sorted(found, key=lambda f: (KINDS.index(f.kind), f.uri))


def read_manifest(home: Home) -> pd.DataFrame:
    if not home.manifest.exists():
        return MANIFEST_SCHEMA.empty_table().to_pandas()
    return pq.read_table(home.manifest).to_pandas()


def discover(fs: pafs.FileSystem, files: list[LandingFile], manifest: pd.DataFrame) -> Discovery:
    """Split landing files into new ones and ones already in the manifest; a known file
    whose bytes changed since is reported, never silently re-read."""
    known = {row.file: row for row in manifest.itertuples(index=False)}
    new, changed, same = [], [], 0
    for file in files:
        entry = known.get(file.uri)
        if entry is None:
            new.append(file)
            continue
        same += 1
        if file.size == entry.size and file.mtime_ns == entry.mtime_ns:
            continue
        checksum = sha256(read_bytes(fs, file))
        if checksum != entry.checksum:
            changed.append({"file": file.uri, "ingested_checksum": entry.checksum, "checksum_now": checksum,
                            "ingested_size": int(entry.size), "size_now": file.size})
    return Discovery(new=new, changed=changed, already_ingested=same)


def read_bytes(fs: pafs.FileSystem, file: LandingFile) -> bytes:
    with fs.open_input_stream(file.path) as stream:
        return stream.read()


def sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def read_landing_file(fs: pafs.FileSystem, file: LandingFile) -> LandingRead:
    try:
        raw = read_bytes(fs, file)
    except OSError as error:
        raise LlmrecError(f"{file.uri}: cannot read ({error})") from error
    try:
        frame = pq.read_table(io.BytesIO(raw)).to_pandas()
    except (pa.ArrowException, OSError, ValueError) as error:
        return LandingRead(file, raw, sha256(raw), None, f"not a readable Parquet file: {error}")
    return LandingRead(file, raw, sha256(raw), frame)


def next_ingest_seq(manifest: pd.DataFrame) -> int:
    return int(manifest["ingest_seq"].max()) + 1 if len(manifest) else 1


def write_atomic(table: pa.Table, path: Path) -> None:
    replace_atomically(path, lambda tmp: pq.write_table(table, tmp))


def manifest_entry(read: LandingRead, status: str, seq: int, quarantine_path: str | None = None) -> dict:
    max_ts = None
    if read.frame is not None and read.file.kind == EVENTS and "timestamp" in read.frame and len(read.frame):
        max_ts = pd.to_datetime(read.frame["timestamp"], utc=True, errors="coerce").max()
    return {
        "file": read.file.uri,
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
    }


def upsert(path: Path, new: pd.DataFrame, id_column: str) -> int:
    """Catalog upsert: the newest row per id wins; returns the catalog size."""
    frames = [pd.read_parquet(path)] if path.exists() else []
    merged = pd.concat(frames + [new], ignore_index=True).drop_duplicates(id_column, keep="last")
    merged = merged.astype({id_column: str})
    write_atomic(pa.Table.from_pandas(merged, preserve_index=False), path)
    return len(merged)


def curate(home: Home, accepted: list[LandingRead], quarantined: list[tuple[LandingRead, str]], seq: int) -> pd.DataFrame:
    """Append accepted files to the curated data, then record every file (accepted and
    quarantined) in the manifest. Data is written before the manifest, and partition
    files are named by content, so a crash in between re-writes rather than duplicates."""
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
        stem = Path(read.file.uri).stem
        for day, rows in events.groupby(events["timestamp"].dt.strftime("%Y-%m-%d")):
            target = home.events / f"date={day}" / f"part-{stem}-{read.checksum[:12]}.parquet"
            write_atomic(pa.Table.from_pandas(rows.reset_index(drop=True), preserve_index=False), target)
    entries = [manifest_entry(r, "curated", seq) for r in accepted]
    entries += [manifest_entry(r, "quarantined", seq, path) for r, path in quarantined]
    manifest = read_manifest(home)
    if entries:
        added = pa.Table.from_pylist(entries, schema=MANIFEST_SCHEMA).to_pandas()
        manifest = pd.concat([manifest, added], ignore_index=True) if len(manifest) else added
        write_atomic(pa.Table.from_pandas(manifest, schema=MANIFEST_SCHEMA, preserve_index=False), home.manifest)
    return manifest


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


def read_catalog_texts(home: Home) -> CatalogTexts:
    return CatalogTexts(users=render_text(read_catalog(home, USERS), "user_id").to_dict(),
                        items=render_text(read_catalog(home, ITEMS), "item_id").to_dict())


def read_catalog(home: Home, kind: str) -> pd.DataFrame:
    path = home.items if kind == ITEMS else home.users
    id_column = "item_id" if kind == ITEMS else "user_id"
    if not path.exists():
        return pd.DataFrame({id_column: pd.Series(dtype=str)})
    return pd.read_parquet(path)
