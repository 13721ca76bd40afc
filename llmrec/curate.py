"""Validate and curate: every new landing entry is checked; the failures are quarantined
with their report, the rest appended to the curated data with a manifest entry each.
Event rows whose (user_id, item_id, timestamp) is already curated, or came in an earlier
entry of the same batch, are dropped as duplicates and counted."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pyarrow as pa

from llmrec import ingest
from llmrec.config import Home
from llmrec.errors import LlmrecError
from llmrec.schema import EVENTS, ITEMS, USERS
from llmrec.validate import FileValidation, Validator, quarantine, report_markdown

log = logging.getLogger(__name__)


@dataclass
class CurateResult:
    ingest_seq: int
    files_curated: list[str]
    files_quarantined: list[dict]
    rows_in: int
    rows_curated: int
    rows_quarantined: int
    rows_duplicate: int = 0
    validation: list[dict] = field(default_factory=list)
    validation_markdown: str = ""

    def summary(self) -> dict:
        return {
            "ingest_seq": self.ingest_seq,
            "files_curated": len(self.files_curated),
            "files_quarantined": len(self.files_quarantined),
            "rows_in": self.rows_in,
            "rows_curated": self.rows_curated,
            "rows_quarantined": self.rows_quarantined,
            "rows_duplicate": self.rows_duplicate,
        }


def event_rows(reads) -> int:
    return sum(r.rows for r in reads if r.file.kind == EVENTS)


def validate_and_curate(home: Home, batch: ingest.IngestResult, fail_on_invalid: bool = False,
                        batch_rows: int = ingest.BATCH_ROWS) -> CurateResult:
    """Validate every new entry; quarantine the failures; append the rest, without duplicate
    event rows, to the curated data. Catalog files are checked first so events may
    reference items arriving with them. Events entries are validated and written
    `batch_rows` rows at a time."""
    manifest = ingest.read_manifest(home)
    seq = ingest.next_ingest_seq(manifest)
    validator = Validator(home.gx)
    results: list[tuple[ingest.LandingRead, FileValidation]] = []
    known_items = set(ingest.read_catalog(home, ITEMS)["item_id"].astype(str))
    for kind in (ITEMS, USERS, EVENTS):
        for read in (r for r in batch.reads if r.file.kind == kind):
            result = validate_read(validator, read, known_items, batch_rows)
            if kind == ITEMS and result.success:
                known_items |= set(read.frame["item_id"].astype(str))
            results.append((read, result))
    rows_in = event_rows(r for r, _ in results)
    failed = [(read, result) for read, result in results if not result.success]
    quarantined = [(read, str(quarantine(result, read.openers(), home.quarantine, read.checksum)))
                   for read, result in failed]
    validation_markdown = report_markdown([result for _, result in results])
    for read, result in failed:
        log.warning("quarantined %s: %s", read.file.name, result.summary())
    if failed and fail_on_invalid:
        ingest.curate(home, [], quarantined, seq)
        raise LlmrecError(
            f"{len(failed)} landing file(s) failed validation and fail_on_invalid is set; nothing was curated:\n"
            + "\n".join(f"{r.file.name}: {res.summary()}" for r, res in failed)
        )
    accepted = [read for read, result in results if result.success]
    ingest.curate(home, accepted, quarantined, seq, batch_rows)
    duplicates = sum(r.duplicates for r in accepted)
    if duplicates:
        log.warning("dropped %d event row(s) already curated or repeated across tonight's files", duplicates)
    return CurateResult(
        ingest_seq=seq,
        files_curated=[r.file.name for r in accepted],
        files_quarantined=[{"file": r.file.name, "quarantine": path} for r, path in quarantined],
        rows_in=rows_in,
        rows_curated=event_rows(accepted),
        rows_quarantined=event_rows(r for r, _ in failed),
        rows_duplicate=duplicates,
        validation=[result.to_dict() for _, result in results],
        validation_markdown=validation_markdown,
    )


def validate_read(validator: Validator, read: ingest.LandingRead, known_items: set[str], batch_rows: int) -> FileValidation:
    """One entry's validation: catalogs as one frame, events in record batches (noting the
    newest timestamp for the manifest). A file that breaks while it is scanned is unreadable."""
    kind, uri = read.file.kind, read.file.uri
    if read.dataset is None:
        return validator.unreadable(uri, kind, read.error)

    def batches():
        read.max_timestamp = None
        for frame in read.batches(batch_rows):
            read.max_timestamp = ingest.later(read.max_timestamp, ingest.newest(frame))
            yield frame

    try:
        if kind != EVENTS:
            return validator.validate(read.frame, kind, uri)
        return validator.validate_batches(batches, kind, uri, known_items)
    except (pa.ArrowException, OSError) as error:
        return validator.unreadable(uri, kind, f"not a readable Parquet {read.file.entry}: {error}")
