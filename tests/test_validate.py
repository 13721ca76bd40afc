"""The landing suites against small frames that each break one rule, plus quarantine and
the markdown report."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest

from llmrec.ingest import sha256
from llmrec.validate import TIMEZONE_CHECK, FileValidation, Validator, quarantine, report_markdown

NOW = pd.Timestamp("2024-06-01", tz="UTC")
CATALOG = {"i1", "i2", "i3"}


@pytest.fixture(scope="module")
def validator(tmp_path_factory) -> Validator:
    return Validator(tmp_path_factory.mktemp("home") / "gx", now=NOW)


def events(n: int = 4) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": [f"u{i % 2}" for i in range(n)],
            "item_id": [f"i{i % 3 + 1}" for i in range(n)],
            "rating": [float(i % 5 + 1) for i in range(n)],
            "timestamp": pd.date_range("2024-01-01", periods=n, freq="h", tz="UTC").as_unit("us"),
        }
    )


def set_cell(column: str, value):
    def change(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.copy()
        frame.loc[1, column] = value
        return frame

    return change


def failed(result: FileValidation) -> set[tuple[str, str | None]]:
    return {(f.expectation, f.column) for f in result.failures}


def only_failure(result: FileValidation):
    assert not result.success
    assert len(result.failures) == 1, result.summary()
    return result.failures[0]


def test_valid_events_pass_and_frame_is_untouched(validator):
    frame = events()
    before = frame.copy()
    result = validator.validate(frame, "events", "landing/events/ok.parquet", known_item_ids=CATALOG)
    assert result.success, result.summary()
    assert result.failures == [] and result.rows == 4 and result.read_error is None
    assert result.data_docs and result.data_docs.endswith(".html")
    page = open(result.data_docs).read()
    assert "events_catalog" in page and "ok.parquet" in page and "values must belong to this set" in page
    pd.testing.assert_frame_equal(frame, before)
    assert list(frame.columns) == list(before.columns)


@pytest.mark.parametrize(
    "change, expectation, column, count, example",
    [
        (set_cell("rating", 7.0), "expect_column_values_to_be_between", "rating", 1, 7.0),
        (set_cell("rating", np.inf), "expect_column_values_to_be_between", "rating", 1, "inf"),
        (set_cell("rating", -np.inf), "expect_column_values_to_be_between", "rating", 1, "-inf"),
        (set_cell("rating", np.nan), "expect_column_values_to_not_be_null", "rating", 1, None),
        (set_cell("user_id", None), "expect_column_values_to_not_be_null", "user_id", 1, None),
        (set_cell("item_id", "i404"), "expect_column_values_to_be_in_set", "item_id", 1, "i404"),
        (
            set_cell("timestamp", pd.Timestamp("2030-01-01", tz="UTC")),
            "expect_column_values_to_be_between",
            "timestamp",
            1,
            "2030-01-01T00:00:00+00:00",
        ),
    ],
    ids=["rating-7", "rating-inf", "rating-minus-inf", "rating-nan", "null-user", "unknown-item", "future"],
)
def test_each_value_rule_fails_alone(validator, change, expectation, column, count, example):
    result = validator.validate(change(events()), "events", "landing/events/bad.parquet", known_item_ids=CATALOG)
    failure = only_failure(result)
    assert (failure.expectation, failure.column, failure.unexpected_count) == (expectation, column, count)
    assert failure.examples == [example]
    json.dumps(result.to_dict(), allow_nan=False)


def test_duplicate_user_item_timestamp_fails(validator):
    frame = pd.concat([events(), events().iloc[[0]]], ignore_index=True)
    failure = only_failure(validator.validate(frame, "events", "dup.parquet", known_item_ids=CATALOG))
    assert failure.expectation == "expect_compound_columns_to_be_unique"
    assert failure.column == "user_id,item_id,timestamp"
    assert failure.unexpected_count == 2
    assert failure.examples[0] == {"user_id": "u0", "item_id": "i1", "timestamp": "2024-01-01T00:00:00+00:00"}


def test_unknown_items_are_not_checked_without_a_catalog(validator):
    frame = set_cell("item_id", "i404")(events())
    assert validator.validate(frame, "events", "no-catalog.parquet").success


def test_missing_column_is_a_failure_naming_it(validator):
    result = validator.validate(events().drop(columns="rating"), "events", "missing.parquet", known_item_ids=CATALOG)
    failure = only_failure(result)
    assert (failure.expectation, failure.column) == ("expect_column_to_exist", "rating")
    assert "rating" in failure.rule and "rating" in result.summary()


def string_ratings(frame):
    return frame.astype({"rating": "str"})

def naive_timestamps(frame):
    return frame.assign(timestamp=frame["timestamp"].dt.tz_localize(None))


# pandas 2 keeps strings in object columns, which GX checks value by value: no observed
# type, the offending values are the examples.
@pytest.mark.parametrize("change, column, observed", [(string_ratings, "rating", None),
                                                      (naive_timestamps, "timestamp", "datetime64")])
def test_wrong_column_types_fail_the_type_check(validator, change, column, observed):
    failure = only_failure(validator.validate(change(events()), "events", "typed.parquet", known_item_ids=CATALOG))
    assert (failure.expectation, failure.column, failure.observed) == (
        "expect_column_values_to_be_of_type", column, observed)
    if observed is None:
        assert failure.examples == ["1.0", "2.0", "3.0", "4.0"]


def test_non_utc_timestamps_fail(validator):
    frame = events()
    frame["timestamp"] = frame["timestamp"].dt.tz_convert("Europe/Paris")
    failure = only_failure(validator.validate(frame, "events", "paris.parquet", known_item_ids=CATALOG))
    assert (failure.expectation, failure.column, failure.observed) == (TIMEZONE_CHECK, "timestamp", "Europe/Paris")


def test_empty_frames_fail(validator):
    failure = only_failure(validator.validate(events().iloc[:0], "events", "empty.parquet", known_item_ids=CATALOG))
    assert (failure.expectation, failure.column) == ("expect_table_row_count_to_be_between", None)
    assert failure.observed == 0
    no_columns = validator.validate(pd.DataFrame(), "events", "nothing.parquet", known_item_ids=CATALOG)
    assert failed(no_columns) == {
        ("expect_column_to_exist", c) for c in ("user_id", "item_id", "rating", "timestamp")
    } | {("expect_table_row_count_to_be_between", None)}


def test_items_and_users(validator):
    items = pd.DataFrame({"item_id": ["i1", "i2"], "title": ["A", "B"], "genres": ["x", None]})
    users = pd.DataFrame({"user_id": ["u1", "u2"], "age": [30, 40]})
    assert validator.validate(items, "items", "items.parquet").success
    assert validator.validate(users, "users", "users.parquet").success

    dup_items = validator.validate(pd.concat([items, items.iloc[[0]]]), "items", "dup-items.parquet")
    failure = only_failure(dup_items)
    assert (failure.expectation, failure.column, failure.unexpected_count) == (
        "expect_column_values_to_be_unique",
        "item_id",
        2,
    )
    dup_users = validator.validate(pd.concat([users, users.iloc[[1]]]), "users", "dup-users.parquet")
    assert failed(dup_users) == {("expect_column_values_to_be_unique", "user_id")}
    no_title = validator.validate(items.drop(columns="title"), "items", "no-title.parquet")
    assert failed(no_title) == {("expect_column_to_exist", "title")}


def test_a_second_validator_reuses_the_same_gx_folder(validator):
    again = Validator(validator.gx_root, now=NOW)
    assert again.validate(events(), "events", "again.parquet", known_item_ids=CATALOG).success
    assert not again.validate(set_cell("rating", 0.0)(events()), "events", "again-bad.parquet").success


def streams(name: str, raw: bytes) -> dict:
    """`quarantine`'s contents: per file name, a function opening the file as a stream."""
    return {name: lambda: io.BytesIO(raw)}


def test_quarantine_keeps_bytes_result_and_docs_once(validator, tmp_path):
    result = validator.validate(set_cell("rating", 7.0)(events()), "events", "s3://bucket/events/part-1.parquet")
    raw = b"PAR1\x00not really parquet\xff"
    target = quarantine(result, streams("part-1.parquet", raw), tmp_path / "quarantine", sha256(raw))
    assert target.parent == tmp_path / "quarantine" and target.name.startswith("part-1.parquet-")
    assert sorted(p.name for p in target.iterdir()) == ["data_docs.html", "part-1.parquet", "validation.json"]
    assert (target / "part-1.parquet").read_bytes() == raw
    assert json.loads((target / "validation.json").read_text()) == result.to_dict()
    assert (target / "data_docs.html").read_bytes() == open(result.data_docs, "rb").read()

    (target / "validation.json").write_text("kept")
    assert quarantine(result, streams("part-1.parquet", raw), tmp_path / "quarantine", sha256(raw)) == target
    assert (target / "validation.json").read_text() == "kept"
    assert [p.name for p in (tmp_path / "quarantine").iterdir()] == [target.name]

    other = quarantine(result, streams("part-1.parquet", raw + b"!"), tmp_path / "quarantine", sha256(raw + b"!"))
    assert other != target and len(list((tmp_path / "quarantine").iterdir())) == 2


def test_unreadable_files_are_quarantined_with_a_page(validator, tmp_path):
    result = validator.unreadable("landing/users/u.parquet", "users", "Parquet magic bytes not found <PAR1>")
    assert (result.success, result.rows, result.failures) == (False, 0, [])
    target = quarantine(result, streams("u.parquet", b"garbage"), tmp_path, sha256(b"garbage"))
    page = (target / "data_docs.html").read_text()
    assert "Parquet magic bytes not found &lt;PAR1&gt;" in page and "landing/users/u.parquet" in page
    assert json.loads((target / "validation.json").read_text())["read_error"].startswith("Parquet magic")
    assert "unreadable" in result.summary()


def test_report_names_file_column_count_and_example(validator):
    ok = validator.validate(events(), "events", "landing/events/ok.parquet", known_item_ids=CATALOG)
    bad = validator.validate(set_cell("rating", 7.0)(events()), "events", "landing/events/bad.parquet")
    broken = validator.unreadable("landing/items/x.parquet", "items", "not a parquet file")
    report = report_markdown([ok, bad, broken])
    assert "| landing/events/ok.parquet | events | 4 | passed |" in report
    assert "| landing/events/bad.parquet | events | 4 | failed (1 expectation) |" in report
    assert "| landing/items/x.parquet | items | 0 | unreadable |" in report
    section = report.split("### landing/events/bad.parquet")[1]
    assert "`rating`" in section and "1 unexpected" in section and "`7.0`" in section
    assert "not a parquet file" in report.split("### landing/items/x.parquet")[1]
    assert "### landing/events/ok.parquet" not in report
    assert bad.summary() == "landing/events/bad.parquet: rating: rating between 1.0 and 5.0; 1 unexpected, e.g. 7.0"


@pytest.mark.parametrize("kind, column", [("events", "user_id"), ("events", "item_id"), ("items", "item_id"),
                                          ("users", "user_id")])
@pytest.mark.parametrize("blank", ["", "   ", "\t"])
def test_blank_ids_are_invalid(validator, kind, column, blank):
    frames = {"events": events(), "items": pd.DataFrame({"item_id": ["i1", "i2"], "title": ["a", "b"]}),
              "users": pd.DataFrame({"user_id": ["u1", "u2"]})}
    frame = set_cell(column, blank)(frames[kind])
    failure = only_failure(validator.validate(frame, kind, f"{kind}.parquet"))
    assert (failure.column, failure.rule, failure.unexpected_count) == (column, f"{column} not blank", 1)


def test_quarantine_of_a_255_byte_name_is_shortened_with_a_hash(validator, tmp_path):
    name = "e" * 247 + ".parquet"
    result = validator.validate(set_cell("rating", 7.0)(events()), "events", f"landing/events/{name}")
    target = quarantine(result, streams(name, b"x"), tmp_path, sha256(b"x"))
    assert len(target.name.encode()) <= 255 and (target / name).read_bytes() == b"x"
    other = quarantine(result, streams(name, b"y"), tmp_path, sha256(b"y"))
    assert other != target
