"""`llmrec alerts install`: Prefect automations that notify a webhook on the flow's events
(promoted, rejected, failed, drift, quarantined) and on crashed `nightly-retrain` runs.

A failed night is reported once, by the flow's own `llmrec.night.failed` event (it carries
the reason); a crash (the process died, so the flow could say nothing) by Prefect's
`Crashed` state. Re-installing replaces the automations instead of duplicating them.
"""

from __future__ import annotations

import os

from flows.nightly import EVENTS
from llmrec.errors import LlmrecError

BLOCK = "llmrec-alerts"
PREFIX = "llmrec: "
EVENT_BODY = "{{ event.event }} | night {{ event.payload.run }} | flow run {{ event.payload.flow_run }} | {{ event.payload.reason }}"
CRASH_BODY = "prefect.flow-run.Crashed | flow run {{ flow_run.name }} | {{ flow_run.state.message }}"


def automations(block_id):
    """The automations to install, each calling the webhook block `block_id`."""
    from prefect.automations import Automation, CallWebhook, EventTrigger

    out = [
        Automation(name=PREFIX + event,
                   trigger=EventTrigger(expect={event}, match={"prefect.resource.id": "llmrec.night.*"}),
                   actions=[CallWebhook(block_document_id=block_id, payload=EVENT_BODY)])
        for event in EVENTS
    ]
    out.append(Automation(
        name=PREFIX + "nightly-retrain crashed",
        trigger=EventTrigger(expect={"prefect.flow-run.Crashed"}, match={"prefect.resource.id": "prefect.flow-run.*"},
                             match_related={"prefect.resource.role": "flow", "prefect.resource.name": "nightly-retrain"}),
        actions=[CallWebhook(block_document_id=block_id, payload=CRASH_BODY)]))
    return out


def install(webhook_url: str) -> list[str]:
    """Save the webhook block and (re)create the automations; return their names."""
    if not os.environ.get("PREFECT_API_URL"):
        raise LlmrecError("PREFECT_API_URL is not set: automations live on a Prefect server; start one with "
                          "`make ui` and export PREFECT_API_URL=http://127.0.0.1:4200/api")
    if not webhook_url.startswith(("http://", "https://")):
        raise LlmrecError(f"--webhook {webhook_url!r}: expected an http:// or https:// URL")
    from prefect.automations import Automation
    from prefect.blocks.webhook import Webhook

    block_id = Webhook(method="POST", url=webhook_url).save(BLOCK, overwrite=True)
    names = []
    for automation in automations(block_id):
        try:
            Automation.read(name=automation.name).delete()
        except ValueError:
            pass  # not installed yet
        names.append(automation.create().name)
    return names
