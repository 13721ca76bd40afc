"""Thin Prefect tasks over the llmrec stage functions."""
