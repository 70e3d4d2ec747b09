"""The settings of a sweep: `--set FIELD=V1,V2,...` read as `vaelab train` reads its flags."""

from __future__ import annotations

import typing
from typing import Any

from ..config import field_named, flag_fields
from ..errors import ConfigError
from ..flags import _flag_type

NOT_SWEPT = ("out", "name", "tensorboard")  # where a run is written is the sweep's choice
LIST_SEPARATOR = "/"  # between the values of a list-valued setting: --set hidden=400/512,256


def sweepable() -> list[str]:
    """The settings --set accepts, by flat name: every flag of `vaelab train` but where runs are written."""
    return [f.name for _, f in flag_fields() if f.name not in NOT_SWEPT]


def _is_list(name: str) -> bool:
    role, _ = field_named(name)
    tp = typing.get_type_hints(role)[name]
    return any(typing.get_origin(t) is list for t in (tp, *typing.get_args(tp)))


def setting_name(text: str) -> str:
    name = text.strip().lstrip("-").replace("-", "_")
    if name not in sweepable():
        allowed = ", ".join(n.replace("_", "-") for n in sweepable())
        raise ConfigError(f"--set: {text!r} is not a training setting; allowed: {allowed}")
    return name


def setting_value(name: str, text: str) -> Any:
    """One value of --set as the flag of `vaelab train` would read it (the config then checks it)."""
    role, _ = field_named(name)
    kind = _flag_type(typing.get_type_hints(role)[name])
    text = text.strip()
    try:
        if kind is bool:
            return {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}[text.lower()]
        return kind(text) if kind in (int, float) else text
    except (KeyError, ValueError) as e:
        what = "true or false" if kind is bool else f"{'an integer' if kind is int else 'a number'}"
        raise ConfigError(f"--set {name.replace('_', '-')}: each value must be {what}; got {text!r}") from e


def parse_set(text: str) -> tuple[str, list[Any]]:
    """'FIELD=V1,V2,...' -> (flat name, values); list-valued settings separate their values with '/'."""
    if "=" not in text:
        raise ConfigError(f"--set must be FIELD=V1,V2,... such as sigma=0.1,0.3; got {text!r}")
    key, _, rest = text.partition("=")
    name = setting_name(key)
    parts = [p for p in rest.split(LIST_SEPARATOR if _is_list(name) else ",") if p.strip()]
    if not parts:
        raise ConfigError(f"--set {key.strip()}= names no values; give them as {key.strip()}=V1,V2,...")
    return name, [setting_value(name, p) for p in parts]
