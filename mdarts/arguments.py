"""Command-line options generated from the settings dataclasses of :mod:`mdarts.config`.

Each field ``name`` with ``metadata["cli"]`` becomes ``--name-with-dashes``; its help is the
field's, its default is shown (per preset when a preset decides it), and its type follows the
annotation: a bool is a ``--flag`` / ``--no-flag`` pair, a pair of floats takes two values.
Values are checked by the dataclass; its error is reported against the option's name. The
options outside the dataclasses declare their range where they are declared, with
:func:`integer` and :func:`number` as their argparse ``type``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from typing import Any, Callable, Iterable, Mapping, Optional

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
    if len(set(map(repr, values.values()))) == 1:  # the presets' default, which may not be the class's
        return f"default {_show(next(iter(values.values())))} in every preset"
    return "default " + ", ".join(f"{name} {_show(value)}" for name, value in values.items())


def _show(value: Any) -> str:
    if value is None or value == ():
        return "none"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value)


def integer(minimum: int, maximum: Optional[int] = None) -> Callable[[str], int]:
    """An argparse ``type``: the text as an int in [minimum, maximum] (no maximum: unbounded);
    argparse reports a refusal against the option, e.g. ``argument --beam: expected an integer
    from 1 to 64, got 1000``."""
    expected = f"an integer from {minimum:,} to {maximum:,}" if maximum is not None else f"an integer >= {minimum:,}"

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value:,}")
        return value

    return convert


def number(minimum: Optional[float] = None, *, positive: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: the text as a finite float, > 0 with ``positive``, else >= ``minimum``
    when given (None: any finite number)."""
    if positive:
        expected = "a positive finite number"
    else:
        expected = "a finite number" + ("" if minimum is None else f" >= {minimum:g}")

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        low = (positive and value <= 0) or (minimum is not None and value < minimum)
        if not math.isfinite(value) or low:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return convert


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (not None in ``args``)."""
    names = (spec.name for spec in dataclasses.fields(cls))
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def build_settings(
    cls: type, values: Mapping[str, Any], base: Any = None, named: Optional[Callable[[str], str]] = None
) -> Any:
    """``base.replace(**values)`` (or ``cls(**values)`` without a base); a SettingError becomes a
    ValueError naming the setting, e.g. ``--lr: expected a positive finite number, got -1.0``
    (``named`` turns a field name into the name the user wrote: the option by default, the key
    itself for a specification file). A name that is no field of ``cls``, or a value not of its
    field's type (a string where a number or a flag belongs, a table where a list does;
    :func:`check_type`), is refused first."""
    named = named or option
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if name not in hints or name.startswith("_"):
            raise ValueError(f"{named(name)}: not a setting of {cls.__name__}")
        check_type(name, value, hints[name], named)
    try:
        return base.replace(**values) if base is not None else cls(**values)
    except SettingError as error:
        raise ValueError(f"{named(error.field)}: {error.message}") from None


def check_type(name: str, value: Any, kind: Any, named: Optional[Callable[[str], str]] = None) -> None:
    """ValueError naming the setting ``name`` (as ``named`` writes it: the option by default)
    unless ``value`` has the type ``kind`` (a field's annotation: bool, int, float, str,
    ``Optional[...]``, ``tuple[X, ...]`` or ``tuple[X, Y]``, a list standing for a tuple, an int
    for a float). Ranges are the dataclass's to check."""
    if not _is(value, kind):
        raise ValueError(f"{(named or option)(name)}: expected {_describe(kind)}, got {value!r}")


def _is(value: Any, kind: Any) -> bool:
    args = typing.get_args(kind)
    if typing.get_origin(kind) is typing.Union:
        return any(_is(value, arg) for arg in args)
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        kinds = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        return len(kinds) == len(value) and all(_is(v, k) for v, k in zip(value, kinds))
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _describe(kind: Any) -> str:
    args = typing.get_args(kind)
    if typing.get_origin(kind) is typing.Union:
        return " or ".join(_describe(arg) for arg in args)
    if typing.get_origin(kind) is tuple:
        if args[-1] is Ellipsis:
            return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
        return f"a list of {len(args)} numbers"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "none"}
    return names.get(kind, kind.__name__)
