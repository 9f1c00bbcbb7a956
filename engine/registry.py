"""The method registry: which PEFT methods exist, their option checks and their traits (which trainer runs them,
which tasks use them, their optimisation defaults), and how a ``a+b`` combination is parsed and checked.

It imports no other leanclip module, so every method module can register itself here without a cycle;
``leanclip.methods`` imports the method modules and applies them (``prepare``).
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Callable

METHODS: dict[str, Callable[..., dict]] = {}
TRAINERS = ("backprop", "cached")
TASKS = ("classify", "contrastive")


@dataclass(frozen=True)
class MethodTraits:
    """What the rest of the engine needs to know about a method, declared where it is registered.

    trainer: ``"backprop"`` (gradients flow through the towers: ``leanclip.trainer``) or ``"cached"`` (the towers stay
        frozen and their features are computed once: ``leanclip.llu.run_llu``).
    tasks: the tasks whose features use what the method trains (a classification head or a prompt means nothing to
        contrastive image-text alignment).
    alone: cannot be combined with another component (``full`` already trains everything; a cached-feature method
        cannot share a run with one that back-propagates through the towers).
    train_defaults: optimisation defaults (``optimizer``, ``lr``, ``weight_decay``, ``batch_size``,
        ``warmup_epochs``) that replace the CoOp / CLIPFit recipe for this method when the user gives none.
    closed_set: classifies only the classes it was trained on (a linear head), so it cannot be evaluated on others
        (base-to-new's new classes).
    """
    trainer: str = "backprop"
    tasks: tuple = TASKS
    alone: bool = False
    train_defaults: dict = field(default_factory=dict)
    closed_set: bool = False


METHOD_TRAITS: dict[str, MethodTraits] = {}
# Per method: check(model, **opts) validating options and towers before prepare changes anything.
METHOD_CHECKS: dict[str, Callable[..., None]] = {}


def register_method(name: str, fn: Callable | None = None, *, overwrite: bool = False,
                    check: Callable | None = None, traits: MethodTraits | None = None):
    """Register ``fn(model, **opts) -> dict[str, nn.Module]`` as method ``name`` (usable as a decorator).

    ``check(model, **opts)`` (optional) validates the options and the model's towers for the method without
    changing anything (ValueError) and may return one-line notices (a list of str) that ``prepare`` shows once
    everything is validated; ``prepare`` runs the checks of every component before it changes the model. It
    receives every option of ``fn`` (defaults filled in). ``traits`` (:class:`MethodTraits`, default: a backprop
    method for every task) tells the trainers and the CLI how to run it."""
    traits = traits or MethodTraits()
    if traits.trainer not in TRAINERS or not set(traits.tasks) <= set(TASKS):
        raise ValueError(f"traits of {name!r}: trainer must be one of {TRAINERS}, tasks a subset of {TASKS}")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
        raise ValueError(f"method name must be lowercase letters, digits, '-' or '_' (no '+'), got {name!r}")
    if check is not None and not callable(check):
        raise TypeError("check must be callable")

    def deco(f):
        if not callable(f):
            raise TypeError("a method must be callable")
        if name in METHODS and not overwrite and METHODS[name] is not f:
            raise ValueError(f"method {name!r} is already registered")
        METHODS[name] = f
        METHOD_TRAITS[name] = traits
        if check is not None:
            METHOD_CHECKS[name] = check
        elif overwrite:
            METHOD_CHECKS.pop(name, None)
        return f

    return deco(fn) if fn is not None else deco


def set_method_check(name: str, check: Callable) -> None:
    """Attach ``check`` (see ``register_method``) to the registered method ``name``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}")
    if not callable(check):
        raise TypeError("check must be callable")
    METHOD_CHECKS[name] = check


def parse_method(method) -> list[str]:
    """Split ``"a+b"`` into registered component names; ValueError listing the valid ones otherwise."""
    if not isinstance(method, str) or not method.strip():
        raise ValueError(f"method must be a non-empty string; valid: {', '.join(sorted(METHODS))}")
    parts = [p.strip() for p in method.split("+")]
    unknown = [p for p in parts if p not in METHODS]
    if unknown:
        which = f" ({', '.join(map(repr, unknown))})" if len(parts) > 1 else ""
        raise ValueError(f"unknown method {method!r}{which}; valid methods: "
                         f"{', '.join(sorted(METHODS))} and combinations joined with '+' (e.g. 'ln+coop')")
    if len(set(parts)) != len(parts):
        raise ValueError(f"method {method!r} repeats a component")
    alone = [p for p in parts if METHOD_TRAITS[p].alone]
    if alone and len(parts) > 1:
        why = ("trains on features computed once from frozen towers" if METHOD_TRAITS[alone[0]].trainer == "cached"
               else "already trains everything")
        raise ValueError(f"method {method!r}: {alone[0]!r} {why}; it cannot be combined with another component")
    return parts


def method_trainer(method) -> str:
    """``"backprop"`` or ``"cached"``: which trainer runs ``method`` (a name or ``a+b``; see :class:`MethodTraits`)."""
    parts = parse_method(method)
    return "cached" if any(METHOD_TRAITS[p].trainer == "cached" for p in parts) else "backprop"


def method_train_defaults(method) -> dict:
    """The optimisation defaults the components of ``method`` declare (later components win)."""
    out = {}
    for p in parse_method(method):
        out.update(METHOD_TRAITS[p].train_defaults)
    return out


def is_closed_set(method) -> bool:
    """Whether ``method`` classifies only its training classes (see :class:`MethodTraits`)."""
    return any(METHOD_TRAITS[p].closed_set for p in parse_method(method))


def check_task(method, task: str) -> None:
    """ValueError unless every component of ``method`` supports ``task`` (``classify`` or ``contrastive``)."""
    bad = [p for p in parse_method(method) if task not in METHOD_TRAITS[p].tasks]
    if bad:
        ok = sorted(n for n, t in METHOD_TRAITS.items() if task in t.tasks)
        raise ValueError(f"method {method!r}: {bad[0]!r} trains something the {task} task does not use; methods for "
                         f"{task}: {', '.join(ok)}")


def method_options(name: str) -> dict:
    """The options (keyword parameters with defaults) method ``name`` accepts."""
    sig = inspect.signature(METHODS[name])
    return {k: (None if v.default is inspect.Parameter.empty else v.default)
            for k, v in list(sig.parameters.items())[1:] if v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)}
