"""Any two registered versions scored on the same rows (`llmrec versions --compare A B`):
the later version's night as its gate saw it, i.e. its held-out rows (cut again from the
curated history by the window's own rule, between the ingest sequence its new rows started
after and its own watermark) and the anchor set, through `evaluate.evaluate_models` and the
gate's paired checks. The earlier version plays the champion."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient

from llmrec import model as llmrec_model
from llmrec import registry
from llmrec.config import Home, ModelConfig, NightlyConfig
from llmrec.encoder import TextCache, load_encoder
from llmrec.errors import LlmrecError
from llmrec.evaluate import evaluate_models
from llmrec.gate import check_rows, decide
from llmrec.history import History
from llmrec.ingest import read_catalog_texts
from llmrec.report import render_table
from llmrec.window import Window, cut


def _watermark(info: registry.ModelVersionInfo) -> int:
    return int(info.tags.get(registry.WATERMARK_TAG, 0))


def night_window(home: Home, name: str, info: registry.ModelVersionInfo, config: NightlyConfig) -> Window:
    """The held-out and anchor rows version `info` was gated on: its night's new rows are
    the curated events after its `new_rows_since` tag (for versions registered before the
    tag: the watermark of the version it resumed from, run tag `resumed_from`) up to its own
    watermark; the anchor set is the home's."""
    if registry.SINCE_TAG in info.tags:
        since = int(info.tags[registry.SINCE_TAG])
    else:
        resumed = MlflowClient().get_run(info.run_id).data.tags.get("resumed_from", "pretrained")
        since = 0 if resumed == "pretrained" else _watermark(registry.get_version(name, resumed))
    if not home.anchor.exists():
        raise LlmrecError(f"{home.anchor} is missing: no anchor set to compare the versions on")
    anchor = pd.read_parquet(home.anchor)
    new = History.open(home).new_rows(since)
    new = new[new["_ingest_seq"] <= _watermark(info)]
    if new.empty:
        raise LlmrecError(f"v{info.version}: no curated events between ingest sequences {since} and "
                          f"{_watermark(info)} in {home.events}; its night's rows are gone")
    # Only the held-out and anchor parts are scored: no replay sample is drawn.
    training = config.training.model_copy(update={"replay_fraction": 0.0})
    return cut(new, lambda count, seed: new.iloc[0:0], since, _watermark(info), anchor, training, config.evaluation)


def paired_comparison(home: Home, name: str, a: str, b: str, config: NightlyConfig) -> str:
    """Text: both versions scored on the later one's held-out and anchor rows, the gate's
    checks (later minus earlier, paired intervals) and the metrics per segment."""
    infos = sorted((registry.get_version(name, a), registry.get_version(name, b)),
                   key=lambda i: (_watermark(i), int(i.version)))
    earlier, later = infos
    window = night_window(home, name, later, config)
    with tempfile.TemporaryDirectory() as scratch:
        folders = [registry.download_checkpoint(info, Path(scratch) / f"v{info.version}") for info in infos]
        model_config = ModelConfig(**llmrec_model.read_state(folders[1])["model_config"])
        encoder = load_encoder(model_config.encoder)
        champion, challenger = (llmrec_model.load(folder, encoder) for folder in folders)
    cache = TextCache.for_model(home.cache, encoder, model_config)
    metrics = evaluate_models(window, History.open(home), challenger, champion, cache, read_catalog_texts(home),
                              config)
    decision = decide(metrics["challenger"], metrics["champion"], metrics["global_mean"], config.gate,
                      metrics["samples"])
    # The gate's words (challenger, champion) as the two versions.
    checks = [{(f"v{later.version}" if k == "challenger" else k): v for k, v in row.items()}
              | {"reference": row["reference"].replace("champion", f"v{earlier.version}")}
              for row in check_rows(decision)]
    segments = [{k.replace("challenger", f"v{later.version}").replace("champion", f"v{earlier.version}"): v
                 for k, v in row.items()} for row in metrics["segments"]]
    return "\n".join([
        f"v{later.version} vs v{earlier.version}, both scored on v{later.version}'s night: {len(window.held_out)} "
        f"held-out rows (ingest sequences up to {window.watermark}) and {len(window.anchor)} anchor rows "
        f"(gate.rule={config.gate.rule}; difference = v{later.version} - v{earlier.version})", "",
        render_table(checks, style="text") if checks else "(no checks)", "",
        "per segment:", "", render_table(segments, style="text")])
