"""Prefect flows that chain the tasks in `tasks/`."""
