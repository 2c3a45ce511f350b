"""Turn a config dataclass into a typer command: one `--flag` per field, plus `--config FILE`.

Flags default to "not given", so a flag overrides the YAML file and the YAML file
overrides the dataclass default — one dataclass behind all three.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from rlhfkit.cli.errors import fail
from rlhfkit.config import Config, ConfigError, _base_type


def _option_type(tp: Any) -> Any:
    base, _ = _base_type(tp)
    if typing.get_origin(base) in (tuple, list):
        return str  # comma-separated on the command line
    return base if base in (int, float, str, bool) else str


def config_command(app: typer.Typer, name: str, cfg_cls: type[Config], run: Callable[[Config], Any], *,
                   help: str, examples: str) -> None:
    """Register `rlhf NAME [--config FILE] [--field value ...]` calling run(cfg)."""
    hints = typing.get_type_hints(cfg_cls)
    config_option = typer.Option(None, "--config", "-c", help="YAML file with any of the fields below",
                                 show_default=False)
    params = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Path | None,
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
        text += f" (default: {default})"
        text = escape(text)  # rich markup would swallow "[cosine|linear|constant]" as a style tag
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=tp | None,
                                        default=typer.Option(None, *decl, help=text, show_default=False)))

    def command(**kwargs):
        config_path = kwargs.pop("config")
        try:
            cfg = cfg_cls.load(config_path, overrides={k: v for k, v in kwargs.items() if v is not None})
        except ConfigError as e:  # a user mistake: one clear line and exit 2, not a traceback
            fail(str(e))
        return run(cfg)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {}
    command.__doc__ = f"{help}\n\n{examples}"
    app.command(name, help=f"{help}\n\n{examples}", short_help=help.split('\n')[0])(command)
