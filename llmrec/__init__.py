"""llmrec: a continual-learning recommender on a pretrained language model.

The library has one module per pipeline stage and imports no orchestrator; `tasks/` and
`flows/` wrap these functions for Prefect.
"""

__version__ = "0.1.0"
