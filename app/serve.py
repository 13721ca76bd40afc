"""Serve the nightly-retrain flow as two deployments against a Prefect server: `nightly`
on a cron schedule with a timezone, and `manual` for runs started from the UI form."""

from __future__ import annotations

import os

from llmrec.config import NIGHTLY_CRON, NIGHTLY_TIMEZONE, NightlyConfig
from llmrec.errors import LlmrecError


def deployments(config: NightlyConfig, cron: str, timezone: str):
    from prefect.schedules import Cron

    from flows.nightly import nightly_retrain

    parameters = {"config": config.model_dump()}
    nightly = nightly_retrain.to_deployment(
        name="nightly", schedules=[Cron(cron, timezone=timezone)], parameters=parameters, tags=["llmrec", "nightly"],
        concurrency_limit=1,
        description="Every night: ingest, validate, fine-tune from the champion, evaluate, register, gate.",
    )
    manual = nightly_retrain.to_deployment(
        name="manual", parameters=parameters, tags=["llmrec", "manual"], concurrency_limit=1,
        description="Run the nightly pipeline now, with parameters edited in the form.",
    )
    return nightly, manual


def serve(config: NightlyConfig, cron: str = NIGHTLY_CRON, timezone: str = NIGHTLY_TIMEZONE) -> None:
    if not os.environ.get("PREFECT_API_URL"):
        raise LlmrecError(
            "PREFECT_API_URL is not set: `llmrec serve` needs a running Prefect server to register its deployments "
            "with. Start one with `make ui`, then export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(config, cron, timezone))
