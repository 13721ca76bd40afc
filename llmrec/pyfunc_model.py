"""The MLflow pyfunc of an llmrec model version, logged as "model from code" so loading it
unpickles nothing.

Scores: a frame with user_id and item_id -> a `prediction` column (predicted rating or, for a
bce model, the probability of a positive).
Recommendations: a frame with user_id only and `params={"k": K}` -> the top K items of each
user over the whole catalog: user_id, item_id, rank, score. This is `Scorer.top_k`, the same
ranking the API serves, so `mlflow models serve` and MLflow's container build recommend too.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

MAX_K = 1000


class LlmrecPyfunc(PythonModel):
    def load_context(self, context):
        from llmrec.scoring import Scorer

        self.scorer = Scorer.load(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        k = int((params or {}).get("k") or 0)
        if "user_id" not in model_input.columns:
            raise ValueError("input is missing column 'user_id'; expected user_id (and item_id to score pairs)")
        users = model_input["user_id"].astype(str)
        if k:
            if not 1 <= k <= MAX_K:
                raise ValueError(f"params.k={k}: must be between 1 and {MAX_K}")
            return self.scorer.top_k(list(dict.fromkeys(users)), k)
        if "item_id" not in model_input.columns or model_input["item_id"].isna().any():
            raise ValueError("input is missing column 'item_id'; give user_id and item_id to score pairs, "
                             "or user_id with params={'k': K} for recommendations")
        scores = self.scorer.predict(users, model_input["item_id"].astype(str))
        return pd.DataFrame({"prediction": scores})


mlflow.models.set_model(LlmrecPyfunc())
