"""Command-line options generated from the settings dataclasses of :mod:`mdarts.config`.

Each field ``name`` with ``metadata["cli"]`` becomes ``--name-with-dashes``; its help is the
field's, its default is shown (per preset when a preset decides it), and its type follows the
annotation: a bool is a ``--flag`` / ``--no-flag`` pair, a pair of floats takes two values.
Values are checked by the dataclass; its error is reported against the option's name.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Iterable, Mapping, Optional

from .config import MEMORY_MODES, POOLS, SettingError

CHOICES = {"memory_mode": (*MEMORY_MODES, "auto"), "pool": POOLS}


def option(name: str) -> str:
    """``--name-with-dashes`` of the field ``name``."""
    return "--" + name.replace("_", "-")


def add_settings(
    parser: argparse.ArgumentParser,
    cls: type,
    title: str,
    defaults: Optional[Mapping[str, Any]] = None,
    only: Optional[Iterable[str]] = None,
) -> None:
    """Add an option group ``title`` with one option per command-line field of ``cls`` (only
    those in ``only`` when given). Every option defaults to None (not given); the help shows
    the default of ``cls``, or of each instance in ``defaults`` (``{preset name: instance}``)."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    wanted = None if only is None else set(only)
    for spec in dataclasses.fields(cls):
        if not spec.metadata.get("cli") or (wanted is not None and spec.name not in wanted):
            continue
        kwargs: dict[str, Any] = {
            "dest": spec.name,
            "default": None,
            "help": f"{spec.metadata['help']} ({_default(spec, defaults)})",
        }
        kind = hints[spec.name]
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple and typing.get_args(kind)[-1] is Ellipsis:
            kwargs.update(nargs="*", type=typing.get_args(kind)[0], metavar="N")  # none given: the empty tuple
        elif typing.get_origin(kind) is tuple:
            kwargs.update(nargs=2, type=float, metavar=("B1", "B2"))
        else:
            kwargs["type"] = next(t for t in (int, float, str) if t is kind or t in typing.get_args(kind))
            if spec.name in CHOICES:
                kwargs["choices"] = CHOICES[spec.name]
        group.add_argument(option(spec.name), **kwargs)


def _default(spec: dataclasses.Field, defaults: Optional[Mapping[str, Any]]) -> str:
    if not defaults:
        return f"default {_show(spec.default)}"
    values = {name: getattr(instance, spec.name) for name, instance in defaults.items()}
    if len(set(map(repr, values.values()))) == 1:
        return f"default {_show(next(iter(values.values())))}"
    return "default " + ", ".join(f"{name} {_show(value)}" for name, value in values.items())


def _show(value: Any) -> str:
    if value is None or value == ():
        return "none"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (not None in ``args``)."""
    names = (spec.name for spec in dataclasses.fields(cls))
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def build_settings(cls: type, values: Mapping[str, Any], base: Any = None) -> Any:
    """``base.replace(**values)`` (or ``cls(**values)`` without a base); a SettingError becomes a
    ValueError naming the option, e.g. ``--lr: expected a positive finite number, got -1.0``."""
    try:
        return base.replace(**values) if base is not None else cls(**values)
    except SettingError as error:
        raise ValueError(f"{option(error.field)}: {error.message}") from None
