"""How `--help` shows a command: an on/off flag (`--resume/--no-resume`, `--verbose`, `--help`)
gets no type column (`<bool>`), since nothing is typed after it, and the docstring's prose
paragraphs are reflowed to the terminal's width (typer keeps a docstring's line breaks, so
lines wrapped at 100 columns in the source came out ragged in an 80-column terminal).

`App` is `typer.Typer` with these classes as its defaults, so every command and group of
`rlhf` gets them; `GuardedGroup` (cli/errors.py) builds on `FlagGroup`.
"""

from __future__ import annotations

import inspect
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup


def _without_flag_types(params: list[Any]) -> list[Any]:
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""  # typer shows the metavar in place of the type
    return params


def reflow_help(text: str | None) -> str | None:
    """The help text with each prose paragraph on one line; paragraphs with indented lines,
    bullets or a leading \\b (typer's "keep as is") are kept as written."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    kept = ("-", "*", "•", " ", "\b")
    return "\n\n".join(p if any(line.startswith(kept) for line in p.splitlines()) else " ".join(p.split("\n"))
                       for p in paragraphs)


class FlagCommand(TyperCommand):
    """A command whose flags show no `<bool>` in `--help` and whose prose is reflowed."""

    def __init__(self, *args: Any, help: str | None = None, **kwargs: Any) -> None:  # noqa: A002 — click's name
        super().__init__(*args, help=reflow_help(help), **kwargs)

    def get_params(self, ctx: typer.Context) -> list[Any]:
        return _without_flag_types(super().get_params(ctx))


class FlagGroup(TyperGroup):
    """A group of commands whose own flags show no `<bool>` in `--help` and whose prose is reflowed."""

    def __init__(self, *args: Any, help: str | None = None, **kwargs: Any) -> None:  # noqa: A002 — click's name
        super().__init__(*args, help=reflow_help(help), **kwargs)

    def get_params(self, ctx: typer.Context) -> list[Any]:
        return _without_flag_types(super().get_params(ctx))


class App(typer.Typer):
    """`typer.Typer` making `FlagGroup`s and `FlagCommand`s unless told another class."""

    def __init__(self, *, cls: type[TyperGroup] | None = None, **kwargs: Any) -> None:
        super().__init__(cls=cls or FlagGroup, **kwargs)

    def command(self, name: str | None = None, *, cls: type[TyperCommand] | None = None, **kwargs: Any):
        return super().command(name, cls=cls or FlagCommand, **kwargs)
