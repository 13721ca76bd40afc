"""Validate and curate: every new landing entry is checked; the failures are quarantined
with their report, the rest appended to the curated data with a manifest entry each.
Event rows whose (user_id, item_id, timestamp) is already curated, or came in an earlier
entry of the same batch, are dropped as duplicates and counted."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import pandas as pd

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


def event_keys(events: pd.DataFrame) -> pd.MultiIndex:
    """(user_id, item_id, timestamp in UTC nanoseconds) of each row, comparable across
    files whatever their timestamp unit."""
    stamps = pd.to_datetime(events["timestamp"], utc=True).dt.as_unit("ns").astype("int64")
    return pd.MultiIndex.from_arrays([events["user_id"].astype(str).to_numpy(), events["item_id"].astype(str).to_numpy(),
                                      stamps.to_numpy()])


def drop_duplicates(reads: list[ingest.LandingRead], curated: pd.DataFrame) -> list[ingest.LandingRead]:
    """Each events read without the rows whose key is in `curated` or in an earlier read
    of `reads`; the count dropped goes to the read's `duplicates`."""
    seen = event_keys(curated)
    out = []
    for read in reads:
        if read.file.kind != EVENTS:
            out.append(read)
            continue
        keys = event_keys(read.frame)
        repeated = keys.isin(seen)
        seen = seen.append(keys[~repeated])
        fresh = read.frame[~repeated].reset_index(drop=True)
        out.append(dataclasses.replace(read, frame=fresh, duplicates=int(repeated.sum())))
    return out


def validate_and_curate(home: Home, batch: ingest.IngestResult, fail_on_invalid: bool = False) -> CurateResult:
    """Validate every new entry; quarantine the failures; append the rest, without duplicate
    event rows, to the curated data. Catalog files are checked first so events may
    reference items arriving with them."""
    manifest = ingest.read_manifest(home)
    seq = ingest.next_ingest_seq(manifest)
    validator = Validator(home.gx)
    results: list[tuple[ingest.LandingRead, FileValidation]] = []
    known_items = set(ingest.read_catalog(home, ITEMS)["item_id"].astype(str))
    for kind in (ITEMS, USERS, EVENTS):
        for read in (r for r in batch.reads if r.file.kind == kind):
            if read.frame is None:
                result = validator.unreadable(read.file.uri, kind, read.error)
            else:
                result = validator.validate(read.frame, kind, read.file.uri, known_items if kind == EVENTS else None)
            if kind == ITEMS and result.success:
                known_items |= set(read.frame["item_id"].astype(str))
            results.append((read, result))
    failed = [(read, result) for read, result in results if not result.success]
    quarantined = [(read, str(quarantine(result, read.contents, home.quarantine, read.checksum)))
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
    accepted = drop_duplicates([read for read, result in results if result.success],
                               ingest.read_event_keys(home))
    ingest.curate(home, accepted, quarantined, seq)
    duplicates = sum(r.duplicates for r in accepted)
    if duplicates:
        log.warning("dropped %d event row(s) already curated or repeated across tonight's files", duplicates)
    return CurateResult(
        ingest_seq=seq,
        files_curated=[r.file.name for r in accepted],
        files_quarantined=[{"file": r.file.name, "quarantine": path} for r, path in quarantined],
        rows_in=event_rows(r for r, _ in results),
        rows_curated=event_rows(accepted),
        rows_quarantined=event_rows(r for r, _ in failed),
        rows_duplicate=duplicates,
        validation=[result.to_dict() for _, result in results],
        validation_markdown=validation_markdown,
    )
