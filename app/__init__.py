"""Entry points on top of the pipeline: the `llmrec` command line, the demo, serving the
deployments (and the recommendation API). Nothing in `llmrec/`, `tasks/` or `flows/`
imports this package."""
