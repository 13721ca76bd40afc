"""Does fine-tuning the language model pay? The weekly continual protocol of
benchmarks/quality.py (same data, same defaults, same evaluation) with the encoder's top
`model.trainable_layers` 0, 1 and 2 fine-tuned, and 1 layer through LoRA adapters: quality
and time side by side (issue 12).

    .venv/bin/python benchmarks/finetune_quality.py --steps 4     # first 4 weekly steps
    .venv/bin/python benchmarks/finetune_quality.py               # all 27 steps (GPU advised)
    .venv/bin/python benchmarks/finetune_quality.py --settings tl0,tl1 --steps 1 --no-write  # quick look

Writes the section "## Fine-tuning the encoder: quality and time" of docs/benchmarks.md
(and docs/img/finetune_quality.json) unless --no-write.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402

from llmrec.data import load_movielens  # noqa: E402
from llmrec.encoder import TextCache, load_encoder  # noqa: E402
from llmrec.schema import render_text  # noqa: E402

SECTION = "## Fine-tuning the encoder: quality and time"
SETTINGS = {
    "tl0": ["model.trainable_layers=0"],
    "tl1": ["model.trainable_layers=1"],
    "tl2": ["model.trainable_layers=2"],
    "lora1": ["model.trainable_layers=1", "model.lora_rank=8"],
}
SHOWN = ("rmse", "mae", "recall_at_10", "ndcg_at_10", "map_at_10", "roc_auc")


def run(args) -> dict:
    events, items, users = load_movielens(args.data)
    events = quality.weekly(events)
    user_texts = render_text(users, "user_id").to_dict()
    item_texts = render_text(items, "item_id").to_dict()
    out = {}
    for name in args.settings.split(","):
        config = quality.nightly_config(args.set + SETTINGS[name], None)
        encoder = load_encoder(config.model.encoder)
        torch.manual_seed(config.training.seed)
        cache = TextCache.for_model(args.cache, encoder, config.model)
        start = time.perf_counter()
        cache.features(list(user_texts.values()) + list(item_texts.values()))
        encode_s = time.perf_counter() - start
        torch.set_num_threads(args.threads)
        start = time.perf_counter()
        cont = quality.continual(events, config, cache, user_texts, item_texts, args.steps, ("replay",), ())
        wall = time.perf_counter() - start
        means = quality.mean_over_steps(cont["per_step"])[quality.REPLAY]
        cold = cont["cold"][quality.REPLAY]
        out[name] = {"set": SETTINGS[name], "steps": len(cont["steps"]), "means": means,
                     "cold_user_recall_at_10": cold.get("user_recall_at_10"),
                     "cold_user_ndcg_at_10": cold.get("user_ndcg_at_10"),
                     "train_s": cont["train_seconds"][quality.REPLAY], "protocol_s": wall, "encode_s": encode_s,
                     "mf": quality.mean_over_steps(cont["per_step"])[quality.MF],
                     "popularity": quality.mean_over_steps(cont["per_step"])[quality.POP]}
        logging.getLogger("finetune").info("%s: %s", name, json.dumps(
            {k: round(v, 4) for k, v in means.items() if k in SHOWN} | {"train_s": round(out[name]["train_s"], 1)}))
    return out


def markdown(result: dict, meta: dict) -> str:
    lines = [SECTION, "",
             f"Measured {meta['date']} with `{meta['command']}` on {meta['machine']} ({meta['minutes']:.1f} min). "
             f"The weekly continual protocol of the quality benchmark (llmrec with replay, the committed defaults "
             f"plus the setting shown), over its first {meta['steps']} weekly step(s), mean over those steps. "
             "\"train s\" is the time inside `fit` summed over the steps; \"protocol s\" adds scoring the catalog "
             "and evaluating every step (the top layers run there too).", "",
             "| setting | RMSE | MAE | recall@10 | NDCG@10 | MAP@10 | ROC-AUC | cold-user recall@10 | cold-user NDCG@10 "
             "| train s | protocol s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result.items():
        m = r["means"]
        lines.append(f"| {' '.join(r['set'])} | " + " | ".join(quality.fmt(m[k]) for k in SHOWN) +
                     f" | {quality.fmt(r['cold_user_recall_at_10'])} | {quality.fmt(r['cold_user_ndcg_at_10'])} | "
                     f"{r['train_s']:.0f} | {r['protocol_s']:.0f} |")
    first = next(iter(result.values()))
    lines += ["", f"Same steps, for reference: biased MF RMSE {quality.fmt(first['mf']['rmse'])}, popularity recall@10 "
              f"{quality.fmt(first['popularity']['recall_at_10'])}, NDCG@10 {quality.fmt(first['popularity']['ndcg_at_10'])}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=quality.default_data())
    parser.add_argument("--steps", type=int, help="first N weekly steps only (default: all)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {','.join(SETTINGS)}")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="extra NightlyConfig override")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--docs", type=Path, default=ROOT / "docs/benchmarks.md")
    parser.add_argument("--img", type=Path, default=ROOT / "docs/img")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--json", type=Path, help="also write this run's results here")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="run nothing: write the section from --json files of separate runs (one per setting)")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) /
                        "llmrec/quality")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("llmrec", "httpx", "transformers"):  # "quality" logs each step: progress
        logging.getLogger(noisy).setLevel(logging.WARNING)
    started = time.perf_counter()
    if args.merge:
        parts = [json.loads(path.read_text()) for path in args.merge]
        result = {k: v for part in parts for k, v in part["result"].items()}
        meta = parts[0]["meta"] | {"minutes": max(p["meta"]["minutes"] for p in parts),
                                   "command": " ; ".join(p["meta"]["command"] for p in parts) + " (run side by side)"}
        return finish(args, result, meta)
    result = run(args)
    steps = next(iter(result.values()))["steps"]
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "steps": steps,
            "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {args.threads} thread(s)",
            "minutes": (time.perf_counter() - started) / 60,
            "command": "python benchmarks/finetune_quality.py" + "".join(
                f" {a}" for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--no-write")
                and not a.startswith("--json") and not a.endswith(".json"))}
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "result": result}, indent=1, default=float))
    return finish(args, result, meta)


def finish(args, result: dict, meta: dict) -> dict:
    section = markdown(result, meta)
    print(section)
    if not args.no_write:
        args.img.mkdir(parents=True, exist_ok=True)
        (args.img / "finetune_quality.json").write_text(json.dumps({"meta": meta, "result": result}, indent=1, default=float))
        quality.write_section(args.docs, section)
    return result


if __name__ == "__main__":
    main()
