"""rlhfkit: the whole RLHF loop — collect feedback, train, evaluate, collect again."""

__version__ = "0.1.0"
