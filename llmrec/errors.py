"""Errors a user can cause: the CLI prints their message and exits with code 2."""


class LlmrecError(Exception):
    """A mistake in input or configuration, with a message naming the file, column or
    parameter and the rule it broke."""
