"""User mistakes on the command line: one clear `error:` line and an exit code, never a traceback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from rlhfkit.config import ConfigError
from rlhfkit.data.errors import DataError
from rlhfkit.judge.backends import JudgeError
from rlhfkit.models.loading import ModelNotFound

# Bad data, bad config, a missing model, a judge that failed after its retries.
USER_ERRORS = (DataError, ConfigError, ModelNotFound, JudgeError)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `error: message` on stderr and exit with `code`."""
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code) from None


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` with user errors shown by `fail` (exit 2) and Ctrl-C as a hint to resume (exit 130)."""

    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            fail(str(e))
        except KeyboardInterrupt:
            Console(stderr=True).print("[yellow]interrupted; the last checkpoint is in the run folder "
                                       "(run the same command to resume)[/]")
            raise typer.Exit(130) from None

    wrapped.__name__ = fn.__name__
    return wrapped
