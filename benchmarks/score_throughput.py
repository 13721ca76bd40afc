"""Scoring throughput: full-catalog top-10 for every MovieLens user with
`llmrec.scoring.Scorer.top_k`, the path `llmrec.evaluate.evaluate` ranks with (issue 3,
item 5).

    .venv/bin/python benchmarks/score_throughput.py            # all 943 users x 1,682 items
    .venv/bin/python benchmarks/score_throughput.py --quick
    .venv/bin/python benchmarks/score_throughput.py --device cuda --quick

A checkpoint (trainable_layers=0, the flow's default) is trained for one epoch so the
vectors are real; the user and item vectors are computed once (`Scorer.from_checkpoint`, reusing
the cached frozen-encoder outputs), then each top_k call scores every (user, item) pair
with one matrix product per chunk of users, masks the pairs the user rated in training
and keeps the best 10. scores/s = users x items / seconds of one top_k call (median of
--repeats). Encoder loading, text encoding and training are not timed.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


from llmrec.config import ModelConfig, TrainingConfig  # noqa: E402
from llmrec.encoder import TextCache  # noqa: E402
from llmrec.evaluate import evaluate  # noqa: E402
from llmrec.model import new_checkpoint  # noqa: E402
from llmrec.schema import CatalogTexts  # noqa: E402
from llmrec.scoring import Scorer  # noqa: E402
from llmrec.train import fit  # noqa: E402

TARGET = 1_000_000


def median_seconds(function, repeats: int, device: str) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        common.sync(device)
        start = time.perf_counter()
        function()
        common.sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def to_device(scorer: Scorer, device: str) -> Scorer:
    for name in ("user_vectors", "user_bias", "item_vectors", "item_bias", "item_rank_bias"):
        setattr(scorer, name, getattr(scorer, name).to(device))
    return scorer


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, help="timed top_k calls (median reported)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    common.quiet_logs()
    device = common.check_device(args.device)
    repeats = args.repeats or (3 if args.quick else 7)
    info = common.print_machine(device)

    data = common.load_data(args.data, args.rows)
    events = data.events
    cut = int(len(events) * 0.9)
    train_rows, held_out = events.iloc[:cut], events.iloc[cut:]
    fit_rows = train_rows.iloc[-20000:] if args.quick else train_rows

    encoder = common.load_encoder(args.encoder)
    model_config = ModelConfig()
    checkpoint = new_checkpoint(encoder, model_config, args.seed)
    cache = TextCache.for_model(args.cache, encoder, model_config)
    texts = CatalogTexts(data.user_texts, data.item_texts)
    fit(checkpoint, cache, fit_rows, texts,
        TrainingConfig(epochs=1, seed=args.seed, device=device))

    cache.features(list(texts.users.values()) + list(texts.items.values()))  # encoded here, not timed below
    start = time.perf_counter()
    scorer = Scorer.from_checkpoint(checkpoint, cache, texts)
    user_ids, item_ids = scorer.user_ids, scorer.item_ids
    vectors_seconds = time.perf_counter() - start
    exclude = train_rows[["user_id", "item_id"]]
    pairs = len(user_ids) * len(item_ids)

    where = "cpu"
    if device == "cuda":
        try:
            to_device(scorer, "cuda").top_k(user_ids[:2], args.k)
            where = "cuda"
        except (TypeError, RuntimeError) as error:
            # Scorer.top_k converts with .numpy(); it needs its vectors on the CPU.
            print(f"note: Scorer.top_k did not run with CUDA tensors ({type(error).__name__}: {error}); "
                  "timing it on the CPU, as the flow runs it")
            to_device(scorer, "cpu")

    rows = []
    for label, excluded in (("top-10, training pairs excluded", exclude), ("top-10, nothing excluded", None)):
        seconds = median_seconds(lambda: scorer.top_k(user_ids, args.k, exclude=excluded), repeats, where)
        rows.append({"call": f"Scorer.top_k ({label})", "device": where, "users": len(user_ids),
                     "items": len(item_ids), "seconds": seconds, "scores/s": pairs / seconds})
    ranked_users = held_out.loc[held_out["rating"] >= 4.0, "user_id"].nunique()
    seconds = median_seconds(lambda: evaluate(scorer, held_out, exclude, args.k, 4.0), max(1, repeats // 2), where)
    rows.append({"call": f"evaluate (RMSE + recall/NDCG@{args.k}, {len(held_out):,} held-out rows)", "device": where,
                 "users": ranked_users, "items": len(item_ids), "seconds": seconds,
                 "scores/s": ranked_users * len(item_ids) / seconds})
    print(f"\nFull-catalog top-{args.k}: {len(user_ids)} users x {len(item_ids)} items = {pairs:,} scores per call; "
          f"user+item vectors built once in {vectors_seconds:.3f} s (cached encoder outputs)")
    print(common.markdown_table(rows), flush=True)
    met = rows[0]["scores/s"] >= TARGET
    print(f"\ntarget >= {TARGET:,} scores/s (with exclusion): {'met' if met else 'NOT met'} "
          f"({rows[0]['scores/s']:,.0f})")
    result = {"machine": info, "device": device, "scored_on": where, "vectors_seconds": vectors_seconds,
              "rows": rows, "target_met": met, "command": " ".join(sys.argv)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
