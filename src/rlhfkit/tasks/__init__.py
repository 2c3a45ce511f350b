"""Checkable instruction tasks: generation with a fixed train/test split (`generate`), exact
checkers and the gold reward (`check`), JSONL records (`records`)."""
