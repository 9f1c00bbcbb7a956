"""Typed method options: each method declares its keyword options once more as a dataclass whose fields carry the
type, the default, a line of help and, for a number, the range it may take (``option(...)``). The registry holds the
dataclass equal to the method's keyword parameters (``leanclip.registry.register_method(options=...)``), so the
command line can read ``--opt KEY=VALUE`` with the field's type (``parse_value``) and list a method's options
(``leanclip methods NAME``) without calling the method.

Types understood: ``bool`` (true/false, 1/0, yes/no), ``int``, ``float`` (finite), ``str``, ``Literal[...]``
(choices), ``tuple[X, ...]`` (comma-separated), ``X | None`` (``none`` reads as None; an empty string stays a
string). Any other type is read as the string given, left to the method's check.

Like the registry it imports no other leanclip module, so every method module can use it without a cycle.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class OptionRange:
    """The values a numeric method option may take, declared with the method (``option(range=...)`` or
    ``register_method(ranges=...)``): ``kind`` int or float, bounds ``lo`` / ``hi`` (inclusive unless ``lo_open`` /
    ``hi_open``); a float must also be finite, and a bool is neither. None passes (the option's "not given"). The
    ranges hold what needs no model: every size an option can make must be bounded here, so that the command line
    refuses it before the model is built; what depends on the towers (a LoRA rank against the width) stays in the
    method's check."""
    kind: type
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def __str__(self) -> str:
        name, lo, hi = ("an int", int(self.lo), int(self.hi)) if self.kind is int else \
            ("a finite number", f"{self.lo:g}", f"{self.hi:g}")
        return f"{name} in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"

    def admits(self, value) -> bool:
        if value is None:
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else int):
            return False
        if self.kind is float and not math.isfinite(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below


def option(default, help: str, *, range: OptionRange | None = None, set_by: str | None = None) -> Any:
    """A field of a method's options dataclass: its ``default`` (the method's keyword default), one line of
    ``help``, its numeric ``range`` and, for an option the command line fills in itself rather than from ``--opt``
    (the class names, the tokenizer, ``--tower``), what sets it (``set_by``)."""
    if range is not None and not isinstance(range, OptionRange):
        raise TypeError(f"range must be an OptionRange, got {type(range).__name__}")
    return field(default=default, metadata={"help": help, "range": range, "set_by": set_by})


def option_fields(options: type) -> dict[str, dataclasses.Field]:
    """``{name: field}`` of an options dataclass, in declaration order."""
    return {f.name: f for f in dataclasses.fields(options)}


def option_types(options: type) -> dict[str, Any]:
    """``{name: type}`` of an options dataclass, its string annotations resolved in the module that declares it."""
    return typing.get_type_hints(options)


def option_defaults(options: type) -> dict[str, Any]:
    return {name: f.default for name, f in option_fields(options).items()}


def recorded_option(model, options: type, name: str):
    """The value of option ``name`` (a field of ``options``) that ``model`` was prepared with: the one given to
    ``prepare`` (which records only the options given, in ``model.leanclip_info["options"]``), else the field's
    default. For what reads an option after ``prepare`` returned: a loss term, a trainer."""
    given = (getattr(model, "leanclip_info", None) or {}).get("options") or {}
    return given[name] if name in given else option_fields(options)[name].default


def ranges_of(options: type) -> dict[str, OptionRange]:
    """The ranges the fields of ``options`` declare."""
    return {name: f.metadata["range"] for name, f in option_fields(options).items()
            if f.metadata.get("range") is not None}


def _optional(tp) -> tuple[Any, bool]:
    """(the type without None, whether None was allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True
    return tp, False


def describe(tp) -> str:
    """What a value of type ``tp`` looks like on the command line, in a few words (``int``, ``float``,
    ``true/false``, ``one of a, b``, ``comma-separated ...``; ``... or none``)."""
    inner, optional = _optional(tp)
    origin = typing.get_origin(inner)
    if inner is bool:
        what = "true/false"
    elif inner in (int, float, str):
        what = inner.__name__
    elif origin is Literal:
        what = "one of " + ", ".join(map(str, typing.get_args(inner)))
    elif origin is tuple:
        item = typing.get_args(inner)[0]
        choices = typing.get_args(item) if typing.get_origin(item) is Literal else ()
        what = f"a comma-separated list of {', '.join(map(str, choices)) if choices else describe(item)}"
    else:
        what = "str"
    return f"{what} or none" if optional else what


def parse_value(tp, raw: str):
    """``raw`` (a command-line string) as a value of ``tp``; ValueError (its text: what was expected) otherwise."""
    inner, optional = _optional(tp)
    if optional and raw.strip().lower() == "none":
        return None
    origin = typing.get_origin(inner)
    try:
        if inner is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
        if inner is int:
            return int(raw)
        if inner is float:
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError
            return value
        if origin is Literal:
            by_text = {str(c): c for c in typing.get_args(inner)}
            if raw not in by_text:
                raise ValueError
            return by_text[raw]
        if origin is tuple:
            return tuple(parse_value(typing.get_args(inner)[0], x.strip()) for x in raw.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"expected {describe(tp)}") from None
    return raw


def signature_options(name: str, defaults: dict, ranges: dict, set_by: dict) -> type:
    """An options dataclass for a method registered without one: each keyword option typed as its default's type
    (a declared range's kind where the default is None), without help."""
    made = []
    for key, default in defaults.items():
        r = ranges.get(key)
        tp = (r.kind | None if default is None else r.kind) if r is not None else \
            (type(default) if isinstance(default, (bool, int, float, str)) else
             tuple[str, ...] if isinstance(default, tuple) else Any)
        made.append((key, tp, option(default, "", range=r, set_by=set_by.get(key))))
    return dataclasses.make_dataclass(f"{name.replace('-', '_')}_options", made, frozen=True)
