"""The `nightly-retrain` flow:

    ingest -> validate -> window -> fine-tune -> evaluate -> register + gate -> report
"""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "llmrec")

from prefect import flow  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402

from llmrec import nightly  # noqa: E402
from llmrec.config import NightlyConfig  # noqa: E402
from tasks import nightly as t  # noqa: E402


@flow(name="nightly-retrain", log_prints=True, persist_result=False)
def nightly_retrain(config: NightlyConfig = NightlyConfig()) -> dict:
    """Ingest tonight's landing files, fine-tune the champion on them, and promote the
    challenger only if no gated metric regressed."""
    with nightly.exclusive(config):
        return run_stages(config, nightly.new_run_name())


def run_stages(config: NightlyConfig, run_name: str) -> dict:
    batch = t.ingest(config)
    curated = t.validate(config, batch)
    if curated.rows_curated == 0:
        return finish(run_name, batch, curated, note="No new rows tonight: nothing trained, nothing registered.")
    champion = t.find_champion(config)
    window = t.window(config, champion)
    if window.train.empty:
        return finish(run_name, batch, curated, window=window,
                      note="No training rows after holding out the evaluation rows: nothing registered.")
    trained = t.fine_tune(config, window, champion, run_name)
    metrics = t.evaluate(config, window, trained, champion)
    registered = t.register(config, run_name, window, curated, trained, metrics, champion)
    return finish(run_name, batch, curated, window, trained, metrics, registered)


def finish(run_name, batch, curated, window=None, trained=None, metrics=None, registered=None, note="") -> dict:
    report = nightly.run_report(run_name, batch, curated, window, trained, metrics, registered, note)
    create_markdown_artifact(report, key="nightly-report", description=f"llmrec {run_name}")
    print(report)
    return {
        "run": run_name,
        "status": "registered" if registered else "skipped",
        "note": note,
        "ingest": batch.summary(),
        "curate": curated.summary() if curated else None,
        "window": window.summary() if window is not None else None,
        "resumed_from": trained.resumed_from if trained else None,
        "global_step": trained.global_step if trained else None,
        "start_step": trained.start_step if trained else None,
        "vocab": trained.vocab if trained else None,
        "metrics": metrics,
        "version": registered.version if registered else None,
        "decision": registered.decision.to_dict() if registered else None,
    }
