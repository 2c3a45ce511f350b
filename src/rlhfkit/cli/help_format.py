"""How `--help` shows a flag: an on/off flag (`--resume/--no-resume`, `--verbose`, `--help`)
gets no type column (`<bool>`), since nothing is typed after it.

`App` is `typer.Typer` with these classes as its defaults, so every command and group of
`rlhf` gets them; `GuardedGroup` (cli/errors.py) builds on `FlagGroup`.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup


def _without_flag_types(params: list[Any]) -> list[Any]:
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""  # typer shows the metavar in place of the type
    return params


class FlagCommand(TyperCommand):
    """A command whose flags show no `<bool>` in `--help`."""

    def get_params(self, ctx: typer.Context) -> list[Any]:
        return _without_flag_types(super().get_params(ctx))


class FlagGroup(TyperGroup):
    """A group of commands whose own flags show no `<bool>` in `--help`."""

    def get_params(self, ctx: typer.Context) -> list[Any]:
        return _without_flag_types(super().get_params(ctx))


class App(typer.Typer):
    """`typer.Typer` making `FlagGroup`s and `FlagCommand`s unless told another class."""

    def __init__(self, *, cls: type[TyperGroup] | None = None, **kwargs: Any) -> None:
        super().__init__(cls=cls or FlagGroup, **kwargs)

    def command(self, name: str | None = None, *, cls: type[TyperCommand] | None = None, **kwargs: Any):
        return super().command(name, cls=cls or FlagCommand, **kwargs)
