"""`make demo`: build drops (MovieLens-100k when given, synthetic otherwise), then run the
nightly flow over consecutive drops as if on consecutive nights, and print what each
night did."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

from llmrec.config import NightlyConfig, deep_merge
from llmrec.data import copy_drop, movielens_drops, synthetic_drops
from llmrec.errors import LlmrecError
from llmrec.report import render_table

DEMO_MARKER = ".llmrec-demo"
DEMO_SYNTHETIC = dict(users=300, items=400, days=14, seed=0)
# The first synthetic night lands three days at once: history to bootstrap the first model.
SYNTHETIC_BOOTSTRAP_DROPS = 3


def quiet_console() -> None:
    """One line per stage per night on the console: the flow's progress logger prints
    plainly, while Prefect's own console lines and MLflow's INFO chatter are left to the
    Prefect UI, the MLflow run and the nightly report. Runs before Prefect configures logging."""
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    progress = logging.getLogger("llmrec.progress")
    if not progress.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("  %(message)s"))
        progress.addHandler(handler)


def run_demo(ml100k: Path | None, nights: int, workdir: Path, overrides: dict, home: Path | None = None) -> list[dict]:
    quiet_console()
    from flows.nightly import nightly_retrain

    workdir = Path(workdir).resolve()
    home = Path(home).resolve() if home is not None else workdir / "home"
    if not home.is_relative_to(workdir) and home.exists() and any(home.iterdir()):
        raise LlmrecError(f"--home {home}: already holds state; the demo starts from an empty home "
                          f"(or leave it unset to use {workdir / 'home'})")
    drops, landing = workdir / "drops", workdir / "landing"
    # Checked before anything is written: a bad --set is one line, exit 2 (load_config).
    config = NightlyConfig.from_sources(None, (), **deep_merge({"landing": str(landing), "home": str(home)}, overrides))
    # The work folder is the demo's own scratch folder, rebuilt on every run, and only its
    # own: a folder without the marker it leaves is someone's data.
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / DEMO_MARKER).is_file():
            raise LlmrecError(f"--workdir {workdir}: exists and was not made by the demo ({DEMO_MARKER} missing); "
                              "nothing was deleted; pass an empty or new folder")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / DEMO_MARKER).write_text("made by `llmrec demo`, which empties this folder on its next run\n")
    landing.mkdir(parents=True)
    if ml100k is not None:
        tags = movielens_drops(ml100k, drops, period="7D", bootstrap_days=28)
        print(f"MovieLens-100k from {ml100k}: {len(tags)} weekly drops after a 4-week bootstrap")
        nightly_drops = [[tag] for tag in tags]
    else:
        tags = synthetic_drops(drops, **DEMO_SYNTHETIC)
        print(f"synthetic data: {len(tags)} daily drops ({DEMO_SYNTHETIC})")
        nightly_drops = [tags[:SYNTHETIC_BOOTSTRAP_DROPS]] + [[tag] for tag in tags[SYNTHETIC_BOOTSTRAP_DROPS:]]
    rows = []
    for night, night_tags in enumerate(nightly_drops[: nights + 1], start=1):
        for tag in night_tags:
            copy_drop(drops, tag, landing)
        tag = night_tags[-1]
        print(f"\n=== night {night}: drop {', '.join(night_tags)} ===")
        summary = nightly_retrain(config=config)
        rows.append(table_row(night, tag, summary))
    print("\n" + render_table(rows, style="text"))
    print(
        f"\nState is in {home}. To look at it in the UIs:\n"
        f"  make ui LLMREC_HOME={home}     # Prefect on http://127.0.0.1:4200, MLflow on http://127.0.0.1:5000\n"
        f"  make serve LLMREC_HOME={home}  # deployments whose runs write to this home\n"
        "  Runs show up in the Prefect UI when the demo runs against that server:\n"
        "  PREFECT_API_URL=http://127.0.0.1:4200/api make demo"
    )
    return rows


def table_row(night: int, tag: str, summary: dict) -> dict:
    metrics = summary.get("metrics") or {}
    challenger = (metrics.get("challenger") or {}).get("held_out", {})
    champion = (metrics.get("champion") or {}).get("held_out", {})
    anchor = (metrics.get("challenger") or {}).get("anchor", {})
    decision = summary.get("decision") or {}
    return {
        "night": night,
        "drop": tag,
        "new rows": (summary.get("curate") or {}).get("rows_curated", 0),
        "step": summary.get("global_step") or "",
        "version": summary.get("version") or "-",
        "rmse": challenger.get("rmse"),
        "champ rmse": champion.get("rmse"),
        "recall@10": challenger.get("recall_at_10"),
        "champ recall@10": champion.get("recall_at_10"),
        "anchor rmse": anchor.get("rmse"),
        "decision": decision.get("alias", summary.get("note") or "skipped"),
    }
