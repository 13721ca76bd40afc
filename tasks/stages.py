"""One Prefect task per nightly stage; each calls one llmrec function.

Results stay in memory (no persistence, no input hashing): they hold data frames and
models, and are only passed between tasks of the same flow run. Retries are declared
only on the stages that talk to storage or the registry and are safe to repeat.
"""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.tasks import exponential_backoff

from llmrec import curate, encoder, evaluate as evaluation, ingest as ingestion, monitor, recovery, registry, train
from llmrec import window as windows
from llmrec.config import Home, NightlyConfig
from llmrec.errors import LlmrecError
from llmrec.history import History


def not_a_user_error(task, task_run, state) -> bool:
    """Retry storage and registry hiccups, never a user's mistake (a held lock, an
    unreachable URI, a bad file): it fails the same way every time."""
    try:
        state.result()
    except LlmrecError:
        return False
    except Exception:
        return True
    return True


IO_RETRIES = dict(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5,
                  retry_condition_fn=not_a_user_error)
IN_MEMORY = dict(cache_policy=NO_CACHE, persist_result=False)


@task(name="recover", **IO_RETRIES, **IN_MEMORY)
def recover(home: Home, registered_model: str) -> recovery.Recovery:
    return recovery.recover(home, registered_model)


@task(name="ingest", **IO_RETRIES, **IN_MEMORY)
def ingest(landing: str, home: Home) -> ingestion.IngestResult:
    return ingestion.ingest(landing, home)


@task(name="validate-and-curate", **IN_MEMORY)
def validate_and_curate(home: Home, batch: ingestion.IngestResult, fail_on_invalid: bool) -> curate.CurateResult:
    return curate.validate_and_curate(home, batch, fail_on_invalid)


@task(name="load-encoder", **IN_MEMORY)
def load_encoder(name_or_path: str) -> encoder.Encoder:
    return encoder.load_encoder(name_or_path)


@task(name="load-champion", **IO_RETRIES, **IN_MEMORY)
def load_champion(home: Home, registered_model: str, text_encoder: encoder.Encoder):
    return registry.load_champion(home, registered_model, text_encoder)


@task(name="read-curated", **IO_RETRIES, **IN_MEMORY)
def read_curated(home: Home):
    return ingestion.read_catalog_texts(home), History.open(home)


@task(name="window", **IN_MEMORY)
def window(home: Home, history: History, watermark: int, config: NightlyConfig) -> windows.Window:
    return windows.prepare_window(home, history, watermark, config.training, config.evaluation)


@task(name="fine-tune", **IN_MEMORY)
def fine_tune(champion, cache, texts, night_window, config: NightlyConfig, home: Home, run_name: str) -> train.Trained:
    progress = create_progress_artifact(0.0, key="train-progress", description="fine-tuning epochs done")
    epochs, logger = config.training.epochs, get_run_logger()

    def on_epoch(epoch: int, loss: float) -> None:
        update_progress_artifact(progress, 100.0 * (epoch + 1) / epochs)
        logger.info("epoch %d/%d: loss %.4f", epoch + 1, epochs, loss)

    return train.fine_tune(champion, cache, texts, night_window, config.model, config.training,
                           home.runs / run_name / "checkpoint", run_name, on_epoch)


@task(name="evaluate", **IN_MEMORY)
def evaluate(night_window, history: History, trained: train.Trained, champion, cache, texts,
             config: NightlyConfig) -> dict:
    return evaluation.evaluate_models(night_window, history, trained.checkpoint, champion.checkpoint, cache, texts,
                                      config)


@task(name="drift", **IN_MEMORY)
def drift(history: History, watermark: int, texts, config: NightlyConfig) -> monitor.DriftRecord | None:
    baseline = registry.trend_consistency_baseline(config.experiment, watermark, config.monitor)
    return monitor.night_drift(history, watermark, texts, config.monitor, baseline)


@task(name="register-and-gate", **IO_RETRIES, **IN_MEMORY)
def register_and_gate(config: NightlyConfig, run_name: str, night_window, curated, trained, metrics,
                      champion_version: str | None, drift_record) -> registry.Registered:
    return registry.register_and_gate(config, run_name, night_window, curated, trained, metrics, champion_version,
                                      drift_record)


@task(name="apply-approval", **IO_RETRIES, **IN_MEMORY)
def apply_approval(config: NightlyConfig, registered, approve: bool | None, reviewer: str, comment: str):
    return registry.apply_approval(config.registered_model, registered, approve, reviewer, comment)


@task(name="record-trend", **IO_RETRIES, **IN_MEMORY)
def record_trend(config: NightlyConfig, home: Home, run_name: str, registered, metrics, champion_version,
                 night: int, drift_record):
    return registry.record_trend(config.experiment, registered, metrics, champion_version, night, drift_record,
                                 home.runs / run_name / "trend.png")
