"""Validate landing files with Great Expectations before their rows are curated.

One file-mode GX context under `gx_root` holds one suite per landing kind (built here from
`schema.py`), a checkpoint per suite, and a Data Docs site at `gx_root/data_docs`. Each
file's result becomes a `FileValidation`: plain failures a person can read, the path of
its Data Docs page, and what `quarantine` writes next to a copy of a rejected file.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import html
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

import great_expectations as gx
import great_expectations.expectations as gxe
import numpy as np
import pandas as pd
import pyarrow as pa
from great_expectations.checkpoint import UpdateDataDocsAction
from great_expectations.core.run_identifier import RunIdentifier
from great_expectations.data_context.types.base import ProgressBarsConfig
from great_expectations.exceptions import DataContextError

from llmrec import schema
from llmrec.files import bounded_name
from llmrec.report import render_table

SITE = "llmrec"
DOCS_FOLDER = "data_docs"
DATASOURCE = "landing"
BATCH_DEFINITION = "whole_file"
MAX_EXAMPLES = 5
UTC_NAMES = {"UTC", "Etc/UTC"}
TIMEZONE_CHECK = "llmrec_expect_column_timezone_to_be_utc"
# An id that is empty or only whitespace names nobody.
BLANK = r"^\s*$"
TYPE_WORDS = {"str": "string", "float64": "float64", "Timestamp": "tz-aware datetime"}


@dataclass
class Failure:
    """One failed expectation, in words a person can act on."""

    expectation: str
    column: str | None
    rule: str
    unexpected_count: int | None
    examples: list = field(default_factory=list)
    observed: object | None = None


@dataclass
class FileValidation:
    """The outcome of validating one landing file."""

    source: str
    kind: str
    rows: int
    success: bool
    failures: list[Failure]
    read_error: str | None = None
    data_docs: str | None = None

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of every field."""
        return _jsonable(asdict(self))

    def summary(self) -> str:
        """One line per failure (column, rule, count, examples); one line when it passed or
        could not be read."""
        if self.read_error is not None:
            return f"{self.source}: unreadable: {self.read_error}"
        if self.success:
            return f"{self.source}: passed ({self.rows} rows)"
        return "\n".join(f"{self.source}: {f.column or '(table)'}: {_describe(f)}" for f in self.failures)


def _describe(failure: Failure, code: str = "") -> str:
    """The rule, count, examples and observed value of a failure; values wrapped in `code`."""
    def show(value: object) -> str:
        return f"{code}{json.dumps(value)}{code}"

    text = failure.rule
    if failure.unexpected_count is not None:
        text += f"; {failure.unexpected_count} unexpected"
    if failure.examples:
        text += ", e.g. " + ", ".join(show(e) for e in failure.examples)
    if failure.observed is not None:
        text += f"; observed {show(failure.observed)}"
    return text


# -- suites -----------------------------------------------------------------------------


def _gx_type(pa_type: pa.DataType) -> str:
    """The `type_` that ExpectColumnValuesToBeOfType matches for this Arrow type in pandas.

    GX compares `dtype.type`: pandas 3 strings are `str`, float64 is `float64`, and a
    tz-aware datetime column (any unit, any zone) is `Timestamp` (a naive one is
    `datetime64`). The zone itself is checked by `timezone_failures`."""
    if pa.types.is_string(pa_type):
        return "str"
    if pa.types.is_float64(pa_type):
        return "float64"
    if pa.types.is_timestamp(pa_type) and pa_type.tz is not None:
        return "Timestamp"
    raise ValueError(f"no GX type check for Arrow type {pa_type}")


def _required_expectations(kind: str) -> list[gxe.Expectation]:
    """Presence, type and non-null checks of every required column of `kind`; ids not blank."""
    expectations = []
    for column, pa_type in schema.required_columns(kind).items():
        expectations += [
            gxe.ExpectColumnToExist(column=column),
            gxe.ExpectColumnValuesToBeOfType(column=column, type_=_gx_type(pa_type)),
            gxe.ExpectColumnValuesToNotBeNull(column=column),
        ]
        if column.endswith("_id"):
            expectations.append(gxe.ExpectColumnValuesToNotMatchRegex(column=column, regex=BLANK))
    return expectations


def events_suite(check_items: bool) -> gx.ExpectationSuite:
    """Events: required columns with their types and no nulls, rating within the scale
    (inf fails, NaN counts as null), (user_id, item_id, timestamp) unique, no timestamp
    after the run parameter `now`, non-empty; with `check_items`, item_id must be in the
    run parameter `known_item_ids`.

    Run-dependent values are parameters so the stored suite stays the same from run to run."""
    expectations = _required_expectations(schema.EVENTS) + [
        gxe.ExpectColumnValuesToBeBetween(column="rating", min_value=schema.RATING_MIN, max_value=schema.RATING_MAX),
        gxe.ExpectColumnValuesToBeBetween(column="timestamp", max_value={"$PARAMETER": "now"}),
        key_unique(),
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
    ]
    if check_items:
        known = {"$PARAMETER": "known_item_ids"}
        expectations.append(gxe.ExpectColumnValuesToBeInSet(column="item_id", value_set=known))
    return gx.ExpectationSuite(name="events_catalog" if check_items else "events", expectations=expectations)


def key_unique() -> gxe.Expectation:
    return gxe.ExpectCompoundColumnsToBeUnique(column_list=schema.EVENT_KEY)


def keys_suite() -> gx.ExpectationSuite:
    """The events key check alone: run on the rows whose key repeats across the batches of
    a file validated in batches (`Validator.validate_batches`)."""
    return gx.ExpectationSuite(name="events_keys", expectations=[key_unique()])


def suite_of(kind: str, check_items: bool, keys_only: bool = False) -> gx.ExpectationSuite:
    if keys_only:
        return keys_suite()
    if kind == schema.EVENTS:
        return events_suite(check_items)
    return items_suite() if kind == schema.ITEMS else users_suite()


def items_suite() -> gx.ExpectationSuite:
    """Items: item_id and title present, string, non-null; item_id unique; non-empty."""
    expectations = _required_expectations(schema.ITEMS) + [
        gxe.ExpectColumnValuesToBeUnique(column="item_id"),
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
    ]
    return gx.ExpectationSuite(name=schema.ITEMS, expectations=expectations)


def users_suite() -> gx.ExpectationSuite:
    """Users: user_id present, string, non-null, unique; non-empty."""
    expectations = _required_expectations(schema.USERS) + [
        gxe.ExpectColumnValuesToBeUnique(column="user_id"),
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
    ]
    return gx.ExpectationSuite(name=schema.USERS, expectations=expectations)


def _rule(expectation: str, kwargs: dict) -> str:
    """The sentence for an expectation, from its kwargs with run parameters filled in."""
    column = kwargs.get("column")
    low, high = _jsonable(kwargs.get("min_value")), _jsonable(kwargs.get("max_value"))
    if expectation == "expect_column_to_exist":
        return f"column {column} present"
    if expectation == "expect_column_values_to_be_of_type":
        return f"{column} of type {TYPE_WORDS.get(kwargs['type_'], kwargs['type_'])}"
    if expectation == "expect_column_values_to_not_be_null":
        return f"{column} not null"
    if expectation == "expect_column_values_to_not_match_regex":
        return f"{column} not blank"
    if expectation == "expect_column_values_to_be_between":
        if low is not None and high is not None:
            return f"{column} between {low} and {high}"
        return f"{column} at most {high}" if low is None else f"{column} at least {low}"
    if expectation == "expect_column_values_to_be_in_set":
        return f"{column} among the known ids (catalog plus this batch)"
    if expectation in ("expect_column_values_to_be_unique", "expect_compound_columns_to_be_unique"):
        return f"({', '.join(kwargs['column_list'])}) unique" if "column_list" in kwargs else f"{column} unique"
    if expectation == "expect_table_row_count_to_be_between":
        return f"at least {low} row" + "s" * (low != 1)
    return expectation


def timezone_failures(frame: pd.DataFrame, kind: str) -> list[Failure]:
    """UTC check of tz-aware timestamp columns, which GX's type check cannot express: its
    `Timestamp` type matches a tz-aware column in any zone."""
    failures = []
    for column, pa_type in schema.required_columns(kind).items():
        if not (pa.types.is_timestamp(pa_type) and pa_type.tz) or column not in frame.columns:
            continue
        dtype = frame[column].dtype
        if isinstance(dtype, pd.DatetimeTZDtype) and str(dtype.tz) not in UTC_NAMES:
            failures.append(
                Failure(TIMEZONE_CHECK, column, f"{column} in time zone {pa_type.tz}", None, [], str(dtype.tz))
            )
    return failures


# -- running them ---------------------------------------------------------------------


class Validator:
    """Runs the landing suites through one file-mode GX context under `gx_root`.

    Create one per run and reuse it for every file: opening the context is the slow part.
    `now` (default: the current time) is the latest timestamp an event may carry."""

    def __init__(self, gx_root: Path, now: pd.Timestamp | None = None):
        now = pd.Timestamp.now(tz="UTC") if now is None else pd.Timestamp(now)
        self.now = now.tz_localize("UTC") if now.tz is None else now.tz_convert("UTC")
        self.gx_root = Path(gx_root)
        self.docs_dir = self.gx_root / DOCS_FOLDER
        self.context = gx.get_context(mode="file", project_root_dir=str(self.gx_root))
        # TQDM_DISABLE is ignored (GX passes disable= itself); only this config silences them.
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.context.variables.save()
        if SITE not in self.context.get_site_names():
            self.context.add_data_docs_site(
                site_name=SITE,
                site_config={
                    "class_name": "SiteBuilder",
                    "store_backend": {
                        "class_name": "TupleFilesystemStoreBackend",
                        "base_directory": str(self.docs_dir),
                    },
                    "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                },
            )
        self._checkpoints: dict[tuple[str, bool, bool], gx.Checkpoint] = {}

    def _checkpoint(self, kind: str, check_items: bool, keys_only: bool = False) -> gx.Checkpoint:
        """The checkpoint of `kind`'s suite, registered (or refreshed) once per Validator."""
        if (kind, check_items, keys_only) in self._checkpoints:
            return self._checkpoints[kind, check_items, keys_only]
        suite = self._save_suite(suite_of(kind, check_items, keys_only))
        validation = self.context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=suite.name, data=self._batch_definition(kind), suite=suite)
        )
        checkpoint = self.context.checkpoints.add_or_update(
            gx.Checkpoint(
                name=suite.name,
                validation_definitions=[validation],
                actions=[UpdateDataDocsAction(name="data_docs", site_names=[SITE])],
                # SUMMARY keeps a handful of examples, not every offending value, in the stored result.
                result_format={"result_format": "SUMMARY", "partial_unexpected_count": MAX_EXAMPLES},
            )
        )
        self._checkpoints[kind, check_items, keys_only] = checkpoint
        return checkpoint

    def _save_suite(self, suite: gx.ExpectationSuite) -> gx.ExpectationSuite:
        """The stored suite when it already holds these expectations, else `suite` saved."""
        try:
            stored = self.context.suites.get(suite.name)
        except DataContextError:
            return self.context.suites.add(suite)
        # add_or_update compares expectations ids included, so a suite rebuilt in code always
        # gets new ids and the checkpoints another Validator holds on this folder go stale.
        if [e.copy(update={"id": None}) for e in stored.expectations] == suite.expectations:
            return stored
        return self.context.suites.add_or_update(suite)

    def _batch_definition(self, kind: str):
        # Get-or-add: add_or_update_pandas would drop the assets an earlier run registered.
        try:
            source = self.context.data_sources.get(DATASOURCE)
        except KeyError:
            source = self.context.data_sources.add_pandas(DATASOURCE)
        try:
            asset = source.get_asset(kind)
        except LookupError:
            asset = source.add_dataframe_asset(kind)
        try:
            return asset.get_batch_definition(BATCH_DEFINITION)
        except KeyError:
            return asset.add_batch_definition_whole_dataframe(BATCH_DEFINITION)

    def validate(
        self, frame: pd.DataFrame, kind: str, source: str, known_item_ids: set[str] | None = None,
        keys_only: bool = False,
    ) -> FileValidation:
        """Run `kind`'s suite (with `keys_only`, the events key check alone) on `frame` (read
        from `source`; not modified). For events, `known_item_ids` (catalog plus this
        batch's items) enables the item_id check."""
        if kind not in schema.KINDS:
            raise ValueError(f"unknown landing kind {kind!r}; expected one of {schema.KINDS}")
        check_items = kind == schema.EVENTS and known_item_ids is not None and not keys_only
        parameters = {"now": self.now.isoformat()}
        if check_items:
            present = frame["item_id"].dropna().unique() if "item_id" in frame.columns else []
            # The same verdict as the whole catalog, but the set GX stores and renders stays
            # as small as this file's distinct ids.
            parameters["known_item_ids"] = sorted({i for i in present if i in known_item_ids})
        # GX names a folder after the run; a 255-byte landing name plus its suffixes would not fit.
        run_id = RunIdentifier(run_name=bounded_name(_file_name(source), limit=200), run_time=dt.datetime.now(dt.timezone.utc))
        # Copy-on-write (pandas 3) makes this shallow copy a firewall for the caller's frame.
        result = self._checkpoint(kind, check_items, keys_only).run(
            batch_parameters={"dataframe": frame.copy(deep=False)}, expectation_parameters=parameters, run_id=run_id
        )
        key, suite_result = next(iter(result.run_results.items()))
        failures = _failures(suite_result.results, frame.columns)
        failures += timezone_failures(frame, kind)
        return FileValidation(
            source=source,
            kind=kind,
            rows=len(frame),
            success=not failures,
            failures=failures,
            data_docs=self._docs_page(key),
        )

    def validate_batches(
        self, batches: Callable[[], Iterable[pd.DataFrame]], kind: str, source: str,
        known_item_ids: set[str] | None = None,
    ) -> FileValidation:
        """`validate` of a file read in record batches: `batches()` scans it (once more when
        event keys repeat across batches). Each batch runs the suite, and the failures of an
        expectation add up over batches: counts summed, the first MAX_EXAMPLES examples and
        the first observed value kept, in the suite's order, as `validate` of the whole file
        would report them. The event key's uniqueness spans batches: when a key hash repeats,
        the rows of the repeated hashes are gathered by a second scan and the key check runs
        on them alone, which counts what the whole file would. The Data Docs page is the
        first failing run's, else the last batch's."""
        merged: dict[tuple[str, str | None], Failure] = {}
        rows, docs, failed_docs, hashes = 0, None, None, []
        for frame in batches():
            result = self.validate(frame, kind, source, known_item_ids)
            rows, docs = rows + result.rows, result.data_docs
            failed_docs = failed_docs or (None if result.success else result.data_docs)
            for failure in result.failures:
                _merge(merged, failure)
            if kind == schema.EVENTS and set(schema.EVENT_KEY) <= set(frame.columns):
                hashes.append(_key_hashes(frame))
        unique = ("expect_compound_columns_to_be_unique", ",".join(schema.EVENT_KEY))
        broken = any(e in ("expect_column_to_exist", "expect_column_values_to_be_of_type") and c in schema.EVENT_KEY
                     for e, c in merged)
        if len(hashes) > 1 and not broken:
            values, counts = np.unique(np.concatenate(hashes), return_counts=True)
            repeated = values[counts > 1]
            merged.pop(unique, None)
            if len(repeated):
                gathered = pd.concat([f[np.isin(_key_hashes(f), repeated)] for f in batches()], ignore_index=True)
                result = self.validate(gathered, kind, source, keys_only=True)
                merged.update({unique: f for f in result.failures if (f.expectation, f.column) == unique})
                failed_docs = failed_docs or (None if result.success else result.data_docs)
        order = [(e.expectation_type, ",".join(e.configuration.kwargs.get("column_list") or [])
                  or e.configuration.kwargs.get("column")) for e in suite_of(kind, known_item_ids is not None).expectations]
        failures = sorted(merged.values(), key=lambda f: order.index((f.expectation, f.column))
                          if (f.expectation, f.column) in order else len(order))
        return FileValidation(source=source, kind=kind, rows=rows, success=not failures, failures=failures,
                              data_docs=failed_docs or docs)

    def _docs_page(self, key) -> str | None:
        for site in self.context.get_docs_sites_urls(resource_identifier=key, site_names=[SITE]):
            url = urlparse(site["site_url"])
            if url.scheme == "file":
                return unquote(url.path)
        return None

    def unreadable(self, source: str, kind: str, error: str) -> FileValidation:
        """The result for a file that could not be read as Parquet."""
        return FileValidation(source=source, kind=kind, rows=0, success=False, failures=[], read_error=error)


def _failures(results, columns: pd.Index) -> list[Failure]:
    """Failures of one GX suite result. An expectation that raised because its column is
    missing or of the wrong type is left out: the presence or type failure already names
    the cause, which is the readable message."""
    present = set(columns)
    wrong_type = {
        r.expectation_config.kwargs["column"]
        for r in results
        if not r.success and r.expectation_config.type == "expect_column_values_to_be_of_type"
    }
    failures = []
    for r in results:
        if r.success:
            continue
        config = r.expectation_config
        kwargs = config.kwargs
        checked = kwargs.get("column_list") or ([kwargs["column"]] if "column" in kwargs else [])
        error = _error_message(r.exception_info)
        if error and any(c not in present or c in wrong_type for c in checked):
            continue
        outcome = r.result or {}
        count = outcome.get("unexpected_count")
        failures.append(
            Failure(
                expectation=config.type,
                column=",".join(checked) or None,
                rule=_rule(config.type, kwargs),
                unexpected_count=None if count is None else int(count),
                examples=_jsonable(list(outcome.get("partial_unexpected_list") or [])[:MAX_EXAMPLES]),
                observed=_jsonable(outcome.get("observed_value")) if not error else f"error: {error}",
            )
        )
    return failures


def _merge(merged: dict[tuple[str, str | None], Failure], failure: Failure) -> None:
    """Add one batch's failure to the file's: counts summed, examples capped."""
    key = (failure.expectation, failure.column)
    if key not in merged:
        merged[key] = dataclasses.replace(failure, examples=list(failure.examples))
        return
    kept = merged[key]
    if failure.unexpected_count is not None:
        kept.unexpected_count = (kept.unexpected_count or 0) + failure.unexpected_count
    kept.examples = (kept.examples + failure.examples)[:MAX_EXAMPLES]


def _key_hashes(frame: pd.DataFrame) -> np.ndarray:
    """A 64-bit hash of each row's event key: equal keys hash equal, so only rows whose
    hash repeats can repeat a key."""
    return pd.util.hash_pandas_object(frame[schema.EVENT_KEY], index=False).to_numpy()


def _error_message(info: dict | None) -> str | None:
    """GX reports a raised metric either flat ({raised_exception, exception_message}) or
    keyed by metric id ({<metric>: {raised_exception, ...}})."""
    if not info:
        return None
    if info.get("raised_exception"):
        return info.get("exception_message") or "raised an exception"
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return value.get("exception_message") or "raised an exception"
    return None


def _jsonable(value):
    """`value` with pandas/numpy scalars made JSON-safe: NaN/NaT -> None, inf -> "inf",
    timestamps -> ISO strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, (str, int, bool)):
        return value
    return str(value)


# -- quarantine and report --------------------------------------------------------------


def _file_name(source: str) -> str:
    """The last path segment of a local path or URI."""
    return re.split(r"[\\/]", source.rstrip("/\\"))[-1] or "landing-file"


def quarantine(result: FileValidation, contents: dict[str, Callable[[], BinaryIO]], quarantine_dir: Path,
               checksum: str) -> Path:
    """Keep a rejected landing entry at `quarantine_dir/<name>-<checksum[:12]>/`: its original
    bytes (`contents`: by name, a function opening the file as a stream, copied chunk by
    chunk; none for an entry that could not be read), `validation.json`
    and `data_docs.html`. Built in a temp folder and moved into place in one rename; an
    existing copy of the same content is left as it is. A name too long for the file system
    is shortened with a hash (`files.bounded_name`)."""
    name = _file_name(result.source)
    quarantine_dir = Path(quarantine_dir)
    target = quarantine_dir / bounded_name(f"{name}-{(checksum or 'unread')[:12]}")
    if target.exists():
        return target
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{hashlib.sha256(target.name.encode()).hexdigest()[:12]}.",
                                    dir=quarantine_dir))
    try:
        for inner, open_source in contents.items():
            (staging / inner).parent.mkdir(parents=True, exist_ok=True)
            with open_source() as source, open(staging / inner, "wb") as copy:
                shutil.copyfileobj(source, copy)
        (staging / "validation.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        if result.data_docs and Path(result.data_docs).is_file():
            shutil.copyfile(result.data_docs, staging / "data_docs.html")
        elif result.read_error is not None:
            (staging / "data_docs.html").write_text(_read_error_page(result))
        os.replace(staging, target)
    except OSError:
        # Our own staging folder only; a concurrent run that won the rename leaves target.
        shutil.rmtree(staging, ignore_errors=True)
        if not target.exists():
            raise
    return target


def _read_error_page(result: FileValidation) -> str:
    source, error = html.escape(result.source), html.escape(result.read_error or "")
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>Unreadable landing file</title></head>\n"
        f"<body><h1>Unreadable landing file</h1><p><b>File:</b> <code>{source}</code> "
        f"({html.escape(result.kind)})</p>\n<p>It could not be read, so no expectation ran.</p>\n"
        f"<pre>{error}</pre></body></html>\n"
    )


def _code(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def outcome(result: FileValidation) -> str:
    if result.read_error is not None:
        return "unreadable"
    if result.success:
        return "passed"
    return f"failed ({len(result.failures)} expectation{'s' * (len(result.failures) != 1)})"


def report_markdown(results: list[FileValidation]) -> str:
    """A markdown table of every file (file, kind, rows, outcome), then the failed
    expectations of each failed file with counts and examples."""
    if not results:
        return "No landing files were validated.\n"
    rows = [{"file": r.source, "kind": r.kind, "rows": r.rows, "outcome": outcome(r)} for r in results]
    lines = [render_table(rows)]
    for r in results:
        if r.success:
            continue
        lines += ["", f"### {r.source}", ""]
        if r.read_error is not None:
            lines.append(f"- could not be read: `{_code(r.read_error)}`")
        lines += [f"- `{f.column or '(table)'}` ({f.expectation}): {_describe(f, code='`')}" for f in r.failures]
        if r.data_docs:
            lines.append(f"- Data Docs: {r.data_docs}")
    return "\n".join(lines) + "\n"
