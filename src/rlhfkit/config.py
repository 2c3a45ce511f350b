"""Frozen, typed configs: one dataclass per recipe, from YAML and/or CLI flags.

    cfg = SFTConfig.load("sft.yaml", overrides={"lr": 1e-5})

Every field is declared with `param(default, "one-line help")`. The same dataclass backs
the YAML file, the CLI flags (`rlhf sft --config sft.yaml --lr 1e-5`) and the `config.yaml`
saved in each run folder. Construction validates types and ranges; an unknown key is
rejected with the nearest valid name.

A renamed field lists its former names, `param(4, "...", old_names=("group_size",))`: for one
release a YAML key (and, through `cli/config.py`, a flag) under an old name still sets the field,
with a `RenamedSetting` warning; giving both names is an error.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from rlhfkit.io import atomic_write_text


class ConfigError(ValueError):
    """A config that cannot be used: unknown key, wrong type, value out of range."""


class RecipeMismatch(ConfigError):
    """A config file whose `recipe:` (written by `Config.save`) names another recipe."""

    def __init__(self, path: Path, recipe: str, expected: str) -> None:
        super().__init__(f"{path}: its recipe: line says '{recipe}', but this config is for '{expected}'; "
                         f"use the {recipe} command with it, or delete the recipe: line")
        self.path, self.recipe, self.expected = path, recipe, expected


class RenamedSetting(FutureWarning):
    """A setting given under its former name: still accepted, until the next release."""


RENAMED = "{old} is now {new}; the old name goes in the next release"


def closest_names(name: object, choices: typing.Iterable[str], *, n: int = 1, cutoff: float = 0.6) -> list[str]:
    """The valid names nearest to a mistyped `name`, best first (difflib ratio ≥ `cutoff`).

    The one "did you mean" rule of the package: config keys, loss and estimator names,
    reward sources and record fields all suggest through it."""
    return difflib.get_close_matches(str(name), list(choices), n=n, cutoff=cutoff)


def did_you_mean(name: object, choices: typing.Iterable[str], *, cutoff: float = 0.6) -> str:
    """`"; did you mean 'x'?"` for the nearest valid name, or `""` when none is near."""
    close = closest_names(name, choices, cutoff=cutoff)
    return f"; did you mean '{close[0]}'?" if close else ""


def param(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
          old_names: tuple[str, ...] = ()) -> Any:
    """A config field with its one-line help (shown by `--help`), optional choices, and the
    names it had before a rename (accepted with a `RenamedSetting` warning for one release)."""
    meta = {"help": help, "choices": choices, "old_names": tuple(old_names)}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(T, optional) for T, Optional[T] or T | None."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(name: str, value: Any, tp: Any) -> Any:
    base, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"'{name}' may not be empty")
    origin = typing.get_origin(base)
    if origin in (tuple, list):
        (item,) = typing.get_args(base)[:1] or (str,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{name}' must be a list, got {value!r}")
        return tuple(_coerce(name, v, item) for v in value)
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"'{name}' must be true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"'{name}' must be an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"'{name}' must be an integer, got {value!r}") from None
    if base is float:
        if isinstance(value, bool):  # YAML reads `lr: yes` as True, which float() would turn into 1.0
            raise ConfigError(f"'{name}' must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"'{name}' must be a number, got {value!r}") from None
    if base is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"'{name}' must be a string, got {value!r}")
        return str(value)
    return value


@dataclass(frozen=True)
class Config:
    """Base of every recipe config: loading, overriding, validating, saving."""

    kind: ClassVar[str] = "config"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            v = _coerce(f.name, getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, v)
            choices = f.metadata.get("choices")
            if choices and v is not None and v not in choices:
                raise ConfigError(f"'{f.name}' must be one of {', '.join(choices)}; got {v!r}")
        self.validate()

    def validate(self) -> None:
        """Range checks; subclasses extend with `super().validate()`."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def old_names(cls) -> dict[str, str]:
        """{former name: field} of the renamed fields."""
        return {old: f.name for f in fields(cls) for old in f.metadata.get("old_names", ())}

    @classmethod
    def current_names(cls, data: dict[str, Any], *, source: str = "config", warn: bool = True) -> dict[str, Any]:
        """`data` with every former key renamed to its field, each with a `RenamedSetting` warning
        (unless not `warn`: a record rlhfkit wrote itself); a field under two of its names is a ConfigError."""
        renamed = cls.old_names()
        out: dict[str, Any] = {}
        for key, value in data.items():
            name = renamed.get(key, key)
            if name in out:
                old = next(k for k in data if renamed.get(k) == name)
                raise ConfigError(f"{source}: '{old}' is the old name of '{name}'; give only '{name}'")
            out[name] = value
        for key in data:
            if key in renamed and warn:
                warnings.warn(f"{source}: " + RENAMED.format(old=f"'{key}'", new=f"'{renamed[key]}'"),
                              RenamedSetting, stacklevel=3)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> Config:
        data = cls.current_names(data, source=source)
        names = cls.field_names()
        for key in data:
            if key not in names:
                hint = did_you_mean(key, names, cutoff=0.5) or f"; valid keys: {', '.join(names)}"
                raise ConfigError(f"{source}: unknown key '{key}' for {cls.__name__}{hint}")
        try:
            return cls(**data)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
        """Fields from the YAML file at `path` (if any), then `overrides` on top (CLI flags)."""
        data: dict[str, Any] = {}
        source = "command line"
        if path is not None:
            p = Path(path)
            if not p.exists():
                raise ConfigError(f"config file not found: {p}")
            try:
                loaded = yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{p}: not valid YAML: {e}") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"{p}: the top level must be a mapping of key: value")
            # `recipe:` is the kind `save` writes, not a field: it must name this config's recipe.
            recipe = loaded.pop("recipe", None) if "recipe" not in cls.field_names() else None
            if recipe is not None and str(recipe) != cls.kind:
                raise RecipeMismatch(p, str(recipe), cls.kind)
            data.update(cls.current_names(loaded, source=str(p)))  # before the flags, which win
            source = str(p)
        for k, v in (overrides or {}).items():
            if v is not None:
                data[k] = v
        return cls.from_dict(data, source=source)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def save(self, path: str | Path) -> None:
        body = yaml.safe_dump({"recipe": self.kind, **self.to_dict()}, sort_keys=False)
        atomic_write_text(Path(path), body)

    @classmethod
    def help_of(cls, name: str) -> str:
        for f in fields(cls):
            if f.name == name:
                return f.metadata.get("help", "")
        raise KeyError(name)


def check(cond: bool, message: str) -> None:
    """Raise ConfigError(message) unless cond."""
    if not cond:
        raise ConfigError(message)
