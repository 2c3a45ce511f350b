"""Turn a config dataclass into a typer command: one `--flag` per field, plus `--config FILE`.

Flags default to "not given", so a flag overrides the YAML file and the YAML file
overrides the dataclass default — one dataclass behind all three. Before the recipe runs
(and loads a model), the output path and the tracker are checked, so a mistake there is
one line at once rather than a traceback minutes later. A field renamed with
`param(..., old_names=(...))` keeps each old name as a hidden flag (`cli/flags.py`).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import typing
import warnings
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from rlhfkit.cli.errors import fail
from rlhfkit.cli.flags import both_given, old_option_name, renamed, warn
from rlhfkit.cli.help_format import FlagCommand
from rlhfkit.cli.outputs import print_run_outputs
from rlhfkit.config import Config, ConfigError, RecipeMismatch, RenamedSetting, _base_type

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


def flag(name: str) -> str:
    """`--output-dir` for the field `output_dir`."""
    return "--" + name.replace("_", "-")


def check_outputs(cfg: Config) -> None:
    """Fail now, before any model loads, on an output path that cannot be written or a
    tracker that is not installed. `output_dir` is always a folder and `out` always a file."""
    for name in ("output_dir", "out"):
        value = getattr(cfg, name, None)
        if not value:
            continue
        option, path, is_file = flag(name), Path(str(value)).expanduser(), name == "out"
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            fail(f"{option} {value}: {blocking} is a file, so nothing can be written under it")
        if is_file and path.is_dir():
            fail(f"{option} {value} is a folder; give a file name")
        if not is_file and path.exists() and not path.is_dir():
            fail(f"{option} {value} is a file; give a folder (an existing one, or one to create)")
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not os.access(existing if existing.is_dir() else existing.parent, os.W_OK):
            fail(f"{option} {value}: {existing} is not writable (permission denied)")
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


def showing_renamed_keys(load: Callable[[], Config]) -> Config:
    """`load()`, with each YAML key under an old name shown as one `warning:` line (after a
    successful load: a mistake is the one `error:` line)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RenamedSetting)
        cfg = load()
    for w in caught:
        if issubclass(w.category, RenamedSetting):
            warn(str(w.message))
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return cfg


def _load(ctx: typer.Context, cfg_cls: type[Config], config_path: Path | None, overrides: dict[str, Any]) -> Config:
    try:
        return showing_renamed_keys(lambda: cfg_cls.load(config_path, overrides=overrides))
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
    is hidden (a YAML file or the flag may still set it, and the recipe refuses another). Each old
    name of a renamed field is a hidden flag of its own that sets the field, with a warning."""
    hints = typing.get_type_hints(cfg_cls)
    config_option = typer.Option(None, "--config", "-c", help="YAML file with any of the fields below",
                                 show_default=False)
    params = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context),
              inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Path | None,
                                default=config_option)]
    for f in fields(cfg_cls):
        tp = _option_type(hints[f.name])
        decl = [f"{flag(f.name)}/--no-{f.name.replace('_', '-')}"] if tp is bool else [flag(f.name)]
        default = f.default if f.default is not inspect.Parameter.empty else None
        try:
            default = f.default_factory()  # type: ignore[misc]
        except TypeError:
            pass
        choices = f.metadata.get("choices")
        text = f.metadata.get("help", "") + (f" [{'|'.join(choices)}]" if choices else "")
        shown = ("--" if default else "--no-") + f.name.replace("_", "-") if tp is bool else default_text(default)
        text += f" [default: {shown}]" if shown else ""  # as typer shows a hand-written option's
        text = escape(text)  # rich markup would swallow "[cosine|linear|constant]" as a style tag
        hidden = f.name == "algorithm" and default == cfg_cls.kind
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=tp | None,
                                        default=typer.Option(None, *decl, help=text, show_default=False,
                                                             hidden=hidden)))
        for old in f.metadata.get("old_names", ()):
            old_decl = f"{flag(old)}/--no-{old.replace('_', '-')}" if tp is bool else flag(old)
            params.append(inspect.Parameter(old_option_name(f.name, old), inspect.Parameter.KEYWORD_ONLY,
                                            annotation=tp | None, default=typer.Option(None, old_decl, hidden=True)))

    def command(**kwargs):
        ctx, config_path = kwargs.pop("ctx"), kwargs.pop("config")
        given = {old: (new, kwargs.pop(old_option_name(new, old))) for old, new in cfg_cls.old_names().items()}
        given = {old: (new, value) for old, (new, value) in given.items() if value is not None}
        for old, (new, value) in given.items():
            if kwargs[new] is not None:
                both_given(flag(old), flag(new))
            kwargs[new] = value
        for old, (new, _) in given.items():
            renamed(flag(old), flag(new))
        cfg = _load(ctx, cfg_cls, config_path, {k: v for k, v in kwargs.items() if v is not None})
        check_outputs(cfg)
        result = run(cfg)
        print_run_outputs(cfg)  # a training run ends naming its outputs and the next commands
        return result

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {}
    command.config_kind = cfg_cls.kind  # type: ignore[attr-defined] — found by `command_of`
    command.__doc__ = f"{help}\n\n{examples}"
    app.command(name, help=f"{help}\n\n{examples}", short_help=help.split('\n')[0], cls=FlagCommand)(command)
