"""The `rlhf` command: thin — parses arguments and calls recipes.

Each module of this package holds one group of commands and a `register(app)` that adds them.
`rlhf --help` lists the commands in the order they are registered below, then the command
groups (loop, rm, label, judge) in theirs. `GuardedGroup` (cli/errors.py) runs every one of
them: whatever a command raises reaches the user as one `error:` line, never a traceback,
unless `rlhf --verbose` asks for it.
"""

from __future__ import annotations

import logging
import os

import typer
from rich.console import Console
from rich.logging import RichHandler
from transformers.utils import logging as hf_logging

from rlhfkit.cli import demo, eval, generate, judge, label, loop, prm, push, report, rm, train
from rlhfkit.cli.errors import GuardedGroup
from rlhfkit.cli.help_format import App

app = App(cls=GuardedGroup, add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
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
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


train.register(app)
generate.register(app)
demo.register(app)
eval.register(app)
report.register(app)
push.register(app)
loop.register(app)
rm.register(app)
prm.register(app)
label.register(app)
judge.register(app)
