"""Landing-data generators: MovieLens-100k and synthetic ratings, written as nightly drops."""

from llmrec.data.drops import copy_drop, drop_index, list_drops, write_drops, write_parquet_atomic
from llmrec.data.movielens import load_movielens, movielens_drops
from llmrec.data.synthetic import SyntheticData, synthetic_drops, synthetic_frames

__all__ = [
    "SyntheticData",
    "copy_drop",
    "drop_index",
    "list_drops",
    "load_movielens",
    "movielens_drops",
    "synthetic_drops",
    "synthetic_frames",
    "write_drops",
    "write_parquet_atomic",
]
