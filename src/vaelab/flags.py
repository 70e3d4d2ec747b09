"""Command-line flags generated from the config declarations (vaelab.config): one flag per setting, with the help
text, default, metavar and allowed values written there. `vaelab train` takes them all; other commands
(sigma-study) take a chosen few, with their own defaults where those differ."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from .config import choices_of, flag_fields, flag_name


def add_setting_flags(p: argparse.ArgumentParser, names: tuple[str, ...] | None = None,
                      defaults: dict[str, Any] | None = None) -> dict[str, argparse._ArgumentGroup]:
    """Add the flags of the settings `names` (default: all) to `p`, grouped as declared; returns the groups.

    Every flag's argparse default is None, so a flag the user did not give never overrides the config's own
    default (or a resumed run's saved setting). `defaults` names the defaults this command shows and applies
    instead of the config's."""
    defaults = defaults or {}
    groups: dict[str, argparse._ArgumentGroup] = {}
    for role, f in flag_fields():
        if names is not None and f.name not in names:
            continue
        heading = f.metadata["group"] or role.title
        group = groups.get(heading) or groups.setdefault(heading, p.add_argument_group(heading))
        default = defaults.get(f.name, f.default_factory() if callable(f.default_factory) else f.default)
        group.add_argument(flag_name(f.name), **_flag_options(role, f, default))
    return groups


def _flag_options(role: type, f: dataclasses.Field[Any], default: Any) -> dict[str, Any]:
    kind = _flag_type(typing.get_type_hints(role)[f.name])
    allowed = choices_of(f, role)
    help_text = f.metadata["help"] + ("" if default in (None, False) else f" (default {_show(default)})")
    options: dict[str, Any] = {"help": help_text, "default": None}
    if kind is bool:  # --flag for an option that is off by default; --flag / --no-flag for one that is on
        options["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
    elif allowed:
        options["choices"] = allowed
    else:
        options["type"] = kind
        options["metavar"] = f.metadata.get("metavar")
    return options


def given_settings(args: argparse.Namespace, names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The settings the user gave on the command line (flat names), and only those."""
    keys = [f.name for _, f in flag_fields() if names is None or f.name in names]
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _flag_type(tp: Any) -> Any:
    """bool, int, float or str for a field's annotation (lists such as --hidden 512,256 are parsed by the config)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Literal:
        return str
    if args and typing.get_origin(tp) is not list:  # X | None
        return _flag_type(args[0])
    return tp if tp in (bool, int, float) else str


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)
