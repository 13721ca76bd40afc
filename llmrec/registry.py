"""MLflow tracking and model registry: log a checkpoint as a pyfunc model version, apply the
gate's decision as aliases and tags, describe the version, roll back, list the history.

Aliases: `champion` is served and resumed from, `previous` is the champion it displaced
(the rollback target), `challenger` is the latest rejected version. Nothing is ever deleted.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature

from llmrec import model as llmrec_model
from llmrec.config import Home, NightlyConfig
from llmrec.encoder import Encoder
from llmrec.errors import LlmrecError
from llmrec.gate import Decision, decide
from llmrec.report import render_table

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"
# Error codes MLflow uses for "no such registered model / alias / version".
_ABSENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"}


def configure(home: Home, experiment: str) -> str:
    """Point MLflow at $MLFLOW_TRACKING_URI or the sqlite file in `home`, select `experiment`
    (creating it with artifacts under `home.mlflow_artifacts` when the store is local sqlite)
    and return the tracking URI."""
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


def load_champion(home: Home, name: str, encoder: Encoder) -> llmrec_model.Champion:
    """The version aliased `champion` and its checkpoint, downloaded once per version into
    `home/runs/champion-vN` and loaded once; no champion before the first model."""
    info = get_alias(name, CHAMPION)
    if info is None:
        return llmrec_model.Champion()
    target = home.runs / f"champion-v{info.version}"
    cached = next(target.rglob("state.json"), None) if target.exists() else None
    local = cached.parent if cached is not None else download_checkpoint(info, target)
    return llmrec_model.Champion(version=info.version, checkpoint=llmrec_model.load(local, encoder))


def log_model_version(
    name: str,
    checkpoint_dir: Path,
    python_model: str,
    input_example: pd.DataFrame,
    output_example: pd.DataFrame,
    pip_requirements: list[str],
    code_paths: list[str] | None = None,
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
        signature=infer_signature(input_example, output_example),
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
                                           model_id=info.model_id).version)


def apply_decision(name: str, version: str, decision: Decision, description: str) -> None:
    """Record the gate's decision on the version (tags, description) and move the aliases:
    promoted -> `champion` (the displaced champion becomes `previous`), else `challenger`."""
    client = MlflowClient()
    client.set_model_version_tag(name, version, "decision", "promoted" if decision.promote else "rejected")
    for check in decision.failed():
        client.set_model_version_tag(name, version, f"failed.{check.part}.{check.metric}", check.outcome())
    client.update_model_version(name, version, description=description)
    if decision.promote:
        current = get_alias(name, CHAMPION)
        if current is not None and current.version != str(version):
            client.set_registered_model_alias(name, PREVIOUS, current.version)
        client.set_registered_model_alias(name, CHAMPION, version)
    else:
        client.set_registered_model_alias(name, CHALLENGER, version)


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
        try:
            client.get_model_version(name, str(version))
        except MlflowException as exc:
            if exc.error_code in _ABSENT:
                raise LlmrecError(f"registered model {name!r} has no version {version!r}") from exc
            raise
    current = get_alias(name, CHAMPION)
    if current is not None and current.version == str(version):
        return current.version
    client.set_registered_model_alias(name, CHAMPION, str(version))
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current.version)
    return str(version)


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
PYFUNC_MODEL = Path(__file__).with_name("pyfunc_model.py")


def new_run_name() -> str:
    return datetime.now(timezone.utc).strftime("nightly-%Y%m%dT%H%M%S") + f"-{time.perf_counter_ns() % 10000:04d}"


def flat_params(config: NightlyConfig) -> dict[str, object]:
    out = {"landing": config.landing, "fail_on_invalid": config.fail_on_invalid}
    for section in ("model", "training", "evaluation", "gate"):
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


def register_and_gate(config: NightlyConfig, run_name: str, window, curated, trained, metrics: dict,
                      champion_version: str | None) -> Registered:
    """Log the run to MLflow, register the challenger as a new version and apply the
    promotion gate to it."""
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
        output_example = pd.DataFrame({"prediction": trained.scorer.predict(input_example["user_id"], input_example["item_id"])})
        version = log_model_version(config.registered_model, trained.checkpoint_dir, str(PYFUNC_MODEL),
                                    input_example, output_example, PIP_REQUIREMENTS,
                                    code_paths=[str(PYFUNC_MODEL.parent)])
    summary = window.summary() | {"global_step": trained.global_step, "resumed_from": trained.resumed_from}
    description = describe_version(summary, metrics["challenger"], metrics["champion"], champion_version, decision)
    apply_decision(config.registered_model, version, decision, description)
    return Registered(version=version, run_id=run.info.run_id, decision=decision, description=description)


def log_report(run_id: str, report: str) -> None:
    """The nightly markdown report, beside the run it describes."""
    MlflowClient().log_text(run_id, report, "report.md")
