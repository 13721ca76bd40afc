"""The `nightly-retrain` flow:

    recover -> ingest -> validate and curate -> load encoder, champion, curated data (once)
        -> window -> fine-tune -> evaluate -> register + gate -> report

The flow loads the heavy things once and hands them to the stages as values.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "llmrec")

from prefect import flow  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.events import emit_event  # noqa: E402
from prefect.exceptions import FlowPauseTimeout  # noqa: E402
from prefect.flow_runs import pause_flow_run, resume_flow_run  # noqa: E402
from prefect.input import RunInput  # noqa: E402
from pydantic import Field  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from llmrec import registry  # noqa: E402
from llmrec.config import Home, NightlyConfig  # noqa: E402
from llmrec.encoder import TextCache  # noqa: E402
from llmrec.lock import exclusive  # noqa: E402
from llmrec.monitor import drift_hold  # noqa: E402
from llmrec.report import run_report  # noqa: E402
from tasks import stages as t  # noqa: E402

# One line per stage, on the console and in the Prefect UI; the stages' own INFO logs and
# the full report stay in the UI, the MLflow run and the artifact.
progress = logging.getLogger("llmrec.progress")
progress.setLevel(logging.INFO)


@flow(name="nightly-retrain", persist_result=False)
def nightly_retrain(config: NightlyConfig = NightlyConfig()) -> dict:
    """Ingest tonight's landing files, fine-tune the champion on them, and promote the
    challenger only if no gated metric regressed."""
    run_name = registry.new_run_name()
    try:
        home = Home(config.home).ensure()
        with exclusive(home, config.lock_wait):
            return run_night(config, home, run_name)
    except Exception as error:
        # The one alert of a failed night (automations on this event, not on the Failed state).
        alert("llmrec.night.failed", run_name, f"{type(error).__name__}: {error}")
        raise


# Events the flow emits, for Prefect automations (`llmrec alerts install`) and the event feed.
EVENTS = ("llmrec.night.promoted", "llmrec.night.rejected", "llmrec.night.failed", "llmrec.data.drift",
          "llmrec.data.quarantined")


def alert(event: str, run_name: str, reason: str, **payload) -> None:
    """Emit one llmrec event naming the night (our run name and Prefect's flow-run name)."""
    emit_event(event=event, resource={"prefect.resource.id": f"llmrec.night.{run_name}",
                                      "prefect.resource.name": run_name},
               payload={"run": run_name, "flow_run": flow_run.get_name() or "", "reason": reason, **payload})


# Seconds the pause stays open after gate.approval_timeout, for the night's own rejection.
PAUSE_GRACE = 60


class Approval(RunInput):
    """The form an ML engineer fills in the Prefect UI to resume a paused night."""

    approve: bool = Field(description="Promote this challenger to champion (true) or reject it (false).")
    comment: str = Field("", description="Why; stored on the model version.")
    reviewer: str = Field("", description="Who decided.")


def await_approval(config: NightlyConfig, run_name: str, registered: registry.Registered) -> registry.Registered:
    """Pause the flow run until the form is submitted (or `gate.approval_timeout` passes,
    which rejects), then record the answer on the version."""
    timeout = config.gate.approval_timeout
    progress.info("%s approval: version %s waits for a decision in the Prefect UI (%d s)", run_name,
                  registered.version, timeout)
    form = Approval.with_initial_data(
        description=f"## Promote version {registered.version}?\n\n{registered.description}", approve=False)
    unanswered = f"no answer within gate.approval_timeout={timeout} s"
    # Prefect fails a run whose pause expires, even when the flow carries on and rejects; so
    # at the timeout the night submits the form itself (a rejection) while the pause is still
    # open, and the run completes. The pause's own, later expiry stays as a fallback.
    expired, run_id = threading.Event(), flow_run.get_id()

    def reject_unanswered() -> None:
        expired.set()
        try:
            resume_flow_run(run_id, run_input={"approve": False, "comment": unanswered, "reviewer": ""})
        except (RuntimeError, FlowPauseTimeout):
            expired.clear()  # answered just before: the run is no longer paused

    timer = threading.Timer(timeout, contextvars.copy_context().run, args=(reject_unanswered,))
    timer.daemon = True
    timer.start()
    try:
        answer = pause_flow_run(wait_for_input=form, timeout=timeout + PAUSE_GRACE, poll_interval=2)
    except FlowPauseTimeout:
        answer = None
    finally:
        timer.cancel()
        timer.join()  # a rejection already under way settles `expired` first
    if answer is None or expired.is_set():
        return t.apply_approval(config, registered, None, "", unanswered)
    return t.apply_approval(config, registered, answer.approve, answer.reviewer, answer.comment)


def run_night(config: NightlyConfig, home: Home, run_name: str) -> dict:
    registry.configure(home, config.experiment)
    recovered = t.recover(home, config.registered_model)
    progress.info("%s recover: %d file(s) set aside, %d run(s) ended as failed, %d version(s) settled, "
                  "%d curated rows not yet judged", run_name, len(recovered.set_aside), len(recovered.runs_failed),
                  len(recovered.versions_settled), recovered.untrained_rows)
    batch = t.ingest(config.landing, home)
    progress.info("%s ingest: %d new file(s), %d already ingested, %d ignored", run_name, len(batch.reads),
                  batch.already_ingested, len(batch.ignored))
    curated = t.validate_and_curate(home, batch, config.fail_on_invalid)
    progress.info("%s validate: %d event rows curated, %d quarantined (%d file(s)), %d duplicates dropped", run_name,
                  curated.rows_curated, curated.rows_quarantined, len(curated.files_quarantined),
                  curated.rows_duplicate)
    if curated.files_quarantined:
        files = [f["file"] for f in curated.files_quarantined]
        alert("llmrec.data.quarantined", run_name, f"{len(files)} file(s) failed validation: {', '.join(files)}",
              files=files)
    if curated.rows_curated == 0 and recovered.untrained_rows == 0:
        return finish(run_name, recovered, batch, curated,
                      note="No new rows tonight: nothing trained, nothing registered.")
    text_encoder = t.load_encoder(config.model.encoder)
    champion = t.load_champion(home, config.registered_model, text_encoder)
    texts, history = t.read_curated(home)
    cache = TextCache.for_model(home.cache, text_encoder, champion.model_config(config.model))
    progress.info("%s load: champion %s, %d events, %d items", run_name,
                  f"v{champion.version}" if champion.version else "none (first model)", history.rows, len(texts.items))
    # New rows: those no gate has judged. A rejected night's rows are not retrained as new (one
    # harmful week would otherwise sink every later challenger); they are replayed as older rows.
    since = max(champion.ingest_watermark, recovered.decided_watermark)
    drift = t.drift(history, since, texts, config) if champion.version else None
    if drift is not None:
        progress.info("%s drift: share %.2f, drifted %s, rating consistency %s", run_name, drift.share,
                      ", ".join(drift.drifted) or "none", "not measured" if drift.consistency is None
                      else f"{drift.consistency:.3f} over {drift.consistency_users} users")
        drifting = drift_hold(drift, config.monitor)
        if drifting:
            alert("llmrec.data.drift", run_name, drifting, share=drift.share, scores=drift.scores)
    window = t.window(home, history, since, config)
    progress.info("%s window: %d train rows (%d replayed), %d held out, %d anchor", run_name, len(window.train),
                  window.replay_rows, len(window.held_out), len(window.anchor))
    if window.train.empty:
        return finish(run_name, recovered, batch, curated, window=window,
                      note="No training rows after holding out the evaluation rows: nothing registered.")
    trained = t.fine_tune(champion, cache, texts, window, config, home, run_name)
    progress.info("%s fine-tune: step %d -> %d, last epoch loss %.4f", run_name, trained.start_step,
                  trained.global_step, trained.result.epoch_losses[-1])
    metrics = t.evaluate(window, history, trained, champion, cache, texts, config)
    held_out = metrics["challenger"].get("held_out", {})
    progress.info("%s evaluate: held-out rmse %.4f, recall@%d %.4f", run_name, held_out.get("rmse", float("nan")),
                  config.evaluation.k, held_out.get(f"recall_at_{config.evaluation.k}", float("nan")))
    registered = t.register_and_gate(config, run_name, window, curated, trained, metrics, champion.version, drift)
    progress.info("%s register: version %s -> %s (%s)", run_name, registered.version, registered.decision.alias,
                  registered.decision.reason)
    if registry.needs_approval(config, drift):
        registered = await_approval(config, run_name, registered)
    decision = registered.decision
    alert("llmrec.night.promoted" if decision.promote else "llmrec.night.rejected", run_name, decision.reason,
          version=registered.version, failed=[f"{c.part}.{c.metric}: {c.outcome()}" for c in decision.failed()])
    trend = t.record_trend(config, home, run_name, registered, metrics, champion.version, window.watermark, drift)
    return finish(run_name, recovered, batch, curated, window, trained, metrics, registered, drift=drift,
                  trend_image=trend.name if trend else None)


def finish(run_name, recovered, batch, curated, window=None, trained=None, metrics=None, registered=None,
           note="", drift=None, trend_image=None) -> dict:
    report = run_report(run_name, batch, curated, window, trained, metrics, registered, note, drift, trend_image,
                        recovered)
    create_markdown_artifact(report, key="nightly-report", description=f"llmrec {run_name}")
    if registered is not None:
        registry.log_report(registered.run_id, report)
    if note:
        progress.info("%s: %s", run_name, note)
    return {
        "run": run_name,
        "status": "registered" if registered else "skipped",
        "note": note,
        "recovery": recovered.summary(),
        "ingest": batch.summary(),
        "curate": curated.summary() if curated else None,
        "window": window.summary() if window is not None else None,
        "resumed_from": trained.resumed_from if trained else None,
        "global_step": trained.global_step if trained else None,
        "start_step": trained.start_step if trained else None,
        "vocab": trained.vocab if trained else None,
        # Per-row samples stay in the run: the summary is what a caller prints or stores.
        "metrics": {k: v for k, v in metrics.items() if k != "samples"} if metrics else None,
        "version": registered.version if registered else None,
        "decision": registered.decision.to_dict() if registered else None,
        "drift": {"share": drift.share, "drifted": drift.drifted, "scores": drift.scores,
                  "consistency": drift.consistency, "consistency_baseline": drift.consistency_baseline}
        if drift else None,
    }
