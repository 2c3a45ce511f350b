"""One flag vocabulary across `rlhf` commands (docs/CLI.md, "Flag vocabulary").

A renamed flag keeps its old name for one release as a hidden option of its own: click cannot
hide one name of an option, and a separate option lets us see which name was typed. The old
name sets the same value with one `warning:` line; the old and the new name together are a
usage error (exit 2).

- a flag generated from a config field: `param(..., old_names=("group_size",))` on the field
  (`cli/config.py` adds the hidden options; the YAML key is `Config.current_names`' job);
- a hand-written command: `@old_flags(data="--human")` on its function.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from copy import copy
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from rlhfkit.cli.errors import fail
from rlhfkit.config import RENAMED

F = TypeVar("F", bound=Callable[..., Any])


def warn(message: str) -> None:
    """One `warning: message` line on stderr."""
    Console(stderr=True, soft_wrap=True).print(f"[bold yellow]warning:[/] {escape(message)}")


def renamed(old: str, new: str) -> None:
    """The deprecation line for a flag given under its old name."""
    warn(RENAMED.format(old=old, new=new))


def both_given(old: str, new: str) -> NoReturn:
    fail(f"{old} is the old name of {new}; give only {new}")


def old_option_name(name: str, old_flag: str) -> str:
    """The parameter behind the hidden `old_flag` of parameter `name` (`data` + `--human` → `data__human`)."""
    return f"{name}__{old_flag.lstrip('-').replace('-', '_')}"


def _long_flag(info: Any, name: str) -> str:
    decls = [d.split("/")[0] for d in getattr(info, "param_decls", ()) or () if d.startswith("--")]
    return decls[0] if decls else "--" + name.replace("_", "-")


def old_flags(**renames: str | tuple[str, ...]) -> Callable[[F], F]:
    """For a hand-written typer command: each keyword names a parameter and its former flag(s),
    e.g. `@old_flags(data="--human")`. A required option stays required under either name."""
    context = "ctx__flags"  # typer passes the click context to the parameter annotated typer.Context

    def decorate(fn: F) -> F:
        sig = inspect.signature(fn, eval_str=True)
        params = dict(sig.parameters)
        olds: dict[str, tuple[str, ...]] = {}
        required: set[str] = set()
        for name, given in renames.items():
            olds[name] = (given,) if isinstance(given, str) else tuple(given)
            p = params[name]
            info = copy(p.default)
            if info.default is ...:  # required: click must not demand it when the old name is given
                required.add(name)
                info.default, info.help = None, f"{info.help} (required)"
            params[name] = p.replace(default=info, annotation=p.annotation | None)
            for old in olds[name]:
                params[old_option_name(name, old)] = inspect.Parameter(
                    old_option_name(name, old), inspect.Parameter.KEYWORD_ONLY, annotation=p.annotation | None,
                    default=typer.Option(None, old, hidden=True))
        params[context] = inspect.Parameter(context, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        ordered = sorted(params.values(), key=lambda q: q.kind)  # keyword-only after the rest

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            ctx = kwargs.pop(context)
            for name, flags in olds.items():
                new_flag = _long_flag(sig.parameters[name].default, name)
                source = ctx.get_parameter_source(name)
                given = {old: kwargs.pop(old_option_name(name, old)) for old in flags}
                given = {old: value for old, value in given.items() if value is not None}
                if len(given) + (source is not None and source.name != "DEFAULT") > 1:
                    both_given(list(given)[-1], new_flag)
                for old, value in given.items():
                    renamed(old, new_flag)
                    kwargs[name] = value
                if name in required and kwargs[name] is None:
                    fail(f"missing option {new_flag}")
            return fn(**kwargs)

        command.__signature__ = sig.replace(parameters=ordered)  # type: ignore[attr-defined]
        command.__annotations__ = {}  # typer reads the (resolved) annotations of the signature
        del command.__wrapped__  # type: ignore[attr-defined]
        return command  # type: ignore[return-value]

    return decorate
