"""One Prefect task per nightly stage; each calls one function of `llmrec.nightly`.

Results stay in memory (no persistence, no input hashing): they hold data frames and
are only passed between tasks of the same flow run.
"""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from llmrec import nightly
from llmrec.config import NightlyConfig

IO_RETRIES = dict(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5)
IN_MEMORY = dict(cache_policy=NO_CACHE, persist_result=False)


@task(name="ingest", **IO_RETRIES, **IN_MEMORY)
def ingest(config: NightlyConfig) -> nightly.IngestResult:
    return nightly.ingest(config)


@task(name="validate", **IN_MEMORY)
def validate(config: NightlyConfig, batch: nightly.IngestResult) -> nightly.CurateResult:
    return nightly.validate_and_curate(config, batch)


@task(name="find-champion", **IO_RETRIES, **IN_MEMORY)
def find_champion(config: NightlyConfig) -> nightly.Champion:
    return nightly.find_champion(config)


@task(name="window", **IN_MEMORY)
def window(config: NightlyConfig, champion: nightly.Champion):
    return nightly.prepare_window(config, champion)


@task(name="fine-tune", **IN_MEMORY)
def fine_tune(config: NightlyConfig, window, champion: nightly.Champion, run_name: str) -> nightly.Trained:
    progress = create_progress_artifact(0.0, key="train-progress", description="fine-tuning epochs done")
    epochs = config.training.epochs

    def on_epoch(epoch: int, loss: float) -> None:
        update_progress_artifact(progress, 100.0 * (epoch + 1) / epochs)
        print(f"epoch {epoch + 1}/{epochs}: loss {loss:.4f}")

    return nightly.train_challenger(config, window, champion, run_name, on_epoch=on_epoch)


@task(name="evaluate", **IN_MEMORY)
def evaluate(config: NightlyConfig, window, trained: nightly.Trained, champion: nightly.Champion) -> dict:
    return nightly.evaluate_models(config, window, trained.checkpoint_dir, champion)


@task(name="register-and-gate", **IO_RETRIES, **IN_MEMORY)
def register(config: NightlyConfig, run_name: str, window, curated, trained, metrics, champion) -> nightly.Registered:
    return nightly.register_and_gate(config, run_name, window, curated, trained, metrics, champion)
