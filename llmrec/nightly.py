"""The stages of one nightly run as plain functions over data and config. The Prefect
flow in `flows/nightly.py` chains them; each is usable and testable without Prefect.

    ingest -> validate -> curate -> window -> train -> evaluate -> register -> gate
"""

from __future__ import annotations

import fcntl
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import pandas as pd
import pyarrow as pa

from llmrec import ingest as ingest_mod
from llmrec import model as model_mod
from llmrec import registry
from llmrec.config import Home, NightlyConfig
from llmrec.encoder import Encoder, TextCache, load_encoder
from llmrec.errors import LlmrecError
from llmrec.evaluate import PARTS, evaluate, global_mean_metrics
from llmrec.gate import Decision, decide
from llmrec.schema import EVENTS, ITEMS, USERS, render_text
from llmrec.scoring import Scorer
from llmrec.train import TrainResult, fit
from llmrec.validate import FileValidation, Validator, quarantine, report_markdown
from llmrec.window import Window, split, without

log = logging.getLogger(__name__)

PIP_REQUIREMENTS = ["numpy", "pandas", "safetensors", "torch", "mlflow"]


@contextmanager
def exclusive(config: NightlyConfig):
    """One nightly run per LLMREC_HOME at a time: two runs on the same state would both
    ingest the same files and race on the champion alias."""
    home = Home(config.home).ensure()
    with open(home.root / ".nightly.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise LlmrecError(
                f"another nightly run is using home={str(home.root)!r} (lock {home.root / '.nightly.lock'}); "
                "wait for it to finish"
            ) from error
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class IngestResult:
    reads: list[ingest_mod.LandingRead]
    changed: list[dict]
    already_ingested: int

    def summary(self) -> dict:
        return {
            "new_files": len(self.reads),
            "already_ingested": self.already_ingested,
            "changed_after_ingestion": self.changed,
        }


@dataclass
class CurateResult:
    ingest_seq: int
    files_curated: list[str]
    files_quarantined: list[dict]
    rows_in: int
    rows_curated: int
    rows_quarantined: int
    validation: list[dict] = field(default_factory=list)
    validation_markdown: str = ""

    @property
    def new_event_rows(self) -> int:
        return self.rows_curated

    def summary(self) -> dict:
        return {
            "ingest_seq": self.ingest_seq,
            "files_curated": len(self.files_curated),
            "files_quarantined": len(self.files_quarantined),
            "rows_in": self.rows_in,
            "rows_curated": self.rows_curated,
            "rows_quarantined": self.rows_quarantined,
        }


def ingest(config: NightlyConfig) -> IngestResult:
    """Find and read the landing files not yet in the manifest."""
    home = Home(config.home).ensure()
    fs, files = ingest_mod.list_landing(config.landing)
    found = ingest_mod.discover(fs, files, ingest_mod.read_manifest(home))
    for change in found.changed:
        log.warning("%s changed after it was ingested (checksum %s, now %s); it is not re-read",
                    change["file"], change["ingested_checksum"][:12], change["checksum_now"][:12])
    reads = [ingest_mod.read_landing_file(fs, f) for f in found.new]
    log.info("landing %s: %d new file(s), %d already ingested", config.landing, len(reads), found.already_ingested)
    return IngestResult(reads=reads, changed=found.changed, already_ingested=found.already_ingested)


def validate_and_curate(config: NightlyConfig, batch: IngestResult) -> CurateResult:
    """Validate every new file; quarantine the failures; append the rest to the curated
    data. Catalog files are checked first so events may reference items arriving with them."""
    home = Home(config.home).ensure()
    manifest = ingest_mod.read_manifest(home)
    seq = ingest_mod.next_ingest_seq(manifest)
    validator = Validator(home.gx)
    results: list[tuple[ingest_mod.LandingRead, FileValidation]] = []
    known_items = set(ingest_mod.read_catalog(home, ITEMS)["item_id"].astype(str))
    for kind in (ITEMS, USERS, EVENTS):
        for read in (r for r in batch.reads if r.file.kind == kind):
            if read.frame is None:
                result = validator.unreadable(read.file.uri, kind, read.error)
            else:
                result = validator.validate(read.frame, kind, read.file.uri, known_items if kind == EVENTS else None)
            if kind == ITEMS and result.success:
                known_items |= set(read.frame["item_id"].astype(str))
            results.append((read, result))
    failed = [(read, result) for read, result in results if not result.success]
    quarantined = [(read, str(quarantine(result, read.raw, home.quarantine))) for read, result in failed]
    validation_markdown = report_markdown([result for _, result in results])
    for read, result in failed:
        log.warning("quarantined %s: %s", read.file.uri, result.summary())
    if failed and config.fail_on_invalid:
        ingest_mod.curate(home, [], quarantined, seq)
        raise LlmrecError(
            f"{len(failed)} landing file(s) failed validation and fail_on_invalid is set; nothing was curated:\n"
            + "\n".join(f"{r.file.uri}: {res.summary()}" for r, res in failed)
        )
    accepted = [read for read, result in results if result.success]
    ingest_mod.curate(home, accepted, quarantined, seq)
    return CurateResult(
        ingest_seq=seq,
        files_curated=[r.file.uri for r in accepted],
        files_quarantined=[{"file": r.file.uri, "quarantine": path} for r, path in quarantined],
        rows_in=event_rows(r for r, _ in results),
        rows_curated=event_rows(accepted),
        rows_quarantined=event_rows(r for r, _ in failed),
        validation=[result.to_dict() for _, result in results],
        validation_markdown=validation_markdown,
    )


def event_rows(reads) -> int:
    return sum(r.rows for r in reads if r.file.kind == EVENTS)


@dataclass
class Champion:
    version: str | None
    checkpoint_dir: Path | None
    ingest_watermark: int
    global_step: int


def find_champion(config: NightlyConfig) -> Champion:
    """The current champion's checkpoint, downloaded once per version into LLMREC_HOME."""
    home = Home(config.home).ensure()
    registry.configure(home, config.experiment)
    info = registry.get_alias(config.registered_model, registry.CHAMPION)
    if info is None:
        return Champion(version=None, checkpoint_dir=None, ingest_watermark=0, global_step=0)
    target = home.runs / f"champion-v{info.version}"
    cached = next(target.rglob("state.json"), None) if target.exists() else None
    local = cached.parent if cached is not None else registry.download_checkpoint(info, target)
    state = model_mod.read_state(local)
    return Champion(version=info.version, checkpoint_dir=local, ingest_watermark=int(state["ingest_watermark"]),
                    global_step=int(state["global_step"]))


def prepare_window(config: NightlyConfig, champion: Champion) -> Window:
    home = Home(config.home)
    events = ingest_mod.read_events(home)
    anchor = pd.read_parquet(home.anchor) if home.anchor.exists() else None
    window = split(events, champion.ingest_watermark, anchor, config.training, config.evaluation)
    if anchor is None and len(window.anchor):
        ingest_mod.write_atomic(pa.Table.from_pandas(window.anchor, preserve_index=False), home.anchor)
    return window


def texts(home: Home) -> tuple[dict[str, str], dict[str, str]]:
    users = ingest_mod.read_catalog(home, USERS)
    items = ingest_mod.read_catalog(home, ITEMS)
    return render_text(users, "user_id").to_dict(), render_text(items, "item_id").to_dict()


def build_scorer(checkpoint: model_mod.Checkpoint, cache: TextCache, user_texts: dict, item_texts: dict,
                 extra: pd.DataFrame | None = None) -> Scorer:
    """Vectors for every known user and catalog item, plus any ids in `extra`."""
    users = dict.fromkeys(checkpoint.users.ids[1:]) | dict.fromkeys(user_texts)
    items = dict.fromkeys(checkpoint.items.ids[1:]) | dict.fromkeys(item_texts)
    if extra is not None:
        users |= dict.fromkeys(extra["user_id"])
        items |= dict.fromkeys(extra["item_id"])
    user_ids, item_ids = list(users), list(items)
    return Scorer(checkpoint, user_ids, cache.features([user_texts.get(u, "") for u in user_ids]),
                  item_ids, cache.features([item_texts.get(i, "") for i in item_ids]))


@dataclass
class Trained:
    checkpoint_dir: Path
    result: TrainResult
    vocab: dict
    resumed_from: str | None
    start_step: int
    global_step: int


def train_challenger(config: NightlyConfig, window: Window, champion: Champion, run_name: str,
                     encoder: Encoder | None = None, on_epoch=None) -> Trained:
    """Resume the champion (or start from the pretrained encoder), grow its vocabularies,
    train on the window, and save the challenger checkpoint with its serving vectors."""
    home = Home(config.home)
    encoder = encoder or load_encoder(config.model.encoder)
    if champion.checkpoint_dir is not None:
        checkpoint = model_mod.load(champion.checkpoint_dir, encoder)
        if checkpoint.config.model_dump() != config.model.model_dump():
            log.warning("model config differs from the champion's; resuming keeps the champion's %s",
                        checkpoint.config.model_dump())
    else:
        checkpoint = model_mod.new_checkpoint(encoder, config.model, config.training.seed)
    start_step = checkpoint.global_step
    cache = TextCache.for_model(home.cache, encoder, checkpoint.config)
    user_texts, item_texts = texts(home)
    result, vocab = fit(checkpoint, cache, window.train, user_texts, item_texts, config.training, on_epoch)
    checkpoint.ingest_watermark = int(ingest_mod.read_manifest(home)["ingest_seq"].max())
    last = pd.concat([window.train["timestamp"], window.held_out["timestamp"]]).max()
    checkpoint.max_event_time = pd.Timestamp(last).isoformat()
    checkpoint.history.append({"run": run_name, "trained_at": datetime.now(timezone.utc).isoformat(),
                               "train_rows": len(window.train), "steps": result.steps, "epoch_losses": result.epoch_losses})
    scorer = build_scorer(checkpoint, cache, user_texts, item_texts)
    tensors, ids = scorer.vectors()
    folder = model_mod.save(checkpoint, home.runs / run_name / "checkpoint", tensors, ids)
    return Trained(checkpoint_dir=folder, result=result, vocab=vocab, resumed_from=champion.version,
                   start_step=start_step, global_step=checkpoint.global_step)


def evaluate_models(config: NightlyConfig, window: Window, challenger_dir: Path, champion: Champion,
                    encoder: Encoder | None = None) -> dict:
    """Score challenger and champion on the same held-out rows, plus the global-mean
    predictor: {"challenger": {part: metrics}, "champion": ... or None, "global_mean": ...}."""
    home = Home(config.home)
    encoder = encoder or load_encoder(config.model.encoder)
    user_texts, item_texts = texts(home)
    events = ingest_mod.read_events(home)
    parts = {"held_out": window.held_out, "anchor": window.anchor}
    eval_rows = pd.concat(parts.values(), ignore_index=True)

    def metrics_of(folder: Path) -> dict:
        checkpoint = model_mod.load(folder, encoder)
        cache = TextCache.for_model(home.cache, encoder, checkpoint.config)
        scorer = build_scorer(checkpoint, cache, user_texts, item_texts, eval_rows)
        out = {}
        for part, rows in parts.items():
            if rows.empty:
                continue
            trained_pairs = without(events, rows)[["user_id", "item_id"]]
            out[part] = evaluate(scorer, rows, trained_pairs, config.evaluation.k, config.evaluation.relevant_rating,
                                 config.training.positive_threshold)
        return out

    mean = float(window.train["rating"].mean()) if len(window.train) else 3.0
    return {
        "challenger": metrics_of(challenger_dir),
        "champion": metrics_of(champion.checkpoint_dir) if champion.checkpoint_dir is not None else None,
        "global_mean": {part: global_mean_metrics(mean, rows) for part, rows in parts.items() if not rows.empty},
    }


def flat_metrics(metrics: dict) -> dict[str, float]:
    """{"challenger.held_out.rmse": ..., "diff.held_out.rmse": ...} for MLflow."""
    flat = {}
    for who in ("challenger", "champion", "global_mean"):
        for part, values in (metrics.get(who) or {}).items():
            for name, value in values.items():
                flat[f"{who}.{part}.{name}"] = value
    for part, values in (metrics.get("champion") or {}).items():
        for name, value in values.items():
            challenger = metrics["challenger"].get(part, {}).get(name)
            if challenger is not None:
                flat[f"diff.{part}.{name}"] = challenger - value
    return {k: v for k, v in flat.items() if v == v}


@dataclass
class Registered:
    version: str
    run_id: str
    decision: Decision
    description: str


def register_and_gate(config: NightlyConfig, run_name: str, window: Window, curated: CurateResult,
                      trained: Trained, metrics: dict, champion: Champion) -> Registered:
    """Log the run to MLflow, register the challenger as a new version and apply the
    promotion gate to it."""
    home = Home(config.home)
    registry.configure(home, config.experiment)
    decision = decide(metrics["challenger"], metrics["champion"], metrics["global_mean"], config.gate)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params(flat_params(config))
        for epoch, loss in enumerate(trained.result.epoch_losses):
            mlflow.log_metric("train_loss", loss, step=epoch)
        mlflow.log_metrics(flat_metrics(metrics))
        mlflow.log_metrics({"train_ratings_per_second": trained.result.ratings_per_second,
                            "global_step": trained.global_step})
        mlflow.log_dict(curated.validation, "validation/results.json")
        mlflow.log_text(curated.validation_markdown, "validation/report.md")
        mlflow.log_dict(window.summary(), "window.json")
        mlflow.log_dict(decision.to_dict(), "decision.json")
        mlflow.set_tags({"resumed_from": trained.resumed_from or "pretrained", "ingest_seq": curated.ingest_seq,
                         "decision": "promoted" if decision.promote else "rejected"})
        example = window.held_out.head(5) if len(window.held_out) else window.train.head(5)
        input_example = example[["user_id", "item_id"]].reset_index(drop=True)
        predictor = model_mod.VectorPredictor(trained.checkpoint_dir)
        output_example = pd.DataFrame({"prediction": predictor.predict(input_example["user_id"], input_example["item_id"])})
        version = registry.log_model_version(config.registered_model, trained.checkpoint_dir,
                                             str(Path(model_mod.__file__).with_name("pyfunc_model.py")),
                                             input_example, output_example, PIP_REQUIREMENTS,
                                             code_paths=[str(Path(model_mod.__file__).parent)])
    summary = window.summary() | {"global_step": trained.global_step, "resumed_from": trained.resumed_from}
    description = registry.describe_version(summary, metrics["challenger"], metrics["champion"], champion.version, decision)
    registry.apply_decision(config.registered_model, version, decision, description)
    return Registered(version=version, run_id=run.info.run_id, decision=decision, description=description)


def flat_params(config: NightlyConfig) -> dict[str, object]:
    out = {"landing": config.landing, "fail_on_invalid": config.fail_on_invalid}
    for section in ("model", "training", "evaluation", "gate"):
        for key, value in getattr(config, section).model_dump().items():
            out[f"{section}.{key}"] = value if not isinstance(value, list) else ",".join(map(str, value))
    return out


def run_report(run_name: str, batch: IngestResult, curated: CurateResult | None, window: Window | None,
               trained: Trained | None, metrics: dict | None, registered: Registered | None, note: str = "") -> str:
    """The markdown artifact a reviewer reads in the Prefect UI."""
    lines = [f"# llmrec nightly run `{run_name}`", ""]
    if note:
        lines += [f"**{note}**", ""]
    lines += ["## Ingest", "", f"- new landing files: {len(batch.reads)}; already ingested: {batch.already_ingested}"]
    for change in batch.changed:
        lines.append(f"- changed after ingestion (not re-read): `{change['file']}`")
    if curated is not None:
        lines += [f"- event rows in: {curated.rows_in} = curated {curated.rows_curated} + quarantined {curated.rows_quarantined}",
                  "", "## Validation", "", curated.validation_markdown or "(no files)", ""]
    if window is not None:
        lines += ["## Window", ""] + [f"- {k}: {v}" for k, v in window.summary().items()] + [""]
    if trained is not None:
        lines += ["## Training", "",
                  f"- resumed from: {'v' + trained.resumed_from if trained.resumed_from else 'the pretrained encoder'}",
                  f"- global step {trained.start_step} -> {trained.global_step}; vocab {trained.vocab}",
                  f"- epoch losses: {', '.join(f'{x:.4f}' for x in trained.result.epoch_losses)}",
                  f"- {trained.result.ratings_per_second:,.0f} ratings/s", ""]
    if metrics is not None:
        lines += ["## Challenger vs champion", "", metrics_table(metrics), ""]
    if registered is not None:
        d = registered.decision
        lines += ["## Decision", "", f"- version **{registered.version}** -> alias `{d.alias}`", f"- {d.reason}"]
        lines += [f"- failed: {c.part}.{c.metric}: {c.outcome()}" for c in d.failed()]
    return "\n".join(lines)


def metrics_table(metrics: dict) -> str:
    rows = ["| part | metric | challenger | champion | difference | global mean |", "|---|---|---|---|---|---|"]
    for part in PARTS:
        challenger = metrics["challenger"].get(part)
        if not challenger:
            continue
        champion = (metrics.get("champion") or {}).get(part, {})
        baseline = metrics.get("global_mean", {}).get(part, {})
        for name, value in challenger.items():
            other = champion.get(name)
            diff = "" if other is None else f"{value - other:+.4f}"
            rows.append(f"| {part} | {name} | {value:.4f} | {'' if other is None else f'{other:.4f}'} | {diff} | "
                        f"{'' if name not in baseline else f'{baseline[name]:.4f}'} |")
    return "\n".join(rows)


def new_run_name() -> str:
    return datetime.now(timezone.utc).strftime("nightly-%Y%m%dT%H%M%S") + f"-{time.perf_counter_ns() % 10000:04d}"
