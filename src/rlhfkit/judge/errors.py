"""The judge's error, in a module of its own so that the CLI can recognise it without
importing torch (`rlhf label ...` never loads a model)."""

from __future__ import annotations


class JudgeError(RuntimeError):
    """A judge backend could not produce a completion (after its retries, where it retries)."""
