"""What every config role is built from: `option` (a field with its flag's help and allowed values), `Role`
(their shared checks and conversion) and the small validators the roles and the CLI share."""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import field
from typing import Any, ClassVar, Literal, get_args

from .errors import ConfigError


def option(default: Any, help: str, group: str = "", flag: bool = True, metavar: str | None = None,
           choices: Callable[[], tuple[str, ...]] | None = None) -> Any:
    """A config field with the help text, help group and allowed values of its CLI flag: the one place each is
    written. `choices` names the values of a registry (likelihoods, objectives), read when asked."""
    meta = {"help": help, "group": group, "cli": flag, "metavar": metavar, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


class Role:
    """What the per-role dataclasses share: validation of declared choices and plain-dict conversion."""

    title: ClassVar[str] = ""

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # the frozen dataclass normalises its own fields while it is built

    def _check_choices(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            allowed = choices_of(f, type(self))
            value = getattr(self, f.name)
            if allowed and value not in allowed:
                raise ConfigError(f"{flag_name(f.name)} must be one of {', '.join(allowed)}; got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


def choices_of(f: dataclasses.Field[Any], owner: type) -> tuple[str, ...]:
    """The values a field allows: its registry's names, or its Literal type's values; () for any value."""
    if f.metadata.get("choices") is not None:
        return tuple(f.metadata["choices"]())
    tp = typing.get_type_hints(owner)[f.name]
    if typing.get_origin(tp) is Literal:
        return tuple(get_args(tp))
    return ()


def parse_hidden(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError as e:
        raise ConfigError(f"--hidden must be comma-separated positive integers such as 512,256; got {text!r}") from e
    if not sizes or any(s <= 0 for s in sizes):
        raise ConfigError(f"--hidden must be comma-separated positive integers such as 512,256; got {text!r}")
    return sizes


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _size(name: str, value: object) -> str | None:
    """An image size as given (64, "64", "64x48", [64, 48]) -> "64" or "64x48" (height x width)."""
    if value is None:
        return None
    parts = list(value) if isinstance(value, list | tuple) else str(value).lower().replace("×", "x").split("x")
    try:
        sizes = [int(p) for p in parts]
    except (TypeError, ValueError):
        sizes = []
    if len(sizes) not in (1, 2) or any(v < 1 for v in sizes):
        raise ConfigError(f"{flag_name(name)} must be a size such as 64 or 64x48 (height x width); got {value!r}")
    return "x".join(map(str, sizes)) if len(sizes) == 2 and sizes[0] != sizes[1] else str(sizes[0])


def positive_int(name: str, value: object, allow_zero: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{flag_name(name)} must be an integer {bound}; got {value!r}")


def positive_float(name: str, value: object, allow_zero: bool = False) -> None:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        v = math.nan
    ok = math.isfinite(v) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{flag_name(name)} must be a finite number {bound}; got {value!r}")
