"""The MLflow pyfunc of an llmrec model version, logged as "model from code" so loading it
unpickles nothing. Input: a frame with user_id and item_id; output: predicted rating
(or, for a bce model, the probability of a positive)."""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class LlmrecPyfunc(PythonModel):
    def load_context(self, context):
        from llmrec.scoring import Scorer

        self.scorer = Scorer.load(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        missing = {"user_id", "item_id"} - set(model_input.columns)
        if missing:
            raise ValueError(f"input is missing column(s) {sorted(missing)}; expected user_id, item_id")
        scores = self.scorer.predict(model_input["user_id"].astype(str), model_input["item_id"].astype(str))
        return pd.DataFrame({"prediction": scores})


mlflow.models.set_model(LlmrecPyfunc())
