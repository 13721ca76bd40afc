"""Which per-night statistics tell injected bad nights from ordinary MovieLens weeks?

    .venv/bin/python benchmarks/night_statistics.py      # about 3 minutes (see docs/benchmarks.md)

MovieLens-100k as weekly nights (as benchmarks/gate_replay.py); every night's challenger is
promoted, so each night is judged by the model trained up to the night before. For every
night, clean and with each injection of gate_replay (`inject`), it prints:

- concept drift, the champion on tonight's rows of users and items it already knows:
  `mse ratio` (its MSE there / its MSE on its own held-out rows) and `spearman` (rank
  correlation of its prediction with the rating);
- `rating` drift: the Jensen-Shannon score of `monitor.night_drift` (what the drift hold uses);
- `top mode share`: among users with >= `monitor.rater_min_ratings` ratings tonight, the
  largest share of one rating value (`monitor.one_value_raters` flags > rater_max_share);
- `consistency`: the rating consistency of `monitor.night_drift` (per user, tonight's
  ratings against the items' mean rating in the history), and `consistency ratio`: it over
  the median of the earlier clean nights' (what `monitor.consistency_ratio` holds below).

and, per statistic, the range over ordinary weeks against the range over each injection.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from scipy import stats  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gate_replay import Replay, inject  # noqa: E402
from quality import weekly  # noqa: E402

from llmrec.config import NightlyConfig  # noqa: E402
from llmrec.data import load_movielens  # noqa: E402
from llmrec.encoder import TextCache, load_encoder  # noqa: E402
from llmrec.model import Champion  # noqa: E402
from llmrec.monitor import consistency_baseline, night_drift  # noqa: E402
from llmrec.report import render_table  # noqa: E402
from llmrec.schema import CatalogTexts, render_text  # noqa: E402
from llmrec.scoring import Scorer  # noqa: E402

KINDS = ("clean", "inverted", "shuffled", "bot user")


def fit(scorer: Scorer, rows: pd.DataFrame) -> tuple[float, float]:
    """(MSE, Spearman correlation) of the scorer's predictions against the rows' ratings."""
    prediction = np.asarray(scorer.predict(rows["user_id"].tolist(), rows["item_id"].tolist()), dtype=np.float64)
    truth = rows["rating"].to_numpy(np.float64)
    return float(np.mean((prediction - truth) ** 2)), float(stats.spearmanr(prediction, truth).statistic)


def top_mode_share(new: pd.DataFrame, min_ratings: int) -> float:
    counts = new.groupby("user_id").size()
    heavy = new[new["user_id"].isin(counts.index[counts >= min_ratings])]
    shares = heavy.groupby("user_id")["rating"].agg(lambda r: r.value_counts(normalize=True).iloc[0])
    return float(shares.max()) if len(shares) else float("nan")


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    config = NightlyConfig()
    data = Path(os.environ.get("ML100K_DIR") or ROOT.parent / "shared/data/movielens-100k")
    events, items, users = load_movielens(data)
    events = weekly(events)
    texts = CatalogTexts(render_text(users, "user_id").to_dict(), render_text(items, "item_id").to_dict())
    torch.manual_seed(config.training.seed)
    cache = TextCache.for_model(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmrec/quality",
                                load_encoder(config.model.encoder), config.model)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="night-statistics-") as workdir:
        replay = Replay(events, texts, cache, config, Path(workdir))
        champion, anchor, own, earlier = Champion(), None, None, []
        for night in range(1, int(events["_ingest_seq"].max()) + 1):
            if champion.version is not None:
                scorer = Scorer.from_checkpoint(champion.checkpoint, cache, texts)
                baseline = consistency_baseline(earlier, config.monitor)
                for kind in KINDS:
                    night_events = events if kind == "clean" else inject(kind, events, night, replay.items, night)
                    old, new = (night_events[night_events["_ingest_seq"] < night],
                                night_events[night_events["_ingest_seq"] == night])
                    known = new[new["user_id"].isin(old["user_id"]) & new["item_id"].isin(old["item_id"])]
                    mse, rho = fit(scorer, known)
                    drift = night_drift(replay.history(night_events[night_events["_ingest_seq"] <= night]), night - 1,
                                        texts, config.monitor)
                    rows.append({"night": night, "kind": kind, "known rows": len(known), "mse ratio": mse / own,
                                 "spearman": rho, "rating": drift.scores["rating"],
                                 "top mode share": top_mode_share(new, config.monitor.rater_min_ratings),
                                 "consistency": drift.consistency, "consistency users": drift.consistency_users,
                                 "consistency ratio": drift.consistency / baseline if baseline else float("nan")})
                    if kind == "clean" and drift.consistency is not None:
                        earlier.append(drift.consistency)
            window, _, trained = replay.challenger(champion, events, night, champion.ingest_watermark, anchor, config)
            anchor = window.anchor
            champion = Champion(version=str(night), checkpoint=trained.checkpoint)
            own = fit(Scorer.from_checkpoint(trained.checkpoint, cache, texts, window.held_out), window.held_out)[0]
    frame = pd.DataFrame(rows)
    print(render_table(frame.to_dict("records"), style="text"))
    ranges = []
    for statistic in ("mse ratio", "spearman", "rating", "top mode share", "consistency", "consistency ratio"):
        values = frame.pivot(index="night", columns="kind", values=statistic)
        ranges.append({"statistic": statistic} | {kind: f"{values[kind].min():.3f} .. {values[kind].max():.3f}"
                                                  for kind in KINDS})
    print()
    print(render_table(ranges, style="text"))


if __name__ == "__main__":
    main()
