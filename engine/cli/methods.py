"""``leanclip methods [NAME]``: the registered PEFT methods, one line each; with NAME, that method's options (name,
type, default, range, help: its options dataclass, ``leanclip.options``) and traits (tasks, trainer, mergeable).

Everything shown comes from the registry, so a method module added to ``leanclip.methods`` is listed without
touching this command. ``--json`` prints the same as one JSON object.
"""
from __future__ import annotations

import json
import re

from leanclip.cli.common import UsageError
from leanclip.methods import METHOD_OPTIONS, METHOD_TRAITS, METHODS, parse_method  # importing it registers every method
from leanclip.options import describe, option_fields, option_types
from leanclip.registry import option_range


def add_arguments(p) -> None:
    p.description = ("List the PEFT methods (one line each), or with NAME one method's options for --opt KEY=VALUE "
                     "(type, default, range, help) and its traits.")
    p.add_argument("name", metavar="NAME", nargs="?", default=None,
                   help="a method (or an a+b combination: each component in turn)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _summary(name: str) -> str:
    """The first sentence of the method function's docstring: what it trains."""
    doc = " ".join((METHODS[name].__doc__ or "").replace("``", "").split())
    first = re.split(r"\.\s+(?=[A-Z(])", doc)[0].rstrip(".")
    return first if len(first) <= 100 else first[:97] + "..."


def _traits(name: str) -> dict:
    t = METHOD_TRAITS[name]
    return {"trainer": t.trainer, "tasks": list(t.tasks), "mergeable": t.mergeable, "alone": t.alone,
            "closed_set": t.closed_set}


def _options(name: str) -> list[dict]:
    """One row per option of ``name``: what ``--opt`` reads (or what sets it instead)."""
    cls = METHOD_OPTIONS[name]
    types = option_types(cls)
    rows = []
    for key, f in option_fields(cls).items():
        r = option_range(name, key)
        set_by = f.metadata.get("set_by")
        rows.append({"name": key, "type": f"set by {set_by}" if set_by else describe(types[key]),
                     "default": f.default, "range": str(r).partition(" in ")[2] if r is not None else None,
                     "help": f.metadata.get("help", "")})
    return rows


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


def _describe(name: str) -> str:
    t = _traits(name)
    head = (f"{name}: {_summary(name)}\n"
            f"trainer {t['trainer']}; tasks {', '.join(t['tasks'])}; mergeable {'yes' if t['mergeable'] else 'no'}"
            + ("; alone (combines with no other method)" if t["alone"] else "")
            + ("; closed set (classifies its training classes only)" if t["closed_set"] else ""))
    rows = _options(name)
    if not rows:
        return head + "\nno options"
    table = [["option", "type", "default", "range", "help"]] + [
        [r["name"], r["type"], "-" if r["default"] is None else _shown(r["default"]), r["range"] or "-", r["help"]]
        for r in rows]
    return head + "\noptions (--opt KEY=VALUE):\n" + _table(table)


def _shown(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def run(args) -> int:
    if args.name is None:
        names = sorted(METHODS)
        if args.json:
            print(json.dumps({n: {"summary": _summary(n), **_traits(n)} for n in names}, indent=1))
        else:
            print(_table([[n, _traits(n)["trainer"], ",".join(_traits(n)["tasks"]), _summary(n)] for n in names]))
        return 0
    try:
        parts = parse_method(args.name)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.json:
        print(json.dumps({p: {"summary": _summary(p), **_traits(p), "options": _options(p)} for p in parts},
                         indent=1, default=str))
    else:
        print("\n\n".join(_describe(p) for p in parts))
    return 0
