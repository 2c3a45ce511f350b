"""The models layer's error, in a module of its own so that the CLI can recognise it without
importing torch and transformers (`rlhf label ...` never loads a model)."""

from __future__ import annotations


class ModelNotFound(RuntimeError):
    """A `--model` that names no loadable model: one line saying which and why."""
