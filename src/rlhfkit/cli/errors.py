"""No traceback reaches a user: every failure of an `rlhf` command is one `error:` line.

- a user mistake (bad data, config, model path; a judge that failed after its retries) →
  its message, exit 2;
- an OS error (permission denied, disk full, a folder where a file goes) → the path and the
  reason, exit 1;
- anything else is a bug → `internal error (Type: message)`, exit 1, with the hint to rerun
  with `rlhf --verbose`, which shows the full traceback instead;
- Ctrl-C → where to resume from, if a checkpoint exists, exit 130.

`GuardedGroup` applies this to every command of the app (groups included); `friendly` and
`fail` are for a command that handles a failure itself.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from rlhfkit.cli.help_format import FlagGroup
from rlhfkit.config import ConfigError
from rlhfkit.data.errors import DataError
from rlhfkit.judge.errors import JudgeError
from rlhfkit.models.errors import ModelNotFound

# Bad data, bad config, a missing model, a judge that failed after its retries.
USER_ERRORS = (DataError, ConfigError, ModelNotFound, JudgeError)
USER_ERROR_EXIT, OTHER_ERROR_EXIT, INTERRUPTED_EXIT = 2, 1, 130
# What typer turns into a usage message, help or an exit code itself (its ClickException,
# usage errors included, is a TyperException).
_PASS_THROUGH = (typer.TyperException, typer.Exit, typer.Abort, SystemExit)


def fail(message: str, code: int = USER_ERROR_EXIT) -> NoReturn:
    """Print `error: message` on stderr and exit with `code`."""
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code) from None


def interrupted_message(e: BaseException) -> str:
    """What a Ctrl-C leaves behind. `train.engine.TrainingInterrupted` carries the step and
    the last checkpoint written (or None); a plain KeyboardInterrupt (while a model loads,
    say) has neither. A checkpoint is named only when it is on disk."""
    checkpoint, step = getattr(e, "checkpoint", None), getattr(e, "step", None)
    if checkpoint is not None and Path(checkpoint).exists():
        return f"interrupted at step {step}; the checkpoint {checkpoint} resumes it (run the same command)"
    return "interrupted before any checkpoint was written; nothing to resume"


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else ""


BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE, what a shell reports for a command killed by it


def describe(e: BaseException) -> tuple[str, int]:
    """(the one line after `error: `, the exit code) for an exception a command raised."""
    if isinstance(e, USER_ERRORS):
        return str(e), USER_ERROR_EXIT
    if isinstance(e, OSError) and (e.filename is not None or e.strerror):
        reason = (e.strerror or _first_line(str(e)) or type(e).__name__)
        reason = reason[0].lower() + reason[1:]
        where = [str(f) for f in (e.filename, e.filename2) if f is not None]
        return (f"{' → '.join(where)}: {reason}" if where else reason), OTHER_ERROR_EXIT
    detail = _first_line(str(e))
    kind = type(e).__name__ + (f": {detail}" if detail else "")
    return (f"internal error ({kind}) — rerun with `rlhf --verbose ...` for the traceback and report it",
            OTHER_ERROR_EXIT)


def _verbose(ctx: typer.Context) -> bool:
    return bool(ctx.find_root().params.get("verbose"))


class GuardedGroup(FlagGroup):
    """The `rlhf` group: runs the command, and turns whatever escapes it into one line."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _PASS_THROUGH:
            raise
        except KeyboardInterrupt as e:
            Console(stderr=True).print(f"[yellow]{escape(interrupted_message(e))}[/]")
            raise typer.Exit(INTERRUPTED_EXIT) from None
        except BrokenPipeError:
            # the reader went away (`rlhf … --help | head`): stop quietly, as `cat` does; stdout
            # goes to /dev/null so the interpreter's final flush does not raise again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(BROKEN_PIPE_EXIT) from None
        except Exception as e:
            if _verbose(ctx):
                raise  # `rlhf --verbose ...`: the full traceback, for a bug report
            message, code = describe(e)
            fail(message, code)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` with user errors shown by `fail` (exit 2); everything else is left to `GuardedGroup`."""

    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            fail(str(e))

    wrapped.__name__ = fn.__name__
    return wrapped
