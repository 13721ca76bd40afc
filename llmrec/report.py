"""What a person reads: one table renderer (markdown for reports, aligned text for the
console) and the nightly run's markdown report."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from llmrec.config import PARTS
from llmrec.gate import check_rows


def format_cell(value: object, column: str = "") -> str:
    """Floats with four decimals, missing values (None, NaN) as empty cells."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def render_table(rows: Sequence[dict], columns: Sequence[str] | None = None, style: str = "markdown",
                 fmt: Callable[[object, str], str] = format_cell) -> str:
    """Rows of dicts as a table: `markdown` (pipes escaped) or `text` (columns padded to
    their widest cell, for a terminal). `fmt(value, column)` turns a value into a cell."""
    columns = list(columns or (rows[0] if rows else []))
    cells = [[fmt(row.get(c), c) for c in columns] for row in rows]
    if style == "markdown":
        def escape(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ")

        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(columns)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(columns, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def metrics_rows(metrics: dict) -> list[dict]:
    """Challenger vs champion (and the global-mean baseline), one row per part and metric."""
    rows = []
    for part in PARTS:
        challenger = metrics["challenger"].get(part)
        if not challenger:
            continue
        champion = (metrics.get("champion") or {}).get(part, {})
        baseline = (metrics.get("global_mean") or {}).get(part, {})
        for name, value in challenger.items():
            other = champion.get(name)
            rows.append({"part": part, "metric": name, "challenger": value, "champion": other,
                         "difference": None if other is None else f"{value - other:+.4f}",
                         "global mean": baseline.get(name)})
    return rows


def run_report(run_name: str, batch, curated=None, window=None, trained=None, metrics: dict | None = None,
               registered=None, note: str = "", drift=None, trend_image: str | None = None,
               recovered=None) -> str:
    """The markdown a reviewer reads in the Prefect UI and in the MLflow run."""
    lines = [f"# llmrec nightly run `{run_name}`", ""]
    if note:
        lines += [f"**{note}**", ""]
    if recovered is not None and (recovered.set_aside or recovered.runs_failed or recovered.versions_settled):
        lines += ["## Recovery of an interrupted night", ""]
        lines += [f"- set aside (written by an interrupted curate, read again): `{path}`" for path in recovered.set_aside]
        lines += [f"- MLflow run `{run_id}` was left RUNNING: ended as FAILED" for run_id in recovered.runs_failed]
        lines += [f"- version {v['version']} (night {v['night']}) had no decision: {v['decision']}"
                  for v in recovered.versions_settled]
        lines.append("")
    lines += ["## Ingest", "", f"- new landing files: {len(batch.reads)}; already ingested: {batch.already_ingested}"]
    for change in batch.changed:
        lines.append(f"- changed after ingestion (not re-read): `{change['file']}`")
    for name in batch.ignored:
        lines.append(f"- ignored (name starts with `.` or `_`): `{name}`")
    if curated is not None:
        lines += [f"- event rows in: {curated.rows_in} = curated {curated.rows_curated} + quarantined "
                  f"{curated.rows_quarantined} + duplicates dropped {curated.rows_duplicate}",
                  "", "## Validation", "", curated.validation_markdown or "(no files)", ""]
    if window is not None:
        lines += ["## Window", ""] + [f"- {k}: {v}" for k, v in window.summary().items()] + [""]
    if trained is not None:
        lines += ["## Training", "",
                  f"- resumed from: {'v' + trained.resumed_from if trained.resumed_from else 'the pretrained encoder'}",
                  f"- global step {trained.start_step} -> {trained.global_step}; vocab {trained.vocab}",
                  f"- epoch losses: {', '.join(f'{x:.4f}' for x in trained.result.epoch_losses)}",
                  f"- {trained.result.ratings_per_second:,.0f} ratings/s", ""]
    if drift is not None:
        lines += ["## Drift of tonight's events from the history", "",
                  f"- {drift.current_rows} new rows against {drift.reference_rows} history rows; method "
                  f"{drift.method}, a column drifts at score >= {drift.threshold}; drifted share {drift.share:.2f}",
                  "", render_table(drift.rows()), ""]
        if drift.consistency is not None:
            reference = ("no reference yet" if drift.consistency_baseline is None
                         else f"earlier nights' median {drift.consistency_baseline:.3f}")
            lines += [f"- rating consistency {drift.consistency:.3f} over {drift.consistency_users} users "
                      f"(their new ratings against the items' mean rating in the history; {reference})", ""]
        if drift.raters:
            lines += [f"- one-value raters: {'; '.join(drift.raters)}", ""]
    if metrics is not None:
        lines += ["## Challenger vs champion", "", render_table(metrics_rows(metrics)), ""]
    if registered is not None:
        d = registered.decision
        lines += ["## Decision", "", f"- version **{registered.version}** -> alias `{d.alias}`", f"- {d.reason}"]
        lines += [f"- failed: {c.part}.{c.metric}: {c.outcome()}" for c in d.failed()]
        if d.checks:
            lines += ["", "### Checks", "", render_table(check_rows(d))]
    if trend_image:
        lines += ["", "## Trend", "", f"![served champion night after night]({trend_image})"]
    return "\n".join(lines)


def trend_png(trend, path) -> None:
    """The champion's metrics night after night (one panel per metric, a line per part) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = sorted({column.split(".", 1)[1] for column in trend.columns if column.split(".", 1)[0] in PARTS})
    figure, axes = plt.subplots(1, max(1, len(names)), figsize=(4 * max(1, len(names)), 3), squeeze=False)
    for axis, name in zip(axes[0], names):
        for part in PARTS:
            column = f"{part}.{name}"
            if column in trend:
                axis.plot(trend.index, trend[column], marker="o", label=part)
        axis.set_title(name)
        axis.set_xlabel("night")
        axis.legend()
    figure.suptitle("served champion, night after night")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def comparison_markdown(title: str, check_table: list[dict], segments: list[dict]) -> str:
    """The registry's comparison artifact: the gate's checks (estimate, interval, margin,
    outcome) and the metrics per segment, challenger beside champion."""
    lines = [f"# {title}", "", "## Gate checks (challenger - champion, same rows)", ""]
    lines.append(render_table(check_table) if check_table else "(no checks)")
    lines += ["", "## Metrics per segment", "", render_table(segments) if segments else "(no segments)", ""]
    return "\n".join(lines)


def comparison_png(checks, path) -> None:
    """One panel per check: the difference challenger - champion with its interval and the
    margin on the worse side (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    count = max(1, len(checks))
    figure, axes = plt.subplots(1, count, figsize=(2.6 * count, 3), squeeze=False)
    for axis, check in zip(axes[0], checks):
        difference = check.challenger - check.reference if check.difference is None else check.difference
        if check.low is not None:
            # A percentile interval need not contain the estimate; matplotlib wants one-sided lengths.
            axis.errorbar([0], [difference], yerr=[[max(0.0, difference - check.low)], [max(0.0, check.high - difference)]],
                          fmt="o", capsize=6, color="tab:red" if not check.passed else "tab:blue")
        else:
            axis.plot([0], [difference], "o", color="tab:red" if not check.passed else "tab:blue")
        axis.axhline(0.0, color="grey", linewidth=0.8)
        if check.margin is not None:
            worse_side = check.margin if check.metric in ("mse", "rmse", "mae") else -check.margin
            axis.axhline(worse_side, color="tab:red", linestyle="--", linewidth=0.8)
        axis.set_xticks([])
        axis.set_title(f"{check.part}\n{check.metric}", fontsize=9)
    figure.suptitle("challenger - champion")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
