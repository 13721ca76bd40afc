"""MLflow tracking and model registry: log a checkpoint as a pyfunc model version, apply the
gate's decision as aliases and tags, describe the version, roll back, list the history.

Aliases: `champion` is served and resumed from, `previous` is the champion it displaced
(the rollback target), `challenger` is the latest rejected version. Nothing is ever deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature

from llmrec import model as llmrec_model
from llmrec.config import Home, MonitorConfig, NightlyConfig
from llmrec.encoder import Encoder
from llmrec.errors import LlmrecError
from llmrec.files import replace_atomically
from llmrec.gate import Decision, check_metrics, check_rows, decide, hold_for_drift
from llmrec.ingest import redact
from llmrec.monitor import DriftRecord, consistency_baseline, drift_hold
from llmrec.report import comparison_markdown, comparison_png, render_table, trend_png

log = logging.getLogger(__name__)

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"
DECISION, PROMOTED, REJECTED, ABANDONED = "decision", "promoted", "rejected", "abandoned"
# The nightly run (flow run name) a tracking run or version belongs to: a retried
# register-and-gate finds its own run and version by it instead of creating new ones.
NIGHT_TAG = "llmrec.night"
# Newest ingest sequence in the data a version was trained and judged on.
WATERMARK_TAG = "ingest_watermark"
# The ingest sequence the version's new rows start after (llmrec.window: rows no gate had judged).
SINCE_TAG = "new_rows_since"
# Error codes MLflow uses for "no such registered model / alias / version".
_ABSENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"}


def configure(home: Home, experiment: str) -> str:
    """Point MLflow at $MLFLOW_TRACKING_URI or the sqlite file in `home`, select `experiment`
    (creating it with artifacts under `home.mlflow_artifacts` when the store is local sqlite)
    and return the tracking URI."""
    uri = connect(home)
    # A server assigns its own (proxied) artifact root; only a local store needs a folder.
    if uri.startswith("sqlite:") and mlflow.get_experiment_by_name(experiment) is None:
        try:
            mlflow.create_experiment(experiment, artifact_location=home.mlflow_artifacts.as_uri())
        except MlflowException:
            # Another process may have created it between the lookup and the create.
            if mlflow.get_experiment_by_name(experiment) is None:
                raise
    mlflow.set_experiment(experiment)
    return uri


def connect(home: Home) -> str:
    """Point MLflow at $MLFLOW_TRACKING_URI or the sqlite file in `home` (for reading the
    registry: no experiment is selected or created) and return the tracking URI."""
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    uri = home.mlflow_uri()
    if uri.startswith("sqlite:"):
        home.ensure()
    user_uri = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    # set_tracking_uri also exports MLFLOW_TRACKING_URI; undo that, or the next configure in
    # this process (or any child process) would take this home's store for the user's choice.
    if user_uri is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user_uri
    return uri


@dataclass
class ModelVersionInfo:
    """What the flow needs to know about one registered model version."""

    version: str
    run_id: str | None
    source: str
    tags: dict
    description: str
    aliases: list[str]
    name: str


def _info(mv) -> ModelVersionInfo:
    return ModelVersionInfo(
        version=str(mv.version),
        run_id=mv.run_id,
        source=mv.source,
        tags=dict(mv.tags or {}),
        description=mv.description or "",
        aliases=list(mv.aliases or []),
        name=mv.name,
    )


def get_version(name: str, version: str) -> ModelVersionInfo:
    """Version `version` of registered model `name`; a missing one is a user's error."""
    try:
        return _info(MlflowClient().get_model_version(name, str(version)))
    except MlflowException as exc:
        if exc.error_code in _ABSENT:
            raise LlmrecError(f"registered model {name!r} has no version {version!r}") from exc
        raise


def get_alias(name: str, alias: str) -> ModelVersionInfo | None:
    """The version of registered model `name` carrying `alias`, or None when the model or the
    alias does not exist."""
    try:
        return _info(MlflowClient().get_model_version_by_alias(name, alias))
    except MlflowException as exc:
        if exc.error_code in _ABSENT:
            return None
        raise


def download_checkpoint(info: ModelVersionInfo, dest: Path) -> Path:
    """Download the version's `checkpoint` artifact folder into `dest`; return its local path."""
    uri = f"models:/{info.name}/{info.version}"
    # pyfunc stores an artifact under the basename of the logged folder
    # (artifacts/<basename>), not under its key, so the MLmodel file says where it is.
    artifacts = Model.load(uri).flavors.get("python_function", {}).get("artifacts", {})
    if "checkpoint" not in artifacts:
        raise LlmrecError(f"model version {info.name} v{info.version} has no 'checkpoint' artifact")
    dest.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{uri}/{artifacts['checkpoint']['path']}", dst_path=str(dest)
    )
    return Path(local)


CHECKPOINT_FILES_TAG = "checkpoint_files"
# Files every llmrec checkpoint has; checked when a version recorded no checksums.
REQUIRED_FILES = ("state.json", "model.safetensors", "optimizer.safetensors")


def file_digests(folder: Path) -> dict[str, list]:
    """[size, sha256] of every file under `folder`, by path relative to it."""
    digests = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        sha = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
        digests[path.relative_to(folder).as_posix()] = [path.stat().st_size, sha.hexdigest()]
    return digests


def checkpoint_problem(folder: Path | None, expected: dict | None) -> str | None:
    """Why the local copy `folder` cannot be trusted (None when it can): a file recorded at
    registration missing, or of another size or checksum; without a record, a missing
    required file."""
    if folder is None or not folder.is_dir():
        return "no local copy"
    if expected is None:
        missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
        return f"missing {', '.join(missing)}" if missing else None
    found = file_digests(folder)
    for name, (size, sha) in expected.items():
        if name not in found:
            return f"{name} missing"
        if found[name][0] != size:
            return f"{name} has {found[name][0]} bytes, {size} recorded"
        if found[name][1] != sha:
            return f"{name} checksum differs from the one recorded"
    return None


def load_champion(home: Home, name: str, encoder: Encoder) -> llmrec_model.Champion:
    """The version aliased `champion` and its checkpoint, downloaded once per version as
    `home/runs/champion-vN` and loaded once; no champion before the first model. The local
    copy is checked against the sizes and checksums recorded at registration before use;
    a partial or damaged copy is downloaded again (into a temp folder, renamed into place)."""
    info = get_alias(name, CHAMPION)
    if info is None:
        return llmrec_model.Champion()
    recorded = info.tags.get(CHECKPOINT_FILES_TAG)
    expected = json.loads(recorded) if recorded else None
    local = home.runs / f"champion-v{info.version}"
    problem = checkpoint_problem(local, expected)
    if problem is not None:
        if problem != "no local copy":
            log.warning("local copy of %s v%s in %s cannot be trusted (%s); downloading it again",
                        name, info.version, local, problem)

        def download(temp: Path) -> None:
            staging = temp.with_name(temp.name + ".download")
            try:
                download_checkpoint(info, staging).rename(temp)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

        replace_atomically(local, download)
        problem = checkpoint_problem(local, expected)
        if problem is not None:
            raise LlmrecError(f"registered model {name} v{info.version}: the checkpoint in the registry does not "
                              f"match what was recorded at registration ({problem}); roll back to another version")
    return llmrec_model.Champion(version=info.version, checkpoint=llmrec_model.load(local, encoder))


def log_model_version(
    name: str,
    checkpoint_dir: Path,
    python_model: str,
    input_example: pd.DataFrame,
    output_example: pd.DataFrame,
    pip_requirements: list[str],
    code_paths: list[str] | None = None,
    signature=None,
    tags: dict[str, str] | None = None,
) -> str:
    """Log `checkpoint_dir` as a models-from-code pyfunc (`python_model` is the path of the .py
    file that calls `mlflow.models.set_model`) in the active run, register it as a new version
    of `name` and return the version."""
    if mlflow.active_run() is None:
        raise RuntimeError("log_model_version must be called inside mlflow.start_run()")
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(python_model),
        artifacts={"checkpoint": str(checkpoint_dir)},
        signature=signature or infer_signature(input_example, output_example),
        input_example=input_example,
        pip_requirements=pip_requirements,
        code_paths=code_paths,
    )
    # The client, not mlflow.register_model: the same registration without its lines on stderr.
    client = MlflowClient()
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    return str(client.create_model_version(name, source=info.model_uri, run_id=mlflow.active_run().info.run_id,
                                           model_id=info.model_id, tags=tags).version)


def apply_decision(name: str, version: str, decision: Decision, description: str) -> None:
    """Record the gate's decision on the version (description, tags) and move the aliases:
    promoted -> `champion` (the displaced champion becomes `previous`), else `challenger`.
    The `decision` tag is written last: a version without it was interrupted before the
    decision was complete (see `settle_undecided`). Safe to repeat."""
    client = MlflowClient()
    client.update_model_version(name, version, description=description)
    for check in decision.failed():
        client.set_model_version_tag(name, version, f"failed.{check.part}.{check.metric}", check.outcome())
    if decision.drift_hold:
        client.set_model_version_tag(name, version, "drift_hold", decision.drift_hold)
    if decision.promote:
        current = get_alias(name, CHAMPION)
        if current is not None and current.version != str(version):
            client.set_registered_model_alias(name, PREVIOUS, current.version)
        client.set_registered_model_alias(name, CHAMPION, version)
        mark_champion(name, version, "promotion", decision.reason.split("\n", 1)[0])
    else:
        client.set_registered_model_alias(name, CHALLENGER, version)
    client.set_model_version_tag(name, version, DECISION, PROMOTED if decision.promote else REJECTED)


def _cell(value: object, column: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def describe_version(
    window: dict,
    metrics: dict,
    champion_metrics: dict | None,
    champion_version: str | None,
    decision: Decision,
) -> str:
    """Markdown for the version description in the MLflow UI. The first line is the decision's
    reason, so one-line listings (`version_history`) show it."""
    champion = champion_metrics or {}
    against = f"champion v{champion_version}" if champion_version else "champion"
    verdict = f"Promoted, aliased `{CHAMPION}`" if decision.promote else f"Rejected, aliased `{CHALLENGER}`"
    gated = {(c.part, c.metric): "pass" if c.passed else "FAIL" for c in decision.checks}
    window_rows = [{"": key.replace("_", " "), " ": value} for key, value in window.items()]
    lines = [decision.reason, "", "### Data window", "", render_table(window_rows, fmt=_cell)]
    for part in dict.fromkeys([*metrics, *champion]):
        ours, theirs = metrics.get(part, {}), champion.get(part, {})
        rows = []
        for metric in dict.fromkeys([*ours, *theirs]):
            a, b = ours.get(metric), theirs.get(metric)
            rows.append({"metric": metric, "challenger": a, against: b,
                         "difference": a - b if a is not None and b is not None else None,
                         "gate": gated.get((part, metric), "")})
        lines += ["", f"### Metrics: {part}", "", render_table(rows, fmt=_cell)]
    lines += ["", "### Decision", "", f"**{verdict}.**", ""]
    if decision.checks:
        lines += [render_table(check_rows(decision)), ""]
    lines += [f"- {gated[c.part, c.metric]}: {c.rule} (challenger {_cell(c.challenger)})" for c in decision.checks]
    lines += [f"- skipped: {note}" for note in decision.skipped]
    return "\n".join(lines) + "\n"


def rollback(name: str, version: str | None = None) -> str:
    """Move `champion` to `version` (default: the version aliased `previous`); the displaced
    champion becomes `previous`. Returns the new champion's version."""
    client = MlflowClient()
    if version is None:
        target = get_alias(name, PREVIOUS)
        if target is None:
            raise LlmrecError(
                f"registered model {name!r} has no version aliased {PREVIOUS!r} to roll back to; "
                "pass the version to roll back to (see the version history)"
            )
        version = target.version
    else:
        get_version(name, version)
    current = get_alias(name, CHAMPION)
    if current is not None and current.version == str(version):
        return current.version
    client.set_registered_model_alias(name, CHAMPION, str(version))
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current.version)
    mark_champion(name, str(version), "rollback", f"rolled back from v{current.version}" if current else "rolled back")
    return str(version)


CHAMPION_AT = "champion_at."


def mark_champion(name: str, version: str, how: str, why: str) -> None:
    """Record on the version that it became champion now, how (promotion, rollback,
    approval) and why: the registry keeps no history of alias moves, these tags are it."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    MlflowClient().set_model_version_tag(name, str(version), f"{CHAMPION_AT}{now}", f"{how}: {why}"[:4000])


CHAMPION_HISTORY_COLUMNS = ["since", "until", "version", "how", "why"]


def champion_history(name: str) -> pd.DataFrame:
    """Which version was champion when and why it became champion, oldest first, from the
    versions' `champion_at.<time>` tags; `until` is empty for the current champion."""
    try:
        found = MlflowClient().search_model_versions(f"name = '{name}'")
    except MlflowException as exc:
        if exc.error_code in _ABSENT:
            return pd.DataFrame(columns=CHAMPION_HISTORY_COLUMNS)
        raise
    rows = []
    for mv in found:
        for key, value in (mv.tags or {}).items():
            if key.startswith(CHAMPION_AT):
                how, _, why = value.partition(": ")
                rows.append({"since": key[len(CHAMPION_AT):], "version": str(mv.version), "how": how, "why": why})
    rows.sort(key=lambda row: row["since"])
    for row, following in zip(rows, rows[1:] + [None]):
        row["until"] = following["since"] if following else ""
    return pd.DataFrame(rows, columns=CHAMPION_HISTORY_COLUMNS)


def end_running_runs() -> list[str]:
    """End as FAILED the runs of the active experiment still RUNNING: with the home's lock
    held, no night is running, so they were left by one that was killed."""
    client = MlflowClient()
    runs = mlflow.search_runs(filter_string="attributes.status = 'RUNNING'", output_format="list")
    for run in runs:
        client.set_terminated(run.info.run_id, "FAILED")
    return [run.info.run_id for run in runs]


def _versions(name: str) -> list:
    try:
        return MlflowClient().search_model_versions(f"name = '{name}'")
    except MlflowException as exc:
        if exc.error_code in _ABSENT:
            return []
        raise


def settle_undecided(name: str) -> list[dict]:
    """Give every version without a `decision` tag one. `apply_decision` writes the
    description, then the aliases, then the tag, so a version already holding `champion`
    or `challenger` was decided and only its tag is completed; any other was registered by
    a night interrupted before its gate and is tagged `abandoned` with a description saying
    why (its rows are trained again by the next night, as no decided version has seen them)."""
    client = MlflowClient()
    undecided = [mv for mv in _versions(name) if DECISION not in (mv.tags or {})]
    if not undecided:
        return []
    aliases = {str(v): alias for alias, v in client.get_registered_model(name).aliases.items()
               if alias in (CHAMPION, CHALLENGER)}
    settled = []
    for mv in sorted(undecided, key=lambda mv: int(mv.version)):
        version, night = str(mv.version), (mv.tags or {}).get(NIGHT_TAG, "an earlier night")
        alias = aliases.get(version)
        if alias is not None:
            outcome = PROMOTED if alias == CHAMPION else REJECTED
        else:
            outcome = ABANDONED
            client.update_model_version(name, version, description=(
                f"Abandoned: nightly run {night} was interrupted after registering this version and before "
                "its gate decided. No alias was given; the rows it was trained on are trained and judged "
                "again by the next night."))
        client.set_model_version_tag(name, version, DECISION, outcome)
        settled.append({"version": version, "night": night, "decision": outcome})
    return settled


def decided_watermark(name: str) -> int:
    """The newest ingest sequence any promoted or rejected version was trained and judged
    on (0 when none): curated rows above it have not been through a gate yet."""
    client, newest = MlflowClient(), 0
    for mv in _versions(name):
        tags = mv.tags or {}
        if tags.get(DECISION) not in (PROMOTED, REJECTED):
            continue
        # Versions registered before the watermark tag existed: their run's ingest_seq.
        mark = tags.get(WATERMARK_TAG) or (client.get_run(mv.run_id).data.tags.get("ingest_seq") if mv.run_id else None)
        newest = max(newest, int(mark or 0))
    return newest


HISTORY_COLUMNS = ["version", "aliases", "decision", "created", "description"]


def version_history(name: str) -> pd.DataFrame:
    """One row per version of `name`, oldest first: version, aliases, decision tag, creation
    time (UTC) and the first line of the description. Empty when the model does not exist."""
    client = MlflowClient()
    try:
        aliases_of = client.get_registered_model(name).aliases
    except MlflowException as exc:
        if exc.error_code in _ABSENT:
            return pd.DataFrame(columns=HISTORY_COLUMNS)
        raise
    # search_model_versions leaves `aliases` empty; the registered model maps alias -> version.
    by_version: dict[str, list[str]] = {}
    for alias, v in aliases_of.items():
        by_version.setdefault(str(v), []).append(alias)
    rows = [
        {
            "version": str(mv.version),
            "aliases": ", ".join(sorted(by_version.get(str(mv.version), []))),
            "decision": (mv.tags or {}).get("decision", ""),
            "created": pd.Timestamp(mv.creation_timestamp, unit="ms", tz="UTC"),
            "description": (mv.description or "").split("\n", 1)[0],
        }
        for mv in client.search_model_versions(f"name = '{name}'")
    ]
    rows.sort(key=lambda row: int(row["version"]))
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


PIP_REQUIREMENTS = ["numpy", "pandas", "safetensors", "torch", "mlflow"]


def recommender_signature(input_example: pd.DataFrame, output_example: pd.DataFrame):
    """user_id + item_id -> prediction, and item_id optional with a `k` parameter: user ids
    with params={"k": K} return each user's top K (see pyfunc_model)."""
    from mlflow.types.schema import ColSpec, Schema

    signature = infer_signature(input_example, output_example, params={"k": 0})
    signature.inputs = Schema([ColSpec(spec.type, spec.name, required=spec.name != "item_id")
                               for spec in signature.inputs.inputs])
    return signature


PYFUNC_MODEL = Path(__file__).with_name("pyfunc_model.py")


def new_run_name() -> str:
    return datetime.now(timezone.utc).strftime("nightly-%Y%m%dT%H%M%S") + f"-{time.perf_counter_ns() % 10000:04d}"


def flat_params(config: NightlyConfig) -> dict[str, object]:
    out = {"landing": redact(config.landing), "fail_on_invalid": config.fail_on_invalid}
    for section in ("model", "training", "evaluation", "gate", "monitor"):
        for key, value in getattr(config, section).model_dump().items():
            out[f"{section}.{key}"] = value if not isinstance(value, list) else ",".join(map(str, value))
    return out


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


def needs_approval(config: NightlyConfig, drift: DriftRecord | None) -> bool:
    """Whether an engineer decides tonight: always with gate.require_approval, and on a
    drifting night with monitor.on_drift=approve."""
    drifting = drift_hold(drift, config.monitor) is not None
    return config.gate.require_approval or (drifting and config.monitor.on_drift == "approve")


def find_night_run(run_name: str):
    """The tracking run of nightly run `run_name` in the active experiment, or None."""
    runs = mlflow.search_runs(filter_string=f"tags.`{NIGHT_TAG}` = '{run_name}'", output_format="list")
    return runs[0] if runs else None


def find_run_version(name: str, run_id: str) -> str | None:
    """The version of `name` registered from tracking run `run_id`, or None."""
    try:
        found = MlflowClient().search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException as exc:
        if exc.error_code in _ABSENT:
            return None
        raise
    return str(min(int(mv.version) for mv in found)) if found else None


def register_and_gate(config: NightlyConfig, run_name: str, window, curated, trained, metrics: dict,
                      champion_version: str | None, drift: DriftRecord | None = None) -> Registered:
    """Log the run to MLflow (with tonight's drift record), register the challenger as a new
    version and apply the promotion gate to it; a drifting night holds the challenger back.
    When an approval is needed the version waits as `challenger`, the gate's verdict as advice.
    Safe to retry: a repeat for the same `run_name` continues the tracking run and the
    version the first attempt created, never a second of either."""
    decision = decide(metrics["challenger"], metrics["champion"], metrics["global_mean"], config.gate,
                      metrics.get("samples"))
    if needs_approval(config, drift):
        advice, drifting = decision.reason, drift_hold(drift, config.monitor)
        if drifting:
            advice = f"{drifting}; the checks say: {advice}"
        decision = replace(decision, promote=False, alias=CHALLENGER,
                           reason=f"Awaiting approval in the Prefect UI. Gate's advice: {advice}")
    else:
        decision = hold_for_drift(decision, drift_hold(drift, config.monitor))
    existing = find_night_run(run_name)
    opened = (mlflow.start_run(run_id=existing.info.run_id) if existing is not None
              else mlflow.start_run(run_name=run_name, tags={NIGHT_TAG: run_name}))
    with opened as run:
        if existing is None or LOGGED_TAG not in existing.data.tags:
            log_night(config, window, curated, trained, metrics, decision, drift, champion_version)
        version = find_run_version(config.registered_model, run.info.run_id)
        if version is None:
            example = window.held_out.head(5) if len(window.held_out) else window.train.head(5)
            input_example = example[["user_id", "item_id"]].reset_index(drop=True)
            output_example = pd.DataFrame(
                {"prediction": trained.scorer.predict(input_example["user_id"], input_example["item_id"])})
            tags = {NIGHT_TAG: run_name, WATERMARK_TAG: str(window.watermark), SINCE_TAG: str(window.since),
                    CHECKPOINT_FILES_TAG: json.dumps(file_digests(trained.checkpoint_dir), separators=(",", ":"))}
            version = log_model_version(config.registered_model, trained.checkpoint_dir, str(PYFUNC_MODEL),
                                        input_example, output_example, PIP_REQUIREMENTS,
                                        code_paths=[str(PYFUNC_MODEL.parent)], tags=tags,
                                        signature=recommender_signature(input_example, output_example))
    summary = window.summary() | {"global_step": trained.global_step, "resumed_from": trained.resumed_from}
    description = describe_version(summary, metrics["challenger"], metrics["champion"], champion_version, decision)
    apply_decision(config.registered_model, version, decision, description)
    return Registered(version=version, run_id=run.info.run_id, decision=decision, description=description)


def log_comparison(decision: Decision, segments: list[dict], champion_version: str | None) -> None:
    """The active run's comparison artifact: gate checks with intervals and metrics per
    segment as JSON (for `llmrec versions --compare`), markdown and a PNG."""
    against = f"champion v{champion_version}" if champion_version else "the global-mean predictor"
    table = check_rows(decision)
    mlflow.log_dict({"champion_version": champion_version, "checks": table, "segments": segments},
                    "comparison/comparison.json")
    mlflow.log_text(comparison_markdown(f"Challenger vs {against}", table, segments), "comparison/comparison.md")
    with tempfile.TemporaryDirectory() as scratch:
        image = Path(scratch) / "comparison.png"
        comparison_png(decision.checks, image)
        mlflow.log_artifact(str(image), "comparison")


def compare_versions(name: str, a: str, b: str, rescore: Callable[[str, str], str] | None = None) -> str:
    """Text comparing versions `a` and `b`: their logged metrics side by side (each measured
    on its own night's rows), and the stored paired comparison where one was gated against
    the other (same rows, with intervals and segments); otherwise `rescore(a, b)`, both
    scored on the same rows now (`llmrec.compare.paired_comparison`)."""
    client = MlflowClient()
    runs = {version: client.get_run(get_version(name, version).run_id) for version in (a, b)}
    rows = []
    for key in sorted(set(runs[a].data.metrics) | set(runs[b].data.metrics)):
        if not key.startswith("challenger."):
            continue
        _, part, metric = key.split(".", 2)
        va, vb = runs[a].data.metrics.get(key), runs[b].data.metrics.get(key)
        rows.append({"part": part, "metric": metric, f"v{a}": va, f"v{b}": vb,
                     f"v{b} - v{a}": vb - va if va is not None and vb is not None else None})
    text = [f"v{a} vs v{b}: each version's metrics on its own night's held-out rows (not paired)", "",
            render_table(rows, style="text")]
    for ours, theirs in ((a, b), (b, a)):
        try:
            stored = mlflow.artifacts.load_dict(f"runs:/{runs[ours].info.run_id}/comparison/comparison.json")
        except (MlflowException, OSError):
            continue
        if str(stored.get("champion_version")) != str(theirs):
            continue
        text += ["", f"v{ours} was gated against champion v{theirs} on the same rows:", "",
                 render_table(stored["checks"], style="text") if stored["checks"] else "(no checks)", "",
                 "per segment:", "", render_table(stored["segments"], style="text") if stored["segments"] else ""]
    if len(text) == 3:
        text += ["", "neither was gated against the other: no paired comparison on the same rows is stored"]
        if rescore is not None:
            text += ["", rescore(a, b)]
    return "\n".join(text)


def apply_approval(name: str, registered: Registered, approve: bool | None, reviewer: str, comment: str) -> Registered:
    """Record an engineer's answer on the waiting version (tags `approval`, `approval_comment`,
    `approval_reviewer`) and promote it when approved; `approve=None` = no answer in time,
    which rejects. Returns the registered version with the final decision."""
    client = MlflowClient()
    verdict = {True: "approved", False: "rejected", None: "timed out"}[approve]
    who = f" by {reviewer}" if reviewer else ""
    reason = (f"{'Promoted' if approve else 'Rejected'}: {verdict}{who}"
              + (f" ({comment})" if comment else "") + f". {registered.decision.reason}")
    decision = replace(registered.decision, promote=bool(approve), alias=CHAMPION if approve else CHALLENGER,
                       reason=reason)
    for key, value in (("approval", verdict), ("approval_comment", comment), ("approval_reviewer", reviewer)):
        client.set_model_version_tag(name, registered.version, key, value)
    description = reason + "\n" + registered.description.split("\n", 1)[1]
    client.set_model_version_tag(name, registered.version, "decision", "promoted" if approve else "rejected")
    client.update_model_version(name, registered.version, description=description)
    client.set_tag(registered.run_id, "decision", "promoted" if approve else "rejected")
    if approve:
        current = get_alias(name, CHAMPION)
        if current is not None and current.version != registered.version:
            client.set_registered_model_alias(name, PREVIOUS, current.version)
        client.set_registered_model_alias(name, CHAMPION, registered.version)
        mark_champion(name, registered.version, "approval", f"approved{who}" + (f": {comment}" if comment else ""))
    return replace(registered, decision=decision, description=description)


# Set on a tracking run once its parameters, metrics and artifacts are all logged.
LOGGED_TAG = "llmrec.logged"


def log_night(config: NightlyConfig, window, curated, trained, metrics: dict, decision: Decision,
              drift: DriftRecord | None, champion_version: str | None) -> None:
    """Parameters, metrics and artifacts of the night (drift record included), into the active run."""
    if drift is not None:
        mlflow.log_metrics(drift.metrics())
        mlflow.log_text(drift.json, "drift/drift.json")
        mlflow.log_text(drift.html, "drift/drift.html")
    mlflow.log_params(flat_params(config))
    for epoch, loss in enumerate(trained.result.epoch_losses):
        mlflow.log_metric("train_loss", loss, step=epoch)
    mlflow.log_metrics(flat_metrics(metrics) | check_metrics(decision))
    mlflow.log_metrics({"train_ratings_per_second": trained.result.ratings_per_second,
                        "global_step": trained.global_step})
    mlflow.log_dict(curated.validation, "validation/results.json")
    mlflow.log_text(curated.validation_markdown, "validation/report.md")
    mlflow.log_dict(window.summary(), "window.json")
    mlflow.log_dict(decision.to_dict(), "decision.json")
    log_comparison(decision, metrics.get("segments", []), champion_version)
    mlflow.set_tags({"resumed_from": trained.resumed_from or "pretrained", "ingest_seq": curated.ingest_seq,
                     DECISION: PROMOTED if decision.promote else REJECTED, LOGGED_TAG: "true"})


def log_report(run_id: str, report: str) -> None:
    """The nightly markdown report, beside the run it describes."""
    MlflowClient().log_text(run_id, report, "report.md")


TREND_RUN_TAG = "llmrec.trend"
TREND_METRICS = ("rmse", "mae", "recall_at_10", "ndcg_at_10")


def trend_run(experiment: str) -> str:
    """The experiment's one long-lived `trend` run (created on first use): every night
    appends the served champion's metrics to its metric histories with step = night."""
    found = mlflow.search_runs(experiment_names=[experiment], filter_string=f"tags.`{TREND_RUN_TAG}` = 'champion'",
                               output_format="list", max_results=1)
    if found:
        return found[0].info.run_id
    client = MlflowClient()
    run = client.create_run(mlflow.get_experiment_by_name(experiment).experiment_id, run_name="champion-trend",
                            tags={TREND_RUN_TAG: "champion"})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def served_metrics(metrics: dict, decision: Decision) -> dict:
    """Tonight's metrics of the model that serves after the decision: the challenger when
    promoted, else the champion (scored on the same rows)."""
    return metrics["challenger"] if decision.promote or metrics.get("champion") is None else metrics["champion"]


def log_trend(experiment: str, night: int, version: str, metrics: dict, drift: DriftRecord | None) -> None:
    """Append one night to the trend run: `<part>.<metric>` of the serving champion, its
    version, the drift share and the rating consistency (when measured: the reference of
    later nights, `trend_consistency_baseline`), all at step = night (the ingest sequence)."""
    values = {f"{part}.{name}": value for part, part_metrics in metrics.items()
              for name, value in part_metrics.items() if name in TREND_METRICS and value == value}
    values["champion_version"] = float(version)
    if drift is not None:
        values["drift.share"] = drift.share
        if drift.consistency is not None:
            values["drift.rating_consistency"] = drift.consistency
    client, run_id = MlflowClient(), trend_run(experiment)
    stamp = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(key, float(value), stamp, night)
                                      for key, value in values.items()])


def trend_table(experiment: str) -> pd.DataFrame:
    """The trend run's metric histories as one row per night (empty before the first night)."""
    if mlflow.get_experiment_by_name(experiment) is None:
        return pd.DataFrame()
    found = mlflow.search_runs(experiment_names=[experiment], filter_string=f"tags.`{TREND_RUN_TAG}` = 'champion'",
                               output_format="list", max_results=1)
    if not found:
        return pd.DataFrame()
    client, run = MlflowClient(), found[0]
    columns = {}
    for key in run.data.metrics:
        # The last value logged for a night wins (a night that is rerun overwrites itself).
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
        columns[key] = {m.step: m.value for m in history}
    frame = pd.DataFrame(columns).sort_index()
    frame.index.name = "night"
    if "champion_version" in frame:
        frame["champion_version"] = frame["champion_version"].astype("Int64")
    return frame


def trend_consistency_baseline(experiment: str, before: int, config: MonitorConfig) -> float | None:
    """The reference of tonight's rating consistency: `llmrec.monitor.consistency_baseline`
    of the values the trend holds for the nights up to ingest sequence `before` (tonight's
    new rows come after it)."""
    trend = trend_table(experiment)
    if "drift.rating_consistency" not in trend:
        return None
    earlier = trend.loc[trend.index <= before, "drift.rating_consistency"].dropna()
    return consistency_baseline(earlier.tolist(), config)


def record_trend(experiment: str, registered: Registered, metrics: dict, champion_version: str | None, night: int,
                 drift: DriftRecord | None, image: Path) -> Path | None:
    """Append tonight to the trend run, draw the whole trend into `image` and log it beside
    the nightly run; None when no model serves (a rejected first model)."""
    served = registered.version if registered.decision.promote else champion_version
    if served is None:
        return None
    log_trend(experiment, night, served, served_metrics(metrics, registered.decision), drift)
    image.parent.mkdir(parents=True, exist_ok=True)
    trend_png(trend_table(experiment), image)
    MlflowClient().log_artifact(registered.run_id, str(image))
    return image
