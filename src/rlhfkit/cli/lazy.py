"""The `rlhf` group imports a command's module only when that command runs.

The training commands pull in torch and transformers (≈ 3 s of CPU at start); `rlhf label
...` needs neither, and an import started next to a busy labeling server should not spend a
core on them. `LazyGroup.modules` maps each command name to the module of `rlhfkit.cli` whose
`register(app)` adds it, in the order `rlhf --help` lists them. `rlhf --help`, and anything
that asks for `group.commands` whole, imports every module.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, ClassVar

import click
import typer

from rlhfkit.cli.errors import GuardedGroup
from rlhfkit.cli.help_format import App


@functools.cache
def module_commands(module: str) -> dict[str, click.Command]:
    """The click commands that `rlhfkit.cli.<module>.register` adds, built once per process
    (a module's `register` may add commands to a group of its own, so it runs only once)."""
    app = App(rich_markup_mode="rich")
    importlib.import_module(f"rlhfkit.cli.{module}").register(app)
    return dict(typer.main.get_group(app).commands)


class LazyGroup(GuardedGroup):
    """`GuardedGroup` whose commands are loaded from `modules` when first asked for."""

    modules: ClassVar[dict[str, str]] = {}  # command name → module under rlhfkit.cli

    @property
    def commands(self) -> dict[str, click.Command]:  # type: ignore[override]
        """Every command (imports every command module): click's attribute, kept for
        introspection; running one command goes through `get_command`."""
        for name in self.modules:
            self.get_command(None, name)
        return self._commands

    @commands.setter
    def commands(self, value: dict[str, click.Command]) -> None:  # click's __init__ assigns it
        self._commands = dict(value)

    def list_commands(self, ctx: Any) -> list[str]:
        return [*self.modules, *(name for name in self._commands if name not in self.modules)]

    def get_command(self, ctx: Any, cmd_name: str) -> click.Command | None:
        if cmd_name not in self._commands and cmd_name in self.modules:
            loaded = module_commands(self.modules[cmd_name])
            if cmd_name not in loaded:
                raise LookupError(f"rlhfkit.cli.{self.modules[cmd_name]} registers no command {cmd_name!r}")
            self._commands[cmd_name] = loaded[cmd_name]
        return self._commands.get(cmd_name)
