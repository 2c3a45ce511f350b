"""`python -m rlhfkit.cli ...` (e.g. under `accelerate launch`): the same as `rlhf ...`."""

from rlhfkit.cli import app

app()
