"""The `rlhf` command: thin — parses arguments and calls recipes.

Each module of this package holds one group of commands and a `register(app)` that adds them;
`RlhfGroup.modules` below says which module holds which command, in the order `rlhf --help`
lists them, and a module is imported only when one of its commands runs (cli/lazy.py: `rlhf
label ...` starts without torch). `GuardedGroup` (cli/errors.py) runs every one of
them: whatever a command raises reaches the user as one `error:` line, never a traceback,
unless `rlhf --verbose` asks for it.
"""

from __future__ import annotations

import logging
import os
import sys

import typer
from rich.console import Console
from rich.logging import RichHandler

from rlhfkit.cli.help_format import App
from rlhfkit.cli.lazy import LazyGroup

_TRAIN = ("sft", "grpo", "rloo", "remax", "reinforce", "ppo", "best-of-n", "expert-iter", "dpo", "online-dpo")


class RlhfGroup(LazyGroup):
    modules = {**dict.fromkeys(_TRAIN, "train"), "generate": "generate", "chat": "generate", "setup": "generate",
               "demo": "demo", "eval": "eval", "report": "report", "push": "push", "loop": "loop", "rm": "rm",
               "prm": "prm", "label": "label", "judge": "judge"}


app = App(cls=RlhfGroup, add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  pretty_exceptions_show_locals=False,
                  help="rlhfkit — the whole RLHF loop: collect feedback, train, evaluate, collect again.")


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v",
                                     help="debug logging, and the full traceback of an internal error")) -> None:
    # In a distributed run only the main process (RANK 0) reports; the others print errors only.
    level = (logging.DEBUG if verbose else logging.INFO) if os.environ.get("RANK", "0") == "0" else logging.ERROR
    logging.basicConfig(level=level, format="%(message)s",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False)], force=True)
    for noisy in ("httpx", "urllib3", "transformers", "accelerate", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers' warnings and progress bars off, through its documented variables so that a
    # command that never imports it (rlhf label ...) does not pay for it
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # imported already (a test, a notebook): tell it directly
        from transformers.utils import logging as hf_logging  # noqa: PLC0415

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


