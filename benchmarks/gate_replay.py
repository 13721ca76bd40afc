"""Gate replay on MovieLens-100k: does the promotion gate tell improvement from noise?

    .venv/bin/python benchmarks/gate_replay.py            # every weekly night (see docs/benchmarks.md)
    .venv/bin/python benchmarks/gate_replay.py --quick    # the first 6 nights, 2 injected bad nights
    .venv/bin/python benchmarks/gate_replay.py --rules bootstrap --seeds 0,1,2,3,4   # ~6 min: spread over seeds

MovieLens-100k is replayed as weekly nights (the first four weeks bootstrap the first model)
through the flow's own stages: `window.split` (the rows no gate has judged yet, as in the
flow), `train.fine_tune` from the served champion, `evaluate.evaluate_models` (challenger
and champion on the same held-out and anchor rows, and the anchor's users scored as new
users), `monitor.night_drift` and
`gate.decide` + `gate.hold_for_drift`. Each rule (`point`, the
earlier rule, and `bootstrap`) runs its own chain: its served champion is what it promoted.

Truth, which the gate never sees: challenger and champion are both scored on the following
4 weeks of ratings (neither trained on them), and the RMSE difference gets its own paired
bootstrap interval (rows resampled, 95%, 2000 resamples). "Truly better" = the whole
interval below 0, "truly worse" = the whole interval above 0, otherwise a tie (the future
rows cannot tell them apart). Nights with fewer than 4 following weeks are not judged. The
recall@10 difference over the same weeks (users resampled) is printed beside it, not
counted: what the gate's ranking checks stand for.

Injected bad nights (gated against the same champion, never served): the night's new
ratings inverted (6 - r); 30% of them shuffled between rows; one new user with 500
five-star ratings of random items; a challenger trained at 100x the learning rate. Their
truth is printed too (on the clean following weeks), but not counted in the summary.

Printed per rule: promotion rate, false rejections (truly better, rejected; share of truly
better nights), false promotions (truly worse, promoted; share of judged nights), injected
bad nights promoted, and weeks lagged (nights the served champion was older than a truly
better challenger that had been rejected, until the next promotion). Each decision changes
the champion every later night starts from, so a replay is one trajectory: `--seeds`
replays several training seeds and adds a row per rule pooling their nights.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (offline model hub, the repository on sys.path)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from quality import weekly  # noqa: E402

from llmrec.config import NightlyConfig, parse_sets  # noqa: E402
from llmrec.data import load_movielens  # noqa: E402
from llmrec.encoder import TextCache, load_encoder  # noqa: E402
from llmrec.evaluate import evaluate_models, evaluate_sample  # noqa: E402
from llmrec.gate import decide, hold_for_drift, paired_interval, paired_values  # noqa: E402
from llmrec.history import History, footer  # noqa: E402
from llmrec.model import Champion  # noqa: E402
from llmrec.monitor import consistency_baseline, drift_hold, night_drift  # noqa: E402
from llmrec.report import render_table  # noqa: E402
from llmrec.schema import CatalogTexts, render_text  # noqa: E402
from llmrec.scoring import Scorer  # noqa: E402
from llmrec.train import fine_tune  # noqa: E402
from llmrec.window import split  # noqa: E402

log = logging.getLogger("gate_replay")
FUTURE_WEEKS = 4
INJECTIONS = ("inverted", "shuffled", "bot user", "lr x100")


def inject(kind: str, events: pd.DataFrame, night: int, items: list[str], seed: int) -> pd.DataFrame:
    """`events` with night `night`'s new rows corrupted the `kind` way (lr x100 corrupts none)."""
    rng = np.random.default_rng(seed)
    events = events.copy()
    new = np.flatnonzero(events["_ingest_seq"].to_numpy() == night)
    rating = events.columns.get_loc("rating")
    if kind == "inverted":
        events.iloc[new, rating] = 6.0 - events.iloc[new, rating].to_numpy()
    elif kind == "shuffled":
        picked = rng.choice(new, int(0.3 * len(new)), replace=False)
        events.iloc[picked, rating] = rng.permutation(events.iloc[picked, rating].to_numpy())
    elif kind == "bot user":
        times = events.iloc[new]["timestamp"]
        stamps = pd.to_datetime(rng.integers(times.min().value, times.max().value, 500), utc=True)
        bot = pd.DataFrame({"user_id": "injected-bot", "item_id": rng.choice(items, 500, replace=False),
                            "rating": 5.0, "timestamp": stamps.astype(events["timestamp"].dtype), "_ingest_seq": night})
        events = pd.concat([events, bot], ignore_index=True).sort_values("timestamp", kind="stable")
    return events.reset_index(drop=True)


class Replay:
    def __init__(self, events, texts: CatalogTexts, cache: TextCache, config: NightlyConfig, workdir: Path):
        self.events, self.texts, self.cache, self.config, self.workdir = events, texts, cache, config, workdir
        self.items = sorted(texts.items)

    def challenger(self, champion: Champion, events: pd.DataFrame, night: int, since: int, anchor,
                   config: NightlyConfig):
        """Tonight's challenger, fine-tuned from `champion` on the rows after `since` (as the
        flow: rows no gate has judged yet) plus the replay."""
        upto = events[events["_ingest_seq"] <= night]
        window = split(upto, since, anchor, config.training, config.evaluation)
        trained = fine_tune(champion, self.cache, self.texts, window, config.model, config.training,
                            self.workdir / f"n{night}-{time.perf_counter_ns()}", "replay")
        return window, upto, trained

    def history(self, upto: pd.DataFrame) -> History:
        """The replayed events as the curated History the nightly flow reads."""
        path = self.workdir / f"history-{time.perf_counter_ns()}.parquet"
        upto.to_parquet(path, index=False)
        return History([footer(str(path))])

    def gate(self, window, upto, trained, champion: Champion, config: NightlyConfig, earlier: list[float]):
        """The flow's evaluation, gate and drift hold (drift of the window's new rows; the
        rating consistency held against the `earlier` nights', as the flow does with its
        trend). Returns the decision and the drift record."""
        history = self.history(upto)
        metrics = evaluate_models(window, history, trained.checkpoint, champion.checkpoint,
                                  self.cache, self.texts, config)
        decision = decide(metrics["challenger"], metrics["champion"], metrics["global_mean"], config.gate,
                          metrics["samples"])
        drift = night_drift(history, window.since, self.texts, config.monitor,
                            consistency_baseline(earlier, config.monitor)) if champion.version else None
        return hold_for_drift(decision, drift_hold(drift, config.monitor)), drift

    def truth(self, challenger, champion: Champion, night: int) -> tuple[str | None, str, str]:
        """better / worse / tie on the following weeks' RMSE (None without enough weeks), and
        the differences challenger - champion with their intervals, as text: RMSE (the truth)
        and recall@K (printed beside it, users resampled: what the gate's ranking checks
        stand for)."""
        last = int(self.events["_ingest_seq"].max())
        if night + FUTURE_WEEKS > last:
            return None, "", ""
        future = self.events[(self.events["_ingest_seq"] > night) & (self.events["_ingest_seq"] <= night + FUTURE_WEEKS)]
        seen = self.events[self.events["_ingest_seq"] <= night][["user_id", "item_id"]]
        samples = []
        for checkpoint in (challenger, champion.checkpoint):
            scorer = Scorer.from_checkpoint(checkpoint, self.cache, self.texts, future)
            samples.append(evaluate_sample(scorer, future, seen, self.config.evaluation.k,
                                           self.config.evaluation.relevant_rating)[1])
        difference, low, high = paired_interval("rmse", *paired_values("rmse", *samples), 2000, 0.95, seed=night)
        recall = f"recall_at_{self.config.evaluation.k}"
        r_difference, r_low, r_high = paired_interval(recall, *paired_values(recall, *samples), 2000, 0.95, seed=night)
        return ("better" if high < 0 else "worse" if low > 0 else "tie", f"{difference:+.4f} [{low:+.4f}, {high:+.4f}]",
                f"{r_difference:+.4f} [{r_low:+.4f}, {r_high:+.4f}]")

    def run(self, rule: str, nights: list[int], injected_at: dict[int, str]) -> list[dict]:
        config = self.config.model_copy(update={"gate": self.config.gate.model_copy(update={"rule": rule})})
        champion, anchor, rows, decided = Champion(), None, [], 0
        consistency = []  # the clean nights' rating consistency: the flow's trend
        for night in [1] + nights:
            since = max(champion.ingest_watermark, decided)
            window, upto, trained = self.challenger(champion, self.events, night, since, anchor, config)
            anchor = window.anchor
            if champion.version is None:  # the bootstrap model serves from night 1
                champion = Champion(version="1", checkpoint=trained.checkpoint)
                continue
            decision, drift = self.gate(window, upto, trained, champion, config, consistency)
            truth, future, future_recall = self.truth(trained.checkpoint, champion, night)
            rows.append({"night": night, "rule": rule, "kind": "clean", "promoted": decision.promote, "truth": truth,
                         "future rmse difference": future, "future recall difference": future_recall,
                         "reason": decision.reason[:160]})
            if night in injected_at:
                kind = injected_at[night]
                bad_config = config
                if kind == "lr x100":
                    bad_config = config.model_copy(update={"training": config.training.model_copy(
                        update={"lr": config.training.lr * 100})})
                bad_events = inject(kind, self.events, night, self.items, seed=night)
                w, u, t = self.challenger(champion, bad_events, night, since, anchor, bad_config)
                bad_decision, _ = self.gate(w, u, t, champion, bad_config, consistency)
                # Its truth is printed, not summarized: whether promoting it would have hurt.
                bad_truth, bad_future, bad_recall = self.truth(t.checkpoint, champion, night)
                rows.append({"night": night, "rule": rule, "kind": kind, "promoted": bad_decision.promote,
                             "truth": bad_truth, "future rmse difference": bad_future,
                             "future recall difference": bad_recall, "reason": bad_decision.reason[:160]})
            log.info("%s night %d: %s (truth %s)", rule, night, "promoted" if decision.promote else "rejected", truth)
            decided = window.watermark
            if drift is not None and drift.consistency is not None:
                consistency.append(drift.consistency)
            if decision.promote:
                champion = Champion(version=str(night), checkpoint=trained.checkpoint)
        return rows


def summary(rows: list[dict]) -> dict:
    clean = [r for r in rows if r["kind"] == "clean"]
    judged = [r for r in clean if r["truth"] is not None]
    better = [r for r in judged if r["truth"] == "better"]
    false_rejections = [r for r in better if not r["promoted"]]
    false_promotions = [r for r in judged if r["truth"] == "worse" and r["promoted"]]
    injected = [r for r in rows if r["kind"] != "clean"]
    lag, lagging = 0, False
    for r in clean:
        lagging = (lagging or (r["truth"] == "better" and not r["promoted"])) and not r["promoted"]
        lag += lagging
    return {
        "rule": clean[0]["rule"] if clean else "",
        "nights": len(clean),
        "promotion rate": f"{sum(r['promoted'] for r in clean)}/{len(clean)}",
        "judged (better/tie/worse)": f"{len(better)}/{sum(r['truth'] == 'tie' for r in judged)}/"
                                     f"{sum(r['truth'] == 'worse' for r in judged)}",
        "false rejections": f"{len(false_rejections)}/{len(better)}"
                            + (f" ({len(false_rejections) / len(better):.0%})" if better else ""),
        "false promotions": f"{len(false_promotions)}/{len(judged)}"
                            + (f" ({len(false_promotions) / len(judged):.0%})" if judged else ""),
        "injected promoted": f"{sum(r['promoted'] for r in injected)}/{len(injected)}",
        "weeks lagged": lag,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the first 6 nights, 2 injected bad nights")
    parser.add_argument("--nights", type=int, help="replay only this many weekly nights after the bootstrap")
    parser.add_argument("--rules", default="point,bootstrap", help="gate rules to replay, comma-separated")
    parser.add_argument("--data", type=Path, default=common.default_data())
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a NightlyConfig field (repeatable)")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) /
                        "llmrec/quality", help="encoder-output cache folder (outside the repo)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", help="replay each of these training seeds (comma-separated; default: "
                        "training.seed) and add a row per rule pooling them: one trajectory is one draw")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("llmrec", "httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    started = time.perf_counter()
    config = NightlyConfig(**parse_sets(args.set))
    events, items, users = load_movielens(args.data)
    events = weekly(events)
    texts = CatalogTexts(render_text(users, "user_id").to_dict(), render_text(items, "item_id").to_dict())
    torch.manual_seed(config.training.seed)
    cache = TextCache.for_model(args.cache, load_encoder(config.model.encoder), config.model)
    cache.features(list(texts.users.values()) + list(texts.items.values()))
    torch.set_num_threads(args.threads)
    last = int(events["_ingest_seq"].max())
    count = 6 if args.quick and args.nights is None else (args.nights or last - 1)
    nights = list(range(2, min(last, count + 1) + 1))
    every = max(1, len(nights) // (2 if args.quick else 2 * len(INJECTIONS)))
    kinds = INJECTIONS[:2] if args.quick else INJECTIONS
    injected_at = {night: kinds[i % len(kinds)] for i, night in enumerate(nights[1::every][: 2 if args.quick else 2 * len(kinds)])}
    seeds = [int(seed) for seed in args.seeds.split(",")] if args.seeds else [config.training.seed]
    all_rows, table = [], []
    with tempfile.TemporaryDirectory(prefix="gate-replay-") as workdir:
        for seed in seeds:
            torch.manual_seed(seed)
            seeded = config.model_copy(update={"training": config.training.model_copy(update={"seed": seed})})
            replay = Replay(events, texts, cache, seeded, Path(workdir))
            for rule in args.rules.split(","):
                rows = [row | {"seed": seed} for row in replay.run(rule, nights, injected_at)]
                all_rows += rows
                row = summary(rows)
                table.append({"rule": row["rule"], "seed": seed} | row if len(seeds) > 1 else row)
    if len(seeds) > 1:
        for rule in args.rules.split(","):
            # Lag runs along one trajectory: summed over the seeds, not counted across their joins.
            lagged = sum(row["weeks lagged"] for row in table if row["rule"] == rule)
            table.append({"rule": rule, "seed": "all"} | summary([row for row in all_rows if row["rule"] == rule])
                         | {"weeks lagged": lagged})
    print(render_table(all_rows, style="text"))
    print()
    print(render_table(table, style="text"))
    print(f"\n{len(nights)} nights, injected {injected_at}; {time.perf_counter() - started:.0f} s")
    return table


if __name__ == "__main__":
    main()
