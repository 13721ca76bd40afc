"""Training throughput: llmrec's training step against the naive per-rating transformer
loop, on MovieLens-100k, in one process (issue 3, items 1 and 2).

    .venv/bin/python benchmarks/train_throughput.py            # 1,024 naive ratings + full epochs (~38 min, 2-core CPU)
    .venv/bin/python benchmarks/train_throughput.py --quick    # 512 ratings, 20k-row "epochs" (~7 min)

(Estimates for a quiet machine: the timed parts took ~25 and ~4 min; the rest is the
untimed FLOP-counting replay of the naive chunks and of each epoch.)
    .venv/bin/python benchmarks/train_throughput.py --device cuda --quick

The naive loop (implemented here, as the method llmrec starts from does it): a torch
Dataset whose __getitem__ tokenizes one rating's (user text, item text) pair padded to
max_length=128; one full forward and backward pass of the whole encoder per rating (all
weights trainable, dropout on); the mean-pooled output goes through an MLP head to the
rating (its last layer starts at zero and its bias at the mean rating); MSE; AdamW. It
is the cheaper of the two textbook variants (one pass over the pair, not one pass per
user text and one per item text), so the ratio is conservative.

llmrec: `llmrec.train.fit` with `TrainingConfig(epochs=1, batch_size=<same>,
resume_shared_lr_scale=1)` (the chunks are one training run, not nights) and
`ModelConfig(trainable_layers=<0|1>, lora_rank=<0|8>)`, i.e. the training step exactly as the nightly flow
runs it, on the same rows in the same chunks. The two alternate chunk by chunk (naive,
llmrec tl=0, llmrec tl=1, llmrec tl=1 LoRA, naive, ...), so a noisy machine slows all
of them alike.

Both use the same batch size (ratings per optimizer step; the naive loop accumulates
gradients over micro-batches of --micro-batch ratings, which is the same step) and
the same learning rates (llmrec's defaults: 3e-3 heads, 2e-5 encoder); both start the
output bias at the mean rating of the first chunk.

Reported per variant (--layers):
- step r/s: ratings / seconds in llmrec's training loop (`TrainResult.seconds`), i.e.
  with the frozen-layer text cache warm, as in a nightly run after the first;
- fit r/s (cold cache): ratings / wall seconds of the `fit` calls on a fresh in-memory
  cache, so it includes encoding every text those ratings touch for the first time;
- RMSE of both on the same held-out rows after the same number of ratings;
- peak RSS of each (VmHWM reset before each chunk);
- a full epoch of llmrec on all training rows (fresh cache and checkpoint): its time,
  RMSE, and the FLOPs it ran (the cache encoding's and the training loop's) per second,
  as a fraction of a 4096^3 fp32 matmul timed in this run (on CUDA: as a fraction of the
  card's bf16 peak = MFU).

FLOPs are counted by torch (`torch.utils.flop_counter.FlopCounterMode`: every matmul and
attention op, forward and backward, from its shapes) in an untimed replay of the same
work: the counter intercepts every op in Python, and that cost must not be in the timings.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (sets HF offline env before transformers is imported)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from llmrec.config import ModelConfig, TrainingConfig, resolve_encoder  # noqa: E402
from llmrec.encoder import TextCache  # noqa: E402
from llmrec.model import new_checkpoint  # noqa: E402
from llmrec.evaluate import rating_metrics  # noqa: E402
from llmrec.schema import CatalogTexts  # noqa: E402
from llmrec.scoring import Scorer  # noqa: E402
from llmrec.train import fit  # noqa: E402

SIZES = {
    #          ratings  held_out  epoch_rows (None = every training row)
    "full": dict(ratings=1024, held_out=1000, epoch_rows=None),
    "quick": dict(ratings=512, held_out=200, epoch_rows=20000),
}


# ----------------------------------------------------------------------------- the naive loop


class PairDataset(torch.utils.data.Dataset):
    """One rating per item: tokenized on access, padded to max_length (the naive way)."""

    def __init__(self, rows: pd.DataFrame, user_texts: dict, item_texts: dict, tokenizer, max_length: int):
        self.users = rows["user_id"].tolist()
        self.items = rows["item_id"].tolist()
        self.ratings = rows["rating"].to_numpy(dtype=np.float32)
        self.user_texts, self.item_texts = user_texts, item_texts
        self.tokenizer, self.max_length = tokenizer, max_length

    def __len__(self) -> int:
        return len(self.ratings)

    def __getitem__(self, i: int) -> dict:
        encoded = self.tokenizer(self.user_texts.get(self.users[i], ""), self.item_texts.get(self.items[i], ""),
                                 padding="max_length", truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
        out = {k: v[0] for k, v in encoded.items()}
        out["rating"] = torch.tensor(self.ratings[i])
        return out


class NaiveModel(nn.Module):
    """The whole encoder, trainable, then mean pooling and an MLP head to the rating."""

    def __init__(self, encoder_path: str, mean_rating: float):
        super().__init__()
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(encoder_path)
        hidden = self.encoder.config.hidden_size
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))
        with torch.no_grad():  # start at the mean rating, like llmrec's mu
            self.head[-1].weight.zero_()
            self.head[-1].bias.fill_(mean_rating)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(pooled).squeeze(-1)


class Naive:
    def __init__(self, encoder_path: str, tokenizer, data: common.Data, mean_rating: float, config: TrainingConfig,
                 device: str, micro_batch: int, max_length: int):
        self.model = NaiveModel(encoder_path, mean_rating).to(device).train()
        self.tokenizer, self.data, self.device = tokenizer, data, device
        self.micro_batch, self.max_length, self.batch_size = micro_batch, max_length, config.batch_size
        self.optimizer = torch.optim.AdamW([
            {"params": self.model.encoder.parameters(), "lr": config.encoder_lr},
            {"params": self.model.head.parameters(), "lr": config.lr},
        ], weight_decay=config.weight_decay)

    def loader(self, rows: pd.DataFrame) -> torch.utils.data.DataLoader:
        dataset = PairDataset(rows, self.data.user_texts, self.data.item_texts, self.tokenizer, self.max_length)
        return torch.utils.data.DataLoader(dataset, batch_size=self.micro_batch, shuffle=False, num_workers=0)

    def train(self, rows: pd.DataFrame) -> None:
        """One optimizer step per `batch_size` ratings, accumulated over micro-batches."""
        self.model.train()
        for first in range(0, len(rows), self.batch_size):
            batch = rows.iloc[first : first + self.batch_size]
            self.optimizer.zero_grad(set_to_none=True)
            for micro in self.loader(batch):
                micro = {k: v.to(self.device) for k, v in micro.items()}
                prediction = self.model(micro["input_ids"], micro["attention_mask"], micro.get("token_type_ids"))
                loss = nn.functional.mse_loss(prediction, micro["rating"], reduction="sum") / len(batch)
                loss.backward()
            self.optimizer.step()

    @torch.no_grad()
    def predict(self, rows: pd.DataFrame) -> np.ndarray:
        self.model.eval()
        out = []
        for micro in self.loader(rows):
            micro = {k: v.to(self.device) for k, v in micro.items()}
            out.append(self.model(micro["input_ids"], micro["attention_mask"], micro.get("token_type_ids")).float().cpu())
        self.model.train()
        return torch.cat(out).numpy()


# ----------------------------------------------------------------------------- llmrec


class Llmrec:
    """llmrec's checkpoint + a fresh in-memory text cache; trains through `fit` only."""

    def __init__(self, encoder, model_config: ModelConfig, config: TrainingConfig, data: common.Data, seed: int):
        self.encoder, self.config, self.data, self.seed = encoder, config, data, seed
        self.model_config = model_config
        self.texts = CatalogTexts(data.user_texts, data.item_texts)
        self.checkpoint = new_checkpoint(encoder, self.model_config, seed)
        self.cache = TextCache.for_model(None, encoder, model_config)
        self.fit_seconds = 0.0
        self.step_seconds = 0.0
        self.ratings = 0

    def train(self, rows: pd.DataFrame) -> None:
        common.sync(self.config.device)
        start = time.perf_counter()
        result, _ = fit(self.checkpoint, self.cache, rows, self.texts, self.config)
        common.sync(self.config.device)
        self.fit_seconds += time.perf_counter() - start
        self.step_seconds += result.seconds
        self.ratings += result.ratings

    def count_flops(self, rows: pd.DataFrame) -> tuple[int, int]:
        """(cache encoding, training loop) FLOPs of this run's one `train(rows)`, counted by
        torch in an untimed replay: the texts of the vocabularies encoded into a fresh cache
        in the two calls `fit` makes (users, then items: the same batches), then `fit` from a
        fresh checkpoint on that cache, now warm (same seed: the same steps and negatives)."""
        cache = TextCache.for_model(None, self.encoder, self.model_config)
        with common.flop_counter() as encoding:
            cache.features([self.texts.users.get(u, "") for u in self.checkpoint.users.ids])
            cache.features([self.texts.items.get(i, "") for i in self.checkpoint.items.ids])
        with common.flop_counter() as training:
            fit(new_checkpoint(self.encoder, self.model_config, self.seed), cache, rows, self.texts, self.config)
        return encoding.get_total_flops(), training.get_total_flops()

    def predict(self, rows: pd.DataFrame) -> np.ndarray:
        texts = CatalogTexts({u: self.data.user_texts.get(u, "") for u in rows["user_id"]},
                             {i: self.data.item_texts.get(i, "") for i in rows["item_id"]})
        scorer = Scorer.from_checkpoint(self.checkpoint, self.cache, texts)
        return scorer.predict(rows["user_id"].tolist(), rows["item_id"].tolist())


# ----------------------------------------------------------------------------- run


def variants(spec: str) -> dict[str, ModelConfig]:
    """'0,1,1:lora8' -> {'0': tl=0, '1': tl=1, '1:lora8': tl=1 with LoRA rank 8}."""
    out = {}
    for token in (t.strip() for t in spec.split(",") if t.strip()):
        layers, _, lora = token.partition(":lora")
        try:
            out[token] = ModelConfig(trainable_layers=int(layers), lora_rank=int(lora or 0))
        except ValueError as error:
            raise SystemExit(f"--layers {token!r}: expected N or N:loraR ({error})") from None
    return out


def measured(function, device: str) -> tuple[float, int]:
    """(seconds, peak bytes) of one call: peak RSS on CPU, peak allocated on CUDA."""
    common.reset_peak_rss()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    common.sync(device)
    start = time.perf_counter()
    function()
    common.sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else common.peak_rss()
    return seconds, peak


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=TrainingConfig().batch_size,
                   help="ratings per optimizer step, for both (default: TrainingConfig's)")
    p.add_argument("--micro-batch", type=int, default=32, help="naive loop: ratings per forward/backward")
    p.add_argument("--max-length", type=int, default=128, help="naive loop: padded tokens per rating")
    p.add_argument("--ratings", type=int, help="ratings each one trains on in the alternating run")
    p.add_argument("--chunk", type=int, help="ratings per alternating chunk (default: the batch size)")
    p.add_argument("--held-out", type=int, help="held-out rows scored by both")
    p.add_argument("--layers", default="0,1,1:lora8",
                   help="llmrec variants, comma-separated: N = trainable_layers N (all their weights "
                   "fine-tuned), N:loraR = trainable_layers N with LoRA adapters of rank R")
    p.add_argument("--epoch-rows", type=int, help="training rows of llmrec's full epoch (default: all)")
    p.add_argument("--no-epoch", action="store_true", help="skip llmrec's full epoch")
    p.add_argument("--peak-n", type=int, default=4096, help="size of the square matmul that measures the CPU peak")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    common.quiet_logs()
    device = common.check_device(args.device)
    size = SIZES["quick" if args.quick else "full"]
    n_ratings = args.ratings or size["ratings"]
    n_held = args.held_out or size["held_out"]
    # At least two chunks each, so the methods really alternate.
    chunk = args.chunk or min(args.batch_size, max(1, n_ratings // 2))
    layers = variants(args.layers)
    info = common.print_machine(device)

    data = common.load_data(args.data, args.rows)
    shuffled = data.events.sample(frac=1.0, random_state=args.seed).reset_index(drop=True)
    held_out = shuffled.iloc[:n_held].reset_index(drop=True)
    train_rows = shuffled.iloc[n_held:].reset_index(drop=True)
    n_ratings = min(n_ratings, len(train_rows))
    epoch_rows = train_rows.iloc[: args.epoch_rows or size["epoch_rows"] or len(train_rows)]
    print(f"data: {len(data.events):,} ratings; {n_ratings} per method in chunks of {chunk}; "
          f"{len(held_out)} held-out rows; full epoch {len(epoch_rows):,} rows; batch size {args.batch_size}", flush=True)

    # Reference peak, measured now on this machine (CPU: fp32 like llmrec's CPU training).
    if device == "cuda":
        peak, peak_source = common.gpu_bf16_peak()
    else:
        peak, peak_source = (common.matmul_peak("cpu", torch.float32, n=args.peak_n),
                             f"measured fp32 matmul {args.peak_n}^3")
    print(f"peak: {common.fmt_flops(peak)}FLOP/s ({peak_source})", flush=True)

    encoder = common.load_encoder(args.encoder)  # loaded once, outside every timing
    # The chunks are pieces of one training run, not nights: no resume-rate scaling.
    config = TrainingConfig(epochs=1, batch_size=args.batch_size, seed=args.seed, device=device,
                            resume_shared_lr_scale=1.0)
    print("llmrec training config (defaults, but epochs=1, resume_shared_lr_scale=1): "
          + ", ".join(f"{k}={v}" for k, v in config.model_dump().items()), flush=True)
    mean_rating = float(train_rows["rating"].iloc[: min(chunk, n_ratings)].mean())
    torch.manual_seed(args.seed)

    def new_naive() -> Naive:
        return Naive(resolve_encoder(args.encoder), encoder.tokenizer, data, mean_rating, config, device,
                     args.micro_batch, args.max_length)

    naive = new_naive()
    runs = {tl: Llmrec(encoder, model_config, config, data, args.seed) for tl, model_config in layers.items()}

    # Alternate chunk by chunk over the same rows.
    chunks = [train_rows.iloc[first : min(first + chunk, n_ratings)] for first in range(0, n_ratings, chunk)]
    naive_seconds, peaks = 0.0, {"naive": 0, **{tl: 0 for tl in layers}}
    for number, rows in enumerate(chunks, 1):
        seconds, peak_bytes = measured(lambda: naive.train(rows), device)
        naive_seconds += seconds
        peaks["naive"] = max(peaks["naive"], peak_bytes)
        line = [f"chunk {number}: naive {len(rows) / seconds:.1f} r/s"]
        for tl, run in runs.items():
            step_before = run.step_seconds
            seconds, peak_bytes = measured(lambda: run.train(rows), device)
            peaks[tl] = max(peaks[tl], peak_bytes)
            line.append(f"llmrec tl={tl} fit {len(rows) / seconds:.0f} r/s, step "
                        f"{len(rows) / max(run.step_seconds - step_before, 1e-9):.0f} r/s")
        print("; ".join(line), flush=True)

    truth = held_out["rating"].to_numpy()
    naive_rmse = rating_metrics(truth, naive.predict(held_out))["rmse"]
    mean_rmse = rating_metrics(truth, np.full(len(truth), mean_rating))["rmse"]
    naive_rps = n_ratings / naive_seconds
    same_count = []
    for tl, run in runs.items():
        same_count.append({
            "trainable_layers": tl, "ratings": n_ratings, "naive r/s": naive_rps,
            "llmrec step r/s": run.ratings / run.step_seconds,
            "ratio (step)": (run.ratings / run.step_seconds) / naive_rps,
            "llmrec fit r/s (cold cache)": run.ratings / run.fit_seconds,
            "ratio (cold)": (run.ratings / run.fit_seconds) / naive_rps,
            "naive RMSE": naive_rmse, "llmrec RMSE": rating_metrics(truth, run.predict(held_out))["rmse"],
            "naive peak RSS GiB" if device == "cpu" else "naive peak CUDA GiB": peaks["naive"] / 2**30,
            "llmrec peak RSS GiB" if device == "cpu" else "llmrec peak CUDA GiB": peaks[tl] / 2**30,
        })
    del naive
    # The naive loop's FLOPs: a fresh naive model replays the same chunks, untimed, under
    # torch's counter (the weights differ, the shapes and so the FLOPs do not).
    replay = new_naive()
    with common.flop_counter() as counter:
        for rows in chunks:
            replay.train(rows)
    naive_flops = counter.get_total_flops()
    del replay
    common.release_memory()
    naive_info = {"ratings_per_s": naive_rps, "rmse": naive_rmse, "flops": naive_flops,
                  "flops_per_s": naive_flops / naive_seconds, "fraction_of_peak": naive_flops / naive_seconds / peak}
    print(f"\nSame number of ratings ({n_ratings}), same held-out rows ({len(held_out)}); "
          f"global-mean RMSE {mean_rmse:.4f}; naive encoder {common.fmt_flops(naive_info['flops_per_s'])}FLOP/s "
          f"({naive_info['fraction_of_peak']:.1%} of peak)")
    print(common.markdown_table(same_count), flush=True)

    epochs = []
    if not args.no_epoch:
        for tl, model_config in layers.items():
            run = Llmrec(encoder, model_config, config, data, args.seed)
            seconds, peak_bytes = measured(lambda: run.train(epoch_rows), device)
            encode_flops, train_flops = run.count_flops(epoch_rows)
            step_rps = run.ratings / run.step_seconds
            epochs.append({
                "trainable_layers": tl, "rows": len(epoch_rows), "fit s (cold cache)": run.fit_seconds,
                "train loop s": run.step_seconds,
                "step r/s": step_rps, "ratio (step)": step_rps / naive_rps,
                "fit r/s": run.ratings / run.fit_seconds, "ratio (cold)": run.ratings / run.fit_seconds / naive_rps,
                "RMSE": rating_metrics(truth, run.predict(held_out))["rmse"],
                "TFLOP (cache + train)": (encode_flops + train_flops) / 1e12,
                "FLOP/s (fit)": (encode_flops + train_flops) / run.fit_seconds,
                "of peak (fit)": (encode_flops + train_flops) / run.fit_seconds / peak,
                "FLOP/s (train loop)": train_flops / run.step_seconds,
                "of peak (train loop)": train_flops / run.step_seconds / peak,
                "peak RSS GiB" if device == "cpu" else "peak CUDA GiB": peak_bytes / 2**30,
            })
            print(f"epoch tl={tl}: {epochs[-1]['fit s (cold cache)']:.1f} s", flush=True)
        label = "MFU" if device == "cuda" else "fraction of fp32 matmul peak"
        print(f"\nFull epoch of llmrec ({len(epoch_rows):,} rows, fresh cache and checkpoint); "
              f"'of peak' = {label} ({common.fmt_flops(peak)}FLOP/s)")
        print(common.markdown_table(epochs), flush=True)
        if device == "cuda":
            for row in epochs:
                if row["trainable_layers"] != "0":
                    print(f"MFU of the training step (tl={row['trainable_layers']}): {row['of peak (train loop)']:.2%} "
                          f"of {common.fmt_flops(peak)}FLOP/s bf16 ({peak_source})")

    result = {"machine": info, "device": device, "batch_size": args.batch_size, "training": config.model_dump(),
              "peak_flops": peak,
              "peak_source": peak_source, "global_mean_rmse": mean_rmse, "naive": naive_info,
              "same_count": same_count, "epoch": epochs, "command": " ".join(sys.argv)}
    default = next((r for r in same_count if r["trainable_layers"] == "0"), same_count[0] if same_count else None)
    if default is not None:
        met = default["ratio (step)"] >= 20 and default["llmrec RMSE"] <= default["naive RMSE"]
        print(f"\ntarget (tl={default['trainable_layers']}): ratio >= 20 and RMSE <= naive's: "
              f"{'met' if met else 'NOT met'} (ratio {default['ratio (step)']:.0f}, "
              f"RMSE {default['llmrec RMSE']:.4f} vs {default['naive RMSE']:.4f})")
        result["target_met"] = met
    print(f"load average at the end: {common.machine(device)['load_avg_1m']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=_json_default))
    return result


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


if __name__ == "__main__":
    main()
