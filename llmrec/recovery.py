"""Recovery, the first stage of every night: finish what an interrupted night (a crash,
`kill -9`) left behind, so the end state equals that of an uninterrupted night.

- curated event files written without their manifest entry are set aside (their landing
  entries are read again tonight);
- MLflow runs still RUNNING are ended as FAILED;
- versions without a decision are completed or tagged `abandoned` (registry.settle_undecided);
- curated rows that no promoted or rejected version has seen are counted, so the night
  trains them even when no new landing file arrived.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from llmrec import ingest, registry
from llmrec.config import Home
from llmrec.schema import EVENTS

log = logging.getLogger(__name__)


@dataclass
class Recovery:
    set_aside: list[str] = field(default_factory=list)
    runs_failed: list[str] = field(default_factory=list)
    versions_settled: list[dict] = field(default_factory=list)
    # The newest ingest sequence a decided version was judged on, and the curated event
    # rows above it (not yet through a gate).
    decided_watermark: int = 0
    untrained_rows: int = 0

    def summary(self) -> dict:
        return {"set_aside": self.set_aside, "runs_failed": self.runs_failed,
                "versions_settled": self.versions_settled, "decided_watermark": self.decided_watermark,
                "untrained_rows": self.untrained_rows}


def recover(home: Home, registered_model: str) -> Recovery:
    """Repair the home and the registry after an interrupted night (nothing to do after a
    clean one). Needs the home's lock and `registry.configure` done."""
    set_aside = ingest.set_aside_unrecorded(home)
    runs_failed = registry.end_running_runs()
    settled = registry.settle_undecided(registered_model)
    manifest = ingest.read_manifest(home)
    watermark = registry.decided_watermark(registered_model)
    curated = manifest[(manifest["kind"] == EVENTS) & (manifest["status"] == "curated")]
    untrained = int(curated.loc[curated["ingest_seq"] > watermark, "rows"].sum())
    for path in set_aside:
        log.warning("set aside %s: written by an interrupted curate, its landing file is read again", path)
    for run_id in runs_failed:
        log.warning("ended MLflow run %s as FAILED: left RUNNING by an interrupted night", run_id)
    for entry in settled:
        log.warning("version %s of %s (night %s) had no decision: now %s", entry["version"], registered_model,
                    entry["night"], entry["decision"])
    return Recovery(set_aside=set_aside, runs_failed=runs_failed, versions_settled=settled,
                    decided_watermark=watermark, untrained_rows=untrained)
