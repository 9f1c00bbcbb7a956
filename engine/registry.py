"""The method registry: which PEFT methods exist, their option checks and their traits (which trainer runs them,
which tasks use them, their optimisation defaults), and how a ``a+b`` combination is parsed and checked.

It imports no other leanclip module but ``leanclip.options`` (typed options, which imports none), so every method module can register itself here without a cycle;
``leanclip.methods`` imports the method modules and applies them (``prepare``).
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from typing import Callable

from leanclip.options import OptionRange, option_defaults, ranges_of, signature_options

METHODS: dict[str, Callable[..., dict]] = {}
TRAINERS = ("backprop", "cached")
TASKS = ("classify", "contrastive")
# Where a module a method adds plugs into the features (``leanclip.features``, ``leanclip.contrastive``):
#   image_features  f -> f on the (unnormalized) image features (CLIP-Adapter)
#   prompts         the class prompts of the text tower (a CoOp prompt learner)
#   image_prompts   class prompts conditioned on each image's normalized feature (CoCoOp): logits per image; it
#                   replaces the class prompts, so it excludes ``prompts``
#   logits          image features -> class logits, replacing the cosine classifier (a linear probe)
#   image_logit, text_logit   a map on each side before the scaled cosine (LLU)
#   temperature     the contrastive logit scale (LilT's learnable temperature)
HOOK_ROLES = ("image_features", "prompts", "image_prompts", "logits", "image_logit", "text_logit", "temperature")
# roles that replace the same part of the model: a combination may give only one of each group
_SAME_PART = {"image_prompts": "prompts"}


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
    hooks: ``{role: name}``: the module the method adds as ``model.<name>`` plays ``role`` (one of ``HOOK_ROLES``)
        in the features and logits; a combination may give each role to one component only.
    loss_terms: factories ``make(ctx) -> term | None`` of extra loss terms: ``ctx`` holds the model, classnames,
        templates, tokenizer, the train config, device and precision at the start of a run (before a resume loads
        the weights); ``term(txt) -> (name, scalar tensor)`` is added to every optimizer step's loss, ``txt`` being
        that step's class text features (CLIPFit's distillation to the zero-shot features).
    contrastive_defaults: optimisation defaults for the contrastive task (``lr``), as ``train_defaults``.
    template_set: the per-dataset prompt templates its paper's code trains with (``leanclip.templates.TEMPLATE_SETS``);
        None: CoOp's.
    mergeable: what it trains folds into the model's own weights (``leanclip.merge`` gives a plain model with equal
        outputs): the weights themselves (ln, bitfit, clipfit, full) or a weight delta (lora). A method that adds
        modules a plain model has no place for (prompts, heads, adapters) is not.
    gradient_rule: a factory ``make(ctx) -> rule | None`` (``ctx`` as for ``loss_terms``) of a rule that changes the
        step's gradient between the backward and the optimizer step (ProGrad's projection): ``rule.loss(img, logits)``
        is an auxiliary loss on each micro-batch's normalized image features and logits whose gradient the step keeps
        apart from the training loss's, and ``rule.apply(grads, aux_grads)`` returns the gradients the optimizer
        uses (per trainable parameter, None where a parameter has none). At most one per combination.
    """
    trainer: str = "backprop"
    tasks: tuple = TASKS
    alone: bool = False
    train_defaults: dict = field(default_factory=dict)
    closed_set: bool = False
    hooks: dict = field(default_factory=dict)
    loss_terms: tuple = ()
    contrastive_defaults: dict = field(default_factory=dict)
    template_set: str | None = None
    mergeable: bool = False
    gradient_rule: Callable | None = None


METHOD_TRAITS: dict[str, MethodTraits] = {}
# Per method: check(model, **opts) validating options and towers before prepare changes anything.
METHOD_CHECKS: dict[str, Callable[..., None]] = {}


# Per method: {option: OptionRange}; prepare checks them before the method's check, the command line when it reads
# ``--opt KEY=VALUE``.
METHOD_RANGES: dict[str, dict[str, OptionRange]] = {}
# Per method: its options dataclass (``leanclip.options``), declared or made from its signature.
METHOD_OPTIONS: dict[str, type] = {}
# What sets the options a method may take that ``--opt`` does not: a method registered without a dataclass gets these.
CONTEXT_OPTIONS = {"tower": "--tower", "classnames": "the dataset's class names", "tokenizer": "the model's tokenizer",
                   "templates": "the prompt templates of the run"}


def register_method(name: str, fn: Callable | None = None, *, overwrite: bool = False,
                    check: Callable | None = None, traits: MethodTraits | None = None,
                    ranges: dict[str, OptionRange] | None = None, options: type | None = None):
    """Register ``fn(model, **opts) -> dict[str, nn.Module]`` as method ``name`` (usable as a decorator).

    ``check(model, **opts)`` (optional) validates the options and the model's towers for the method without
    changing anything (ValueError) and may return one-line notices (a list of str) that ``prepare`` shows once
    everything is validated; ``prepare`` runs the checks of every component before it changes the model. It
    receives every option of ``fn`` (defaults filled in). ``traits`` (:class:`MethodTraits`, default: a backprop
    method for every task) tells the trainers and the CLI how to run it. ``ranges`` (``{option: OptionRange}``)
    bounds its numeric options (:func:`check_option_ranges`). ``options`` is a dataclass of the same options
    (``leanclip.options.option``: type, default, help, range), held equal to ``fn``'s keyword parameters, names and
    defaults: the command line types ``--opt`` from it and ``leanclip methods NAME`` lists it. Without one, the
    options are typed from their defaults."""
    traits = traits or MethodTraits()
    ranges = dict(ranges or {})
    if not all(isinstance(r, OptionRange) for r in ranges.values()):
        raise TypeError(f"ranges of {name!r}: each must be an OptionRange")
    if traits.trainer not in TRAINERS or not set(traits.tasks) <= set(TASKS):
        raise ValueError(f"traits of {name!r}: trainer must be one of {TRAINERS}, tasks a subset of {TASKS}")
    if not set(traits.hooks) <= set(HOOK_ROLES) or not all(callable(f) for f in traits.loss_terms):
        raise ValueError(f"traits of {name!r}: hook roles must be among {HOOK_ROLES}, loss terms callables")
    if traits.gradient_rule is not None and not callable(traits.gradient_rule):
        raise ValueError(f"traits of {name!r}: gradient_rule must be a callable (a rule factory) or None")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
        raise ValueError(f"method name must be lowercase letters, digits, '-' or '_' (no '+'), got {name!r}")
    if check is not None and not callable(check):
        raise TypeError("check must be callable")

    def deco(f):
        if not callable(f):
            raise TypeError("a method must be callable")
        if name in METHODS and not overwrite and METHODS[name] is not f:
            raise ValueError(f"method {name!r} is already registered")
        undeclared = sorted(set(ranges) - set(_keyword_options(f)))
        if undeclared:
            raise ValueError(f"ranges of {name!r} name options the method does not take: {undeclared}")
        declared = _options_class(name, f, options, ranges)
        METHODS[name] = f
        METHOD_TRAITS[name] = traits
        METHOD_RANGES[name] = {**ranges_of(declared), **ranges}
        METHOD_OPTIONS[name] = declared
        if check is not None:
            METHOD_CHECKS[name] = check
        elif overwrite:
            METHOD_CHECKS.pop(name, None)
        return f

    return deco(fn) if fn is not None else deco


def _options_class(name: str, fn: Callable, options: type | None, ranges: dict) -> type:
    """``options`` checked against ``fn``'s keyword options (the same names, in any order, and the same defaults),
    or a dataclass made from them."""
    keywords = _keyword_options(fn)
    if options is None:
        return signature_options(name, keywords, ranges, CONTEXT_OPTIONS)
    if not (isinstance(options, type) and dataclasses.is_dataclass(options)):
        raise TypeError(f"options of {name!r} must be a dataclass, got {options!r}")
    declared = option_defaults(options)
    if set(declared) != set(keywords):
        raise ValueError(f"options of {name!r}: {options.__name__} declares {sorted(declared)}, the method takes "
                         f"{sorted(keywords)}")
    differ = [k for k in keywords if declared[k] != keywords[k]]
    if differ:
        raise ValueError(f"options of {name!r}: {options.__name__} and the method default {differ[0]} differently "
                         f"({declared[differ[0]]!r} and {keywords[differ[0]]!r})")
    return options


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
    roles: dict[str, str] = {}
    for p in parts:
        for role in METHOD_TRAITS[p].hooks:
            part = _SAME_PART.get(role, role)
            if part in roles and role != "temperature":  # one shared temperature: the components add it once
                raise ValueError(f"method {method!r}: {roles[part]!r} and {p!r} both replace the {part} "
                                 "of the model; combine at most one of them")
            roles.setdefault(part, p)
    per_image = next((p for p in parts if "image_prompts" in METHOD_TRAITS[p].hooks), None)
    terms = [p for p in parts if METHOD_TRAITS[p].loss_terms]
    if per_image and terms:  # a loss term reads the step's one set of class text features; these are per image
        raise ValueError(f"method {method!r}: {terms[0]!r} adds loss terms on the class text features, which "
                         f"{per_image!r} makes per image; combine at most one of them")
    rules = [p for p in parts if METHOD_TRAITS[p].gradient_rule is not None]
    if len(rules) > 1:
        raise ValueError(f"method {method!r}: {rules[0]!r} and {rules[1]!r} each change the step's gradient; "
                         "combine at most one of them")
    return parts


def method_hooks(model) -> dict:
    """``{role: module}`` of the modules the method ``model`` was prepared with plays in the features (see
    :class:`MethodTraits`); empty for a model ``prepare`` never saw."""
    info = getattr(model, "leanclip_info", None)
    if not info or not info.get("method"):
        return {}
    out = {}
    for p in parse_method(info["method"]):
        for role, name in METHOD_TRAITS[p].hooks.items():
            module = getattr(model, name, None)
            if module is not None:
                out.setdefault(role, module)
    return out


def method_loss_terms(method) -> list:
    """The extra-loss factories the components of ``method`` declare (see :class:`MethodTraits`), in order."""
    return [make for p in parse_method(method) for make in METHOD_TRAITS[p].loss_terms]


def method_gradient_rule(method) -> Callable | None:
    """The gradient-rule factory a component of ``method`` declares (see :class:`MethodTraits`), or None."""
    return next((METHOD_TRAITS[p].gradient_rule for p in parse_method(method)
                 if METHOD_TRAITS[p].gradient_rule is not None), None)


def method_template_set(method) -> str | None:
    """The prompt-template set the components of ``method`` declare (the last one that declares one), or None."""
    sets = [METHOD_TRAITS[p].template_set for p in parse_method(method) if METHOD_TRAITS[p].template_set]
    return sets[-1] if sets else None


def method_contrastive_defaults(method) -> dict:
    """The contrastive-task optimisation defaults the components of ``method`` declare (later components win)."""
    out = {}
    for p in parse_method(method):
        out.update(METHOD_TRAITS[p].contrastive_defaults)
    return out


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


def _keyword_options(fn: Callable) -> dict:
    sig = inspect.signature(fn)
    return {k: (None if v.default is inspect.Parameter.empty else v.default)
            for k, v in list(sig.parameters.items())[1:] if v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)}


def method_options(name: str) -> dict:
    """The options (keyword parameters with defaults) method ``name`` accepts."""
    return _keyword_options(METHODS[name])


def option_range(name: str, option: str) -> OptionRange | None:
    """The range method ``name`` declares for ``option`` (None: undeclared)."""
    return METHOD_RANGES.get(name, {}).get(option)


def check_option_ranges(name: str, opts: dict) -> None:
    """ValueError naming the first option of ``opts`` outside the range method ``name`` declares for it."""
    for option, value in opts.items():
        r = option_range(name, option)
        if r is not None and not r.admits(value):
            raise ValueError(f"method {name!r}: {option} must be {r}, got {value!r}")
