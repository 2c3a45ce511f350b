"""Turn a config dataclass into a typer command: one `--flag` per field, plus `--config FILE`.

Flags default to "not given", so a flag overrides the YAML file and the YAML file
overrides the dataclass default — one dataclass behind all three. Before the recipe runs
(and loads a model), the output path and the tracker are checked, so a mistake there is
one line at once rather than a traceback minutes later.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import typing
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from rlhfkit.cli.errors import fail
from rlhfkit.config import Config, ConfigError, RecipeMismatch, _base_type

TRACKER_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard"}


def _option_type(tp: Any) -> Any:
    base, _ = _base_type(tp)
    if typing.get_origin(base) in (tuple, list):
        return str  # comma-separated on the command line
    return base if base in (int, float, str, bool) else str


def default_text(value: Any) -> str:
    """A default as it is typed on the command line: `1,2` not `(1, 2)`; '' for none (not shown)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return "" if value is None else str(value)


def check_outputs(cfg: Config) -> None:
    """Fail now, before any model loads, on an output path that cannot be written or a
    tracker that is not installed. `output_dir` is a folder; `out` is a file when its default
    is one (best-of-n's best_of_n.jsonl) and a folder otherwise (the loop's runs/loop)."""
    defaults = {f.name: f.default for f in fields(cfg)}
    for name in ("output_dir", "out"):
        value = getattr(cfg, name, None)
        if not value:
            continue
        flag, path = "--" + name.replace("_", "-"), Path(str(value)).expanduser()
        is_file = name == "out" and Path(str(defaults[name])).suffix != ""
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            fail(f"{flag} {value}: {blocking} is a file, so nothing can be written under it")
        if is_file and path.is_dir():
            fail(f"{flag} {value} is a folder; give a file name")
        if not is_file and path.exists() and not path.is_dir():
            fail(f"{flag} {value} is a file; give a folder (an existing one, or one to create)")
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not os.access(existing if existing.is_dir() else existing.parent, os.W_OK):
            fail(f"{flag} {value}: {existing} is not writable (permission denied)")
    package = TRACKER_PACKAGES.get(getattr(cfg, "tracker", None) or "")
    if package and importlib.util.find_spec(package) is None:
        fail(f"--tracker {cfg.tracker} needs the {package} package: pip install {package} (or --tracker none)")


def command_of(ctx: typer.Context, kind: str) -> str | None:
    """`rlhf rm train` for kind 'rm': the command, anywhere in the app, generated from a config of `kind`."""
    root = ctx.find_root()
    todo = [(root.command, root.info_name)]
    while todo:
        cmd, path = todo.pop()
        if getattr(cmd.callback, "config_kind", None) == kind:
            return path
        todo += [(sub, f"{path} {name}") for name, sub in getattr(cmd, "commands", {}).items()]
    return None


def _load(ctx: typer.Context, cfg_cls: type[Config], config_path: Path | None, overrides: dict[str, Any]) -> Config:
    try:
        return cfg_cls.load(config_path, overrides=overrides)
    except RecipeMismatch as e:
        command = command_of(ctx, e.recipe)
        use = f"run it with `{command} --config {e.path}`" if command else f"it is for the {e.recipe} recipe"
        fail(f"{e.path}: its recipe: line says '{e.recipe}', but this is `{ctx.command_path}`; "
             f"{use}, or delete the recipe: line")
    except ConfigError as e:  # a user mistake: one clear line and exit 2, not a traceback
        fail(str(e))


def config_command(app: typer.Typer, name: str, cfg_cls: type[Config], run: Callable[[Config], Any], *,
                   help: str, examples: str) -> None:
    """Register `rlhf NAME [--config FILE] [--field value ...]` calling run(cfg).

    A field named `algorithm` whose default is the recipe's own kind is fixed by the command: its flag
    is hidden (a YAML file or the flag may still set it, and the recipe refuses another)."""
    hints = typing.get_type_hints(cfg_cls)
    config_option = typer.Option(None, "--config", "-c", help="YAML file with any of the fields below",
                                 show_default=False)
    params = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context),
              inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Path | None,
                                default=config_option)]
    for f in fields(cfg_cls):
        tp = _option_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        decl = [f"{flag}/--no-{f.name.replace('_', '-')}"] if tp is bool else [flag]
        default = f.default if f.default is not inspect.Parameter.empty else None
        try:
            default = f.default_factory()  # type: ignore[misc]
        except TypeError:
            pass
        choices = f.metadata.get("choices")
        text = f.metadata.get("help", "") + (f" [{'|'.join(choices)}]" if choices else "")
        shown = ("--" if default else "--no-") + f.name.replace("_", "-") if tp is bool else default_text(default)
        text += f" (default: {shown})" if shown else ""
        text = escape(text)  # rich markup would swallow "[cosine|linear|constant]" as a style tag
        hidden = f.name == "algorithm" and default == cfg_cls.kind
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=tp | None,
                                        default=typer.Option(None, *decl, help=text, show_default=False,
                                                             hidden=hidden)))

    def command(**kwargs):
        ctx, config_path = kwargs.pop("ctx"), kwargs.pop("config")
        cfg = _load(ctx, cfg_cls, config_path, {k: v for k, v in kwargs.items() if v is not None})
        check_outputs(cfg)
        return run(cfg)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {}
    command.config_kind = cfg_cls.kind  # type: ignore[attr-defined] — found by `command_of`
    command.__doc__ = f"{help}\n\n{examples}"
    app.command(name, help=f"{help}\n\n{examples}", short_help=help.split('\n')[0])(command)
