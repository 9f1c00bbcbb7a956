"""PEFT methods on open_clip CLIP models: ``prepare(model, method, **opts)`` (in place).

``prepare`` validates everything first (method names, options, each method's check, the towers, the ``init_from``
file, whether the lean modules cover the model), then freezes every parameter, optionally loads a trainable-only
checkpoint (``init_from``, "LN as initialization"), lets the method unlock parameters / add modules, swaps in the
lean modules (``leanclip.lean``), optionally keeps frozen weights in bf16, and records ``model.leanclip_info``. An error
after the model was touched (e.g. no recompute policy fits the budget) restores it exactly.

Towers: ViT towers of open_clip get the lean modules. Other towers (timm towers such as SigLIP / EVA / ConvNeXt,
ModifiedResNet, Hugging Face text encoders) get every method that is defined on them with open_clip's plain modules
(``lean=None`` falls back with a one-line notice); a method that is not defined on a tower (``clipfit`` without image
LayerNorms or text ``mlp.c_proj.bias``, ``coop`` without open_clip token embeddings, ``lilt-adapter`` without open_clip
blocks, ``ln`` on a tower without LayerNorms) is a ValueError naming the tower class.

Method registry
---------------
``METHODS`` maps a name to ``fn(model, **opts) -> dict[str, nn.Module]``. ``fn`` unlocks existing parameters
(``requires_grad_(True)``) and returns the modules to add; ``prepare`` attaches each as ``model.<name>`` (their
parameters are trainable unless ``fn`` froze some). The options a method accepts are its keyword parameters
(``tower``, ``classnames`` and ``tokenizer`` are passed to methods that declare them); anything else is a ValueError.
``METHOD_CHECKS`` holds an optional ``check(model, **opts)`` per method that validates option values and the towers
without changing anything. Adding a method is one registration::

    @register_method("lilt-ln", check=_check_lilt_ln)
    def _lilt_ln(model, tower="both"):
        _unlock(model, ..., tower)
        return {}

Combinations are written ``a+b`` (e.g. ``ln+coop``): the components are applied in order and trained together.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from leanclip import heads as _heads
from leanclip.configs import register_tiny_config  # noqa: F401  (re-exported for convenience)
from leanclip import lean as _lean

TOWERS = ("image", "text", "both")

# Anchored parameter-name patterns (open_clip names; CLIP flattens the text tower at top level, CustomTextCLIP
# keeps it under "text.").
IMAGE_RE = re.compile(r"^visual\.")
TEXT_RE = re.compile(r"^(?:text\.|transformer\.|token_embedding\.|positional_embedding$|ln_final\.|"
                     r"text_projection(?:$|\.))")
BIAS_RE = re.compile(r"(?:^|\.)(?:bias|in_proj_bias)$")
CLIPFIT_TEXT_RE = re.compile(r"^(?:text\.)?transformer\.resblocks\.\d+\.mlp\.c_proj\.bias$")

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
# Options handled by prepare itself (not passed to method functions).
PREPARE_OPTIONS = ("lean", "recompute", "memory_budget", "tower", "classnames", "tokenizer", "init_from",
                   "frozen_dtype", "model_name", "batch_size", "text_batch_size", "text_len")
_CONTEXT_ARGS = ("tower", "classnames", "tokenizer")


def version() -> str:
    try:
        import leanclip
        return str(leanclip.__version__)
    except Exception:  # pragma: no cover
        return "0.1.0"


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


# ----------------------------------------------------------------------------------------------------------- helpers
def tower_of(name: str) -> str | None:
    """``"image"``, ``"text"`` or None (logit_scale, added heads) for an open_clip parameter/module name."""
    if IMAGE_RE.match(name):
        return "image"
    if TEXT_RE.match(name):
        return "text"
    return None


def _in_tower(name: str, tower: str) -> bool:
    t = tower_of(name)
    return t is not None and (tower == "both" or t == tower)


def check_tower(tower) -> str:
    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
    return tower


def _notice(message: str) -> None:
    """A one-line notice: a UserWarning attributed to the first caller outside this package (capturable by tests,
    ``logging.captureWarnings`` and ``-W error``)."""
    here = os.path.dirname(os.path.abspath(__file__))
    level, frame = 2, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(here + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"leanclip: {message}", UserWarning, stacklevel=level)


def tower_class(model: nn.Module, tower: str) -> str:
    """The class name (``module.QualName``) of ``model``'s ``"image"`` or ``"text"`` tower, as errors name it. CLIP
    keeps its text transformer at top level, so its text tower is named by the model class."""
    if tower == "image":
        return _lean.class_name(getattr(model, "visual", None))
    t = _lean.text_tower(model)
    if t is not None:
        return _lean.class_name(t.module) + (" (flattened text transformer)" if t.module is model else "")
    text = getattr(model, "text", None)
    return _lean.class_name(text if text is not None else model)


def names_matching(model: nn.Module, pattern: re.Pattern, tower: str) -> list[str]:
    return [n for n, _ in model.named_parameters() if pattern.search(n) and _in_tower(n, tower)]


def layernorm_names(model: nn.Module, tower: str = "both") -> list[str]:
    """Names of the weight and bias of every LayerNorm (open_clip's and timm's subclasses included) in ``tower``."""
    params = {id(p): n for n, p in model.named_parameters()}
    out = []
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            for p in m.parameters(recurse=False):
                n = params.get(id(p))
                if n is not None and _in_tower(n, tower):
                    out.append(n)
    return out


def _unlock_names(model: nn.Module, names: Iterable[str]) -> int:
    n = 0
    for name in names:
        model.get_parameter(name).requires_grad_(True)
        n += 1
    return n


def unlock(model: nn.Module, pattern: str | re.Pattern, tower: str = "both") -> int:
    """Set requires_grad on parameters whose name matches ``pattern`` (re.search; anchor it) inside ``tower``.
    Returns the number of tensors unlocked."""
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    return _unlock_names(model, names_matching(model, rx, tower))


def unlock_layernorms(model: nn.Module, tower: str = "both") -> int:
    """Unlock the weight and bias of every LayerNorm (open_clip's subclasses included) inside ``tower``."""
    return _unlock_names(model, layernorm_names(model, tower))


def check_coverage(model: nn.Module, method: str, names: list[str], tower: str, what: str) -> list[str]:
    """A method that trains ``what`` (the parameter ``names`` it would unlock) in ``tower``: ValueError naming the
    tower class when a tower asked for alone (or both) has none; a notice (returned) when only one of ``both`` has
    none (e.g. ``ln`` on a ModifiedResNet image tower, which has no LayerNorm, trains the text tower's)."""
    towers = ("image", "text") if tower == "both" else (tower,)
    empty = [t for t in towers if not any(tower_of(n) == t for n in names)]
    if len(empty) == len(towers):
        found = " and ".join(f"the {t} tower {tower_class(model, t)}" for t in empty)
        raise ValueError(f"method {method!r} trains {what}, and {found} has none")
    return [f"method {method!r}: the {t} tower {tower_class(model, t)} has no {what}; only the other tower's are "
            f"trained" for t in empty]


def require_open_clip_tower(model: nn.Module, method: str, tower: str, why: str) -> None:
    """ValueError naming the tower class unless every tower in ``tower`` is an open_clip transformer tower
    (``VisionTransformer`` image tower, open_clip text transformer)."""
    from open_clip.transformer import VisionTransformer

    for t in ("image", "text") if tower == "both" else (tower,):
        ok = (isinstance(getattr(model, "visual", None), VisionTransformer) if t == "image"
              else _lean.text_tower(model) is not None)
        if not ok:
            kind = "an open_clip VisionTransformer" if t == "image" else "an open_clip transformer text tower"
            raise ValueError(f"method {method!r} needs {kind} ({why}); the {t} tower is {tower_class(model, t)}")


def embed_dim(model: nn.Module) -> int:
    """The joint embedding width: ``visual.output_dim`` (open_clip ViT and ModifiedResNet), else the width of the
    text projection (towers without ``output_dim``, e.g. timm ones)."""
    dim = getattr(getattr(model, "visual", None), "output_dim", None)
    if dim is None:
        t = _lean.text_tower(model)
        proj = t.text_projection if t is not None else None
        if isinstance(proj, nn.Linear):
            dim = proj.out_features
        elif isinstance(proj, torch.Tensor) and proj.dim() == 2:
            dim = proj.shape[1]
        else:
            dim = getattr(getattr(model, "text", None), "output_dim", None)
    if dim is None:
        raise ValueError(f"cannot determine the embedding width of {_lean.class_name(model)} (no visual.output_dim, "
                         f"text projection or text.output_dim); the image tower is {tower_class(model, 'image')}")
    return int(dim)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs that require grad, in ``named_parameters`` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for _, p in trainable_parameters(model))


def _require(method: str, **values):
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise ValueError(f"method {method!r} needs {' and '.join(missing)} (got None)")


# ----------------------------------------------------------------------------------------------------------- checks
# Each runs before prepare changes anything: option values and what the method needs of the towers.
def _check_ln(model, tower="both", **_):
    return check_coverage(model, "ln", layernorm_names(model, check_tower(tower)), tower, "LayerNorms")


def _check_bitfit(model, tower="both", **_):
    return check_coverage(model, "bitfit", names_matching(model, BIAS_RE, check_tower(tower)), tower, "biases")


def _check_clipfit(model, **_):
    if not layernorm_names(model, "image"):
        raise ValueError(f"method 'clipfit' trains the image tower's LayerNorms, and the image tower "
                         f"{tower_class(model, 'image')} has none")
    if not names_matching(model, CLIPFIT_TEXT_RE, "text"):
        raise ValueError(f"method 'clipfit' trains the text tower's transformer.resblocks.*.mlp.c_proj.bias, and the "
                         f"text tower {tower_class(model, 'text')} has none")


def _check_llu(model, beta=0.5, gamma=20.0, **_):
    _heads.check_llu_options(beta, gamma)
    embed_dim(model)


def _probe_classes(classnames, num_classes) -> int:
    """The number of classes of a linear probe: len(classnames) (num_classes must agree) or num_classes."""
    if classnames is not None:
        classnames = list(classnames)
        if not classnames:
            raise ValueError("classnames must not be empty")
        if num_classes is not None and num_classes != len(classnames):
            raise ValueError(f"num_classes={num_classes} but {len(classnames)} classnames were given")
        c = len(classnames)
    elif num_classes is not None:
        c = num_classes
    else:
        raise ValueError("method 'linear-probe' needs classnames or num_classes")
    if isinstance(c, bool) or not isinstance(c, int) or c < 1:
        raise ValueError(f"num_classes must be a positive int, got {c!r}")
    return c


def _check_linear_probe(model, classnames=None, tokenizer=None, num_classes=None, templates=None, **_):
    from leanclip.features import _check_templates

    _probe_classes(classnames, num_classes)
    _check_templates(templates or ["a photo of a {}."])
    embed_dim(model)


def _check_coop(model, classnames=None, tokenizer=None, n_ctx=4, init_text="a photo of a", std=0.02, **_):
    _require("coop", classnames=classnames, tokenizer=tokenizer)
    if not list(classnames):
        raise ValueError("classnames must not be empty")
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
        raise ValueError(f"n_ctx must be a positive int, got {n_ctx!r}")
    if init_text is not None and not isinstance(init_text, str):
        raise ValueError(f"init_text must be a string or None, got {type(init_text).__name__}")
    _heads.check_std(std)
    require_open_clip_tower(model, "coop", "text", "token embeddings to splice the learned context into")


def _check_adapter(model, reduction=4, ratio=0.2, **_):
    _heads.check_adapter_options(embed_dim(model), reduction, ratio)


# ----------------------------------------------------------------------------------------------------------- methods
@register_method("ln", check=_check_ln)
def _ln(model, tower="both"):
    """Every LayerNorm weight+bias (ln_pre, ln_1, ln_2, ln_post, ln_final) of ``tower``."""
    unlock_layernorms(model, check_tower(tower))
    return {}


@register_method("bitfit", check=_check_bitfit)
def _bitfit(model, tower="both"):
    """Every bias of ``tower``, incl. ``attn.in_proj_bias`` and the LayerNorm biases."""
    unlock(model, BIAS_RE, check_tower(tower))
    return {}


@register_method("clipfit", check=_check_clipfit)
def _clipfit(model):
    """Text ``transformer.resblocks.*.mlp.c_proj.bias`` + every image LayerNorm (ln_pre, ln_1, ln_2, ln_post)."""
    unlock(model, CLIPFIT_TEXT_RE, "text")
    unlock_layernorms(model, "image")
    return {}


@register_method("full", traits=MethodTraits(alone=True))
def _full(model):
    """Every parameter (the baseline)."""
    for p in model.parameters():
        p.requires_grad_(True)
    return {}


@register_method("llu", check=_check_llu, traits=MethodTraits(
    trainer="cached", tasks=("classify",), alone=True,
    train_defaults={"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0, "batch_size": 256, "warmup_epochs": 0}))
def _llu(model, beta=0.5, gamma=20.0):
    """Encoders frozen; identity-initialised affine maps on the image and text embeddings (``heads.LLUHead``)."""
    e = embed_dim(model)
    return {"llu_image": _heads.LLUHead(e, beta, gamma), "llu_text": _heads.LLUHead(e, beta, gamma)}


@register_method("linear-probe", check=_check_linear_probe, traits=MethodTraits(
    tasks=("classify",), closed_set=True,
    train_defaults={"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0, "warmup_epochs": 0}))
def _linear_probe(model, classnames=None, tokenizer=None, num_classes=None, templates=None):
    """Linear head E -> C on normalized image features, initialised from the zero-shot class text weights
    (``logit_scale.exp() * text_features``, so it starts at zero-shot accuracy) when classnames and tokenizer are
    given, else zeros. C = len(classnames) or ``num_classes``."""
    c = _probe_classes(classnames, num_classes)
    weight = None
    if classnames is not None and tokenizer is not None:
        from leanclip.features import frozen_text_features

        zs = frozen_text_features(model, list(classnames), templates or ["a photo of a {}."], tokenizer)
        weight = (model.logit_scale.detach().float().exp() * zs.float()).cpu()
    head = _heads.LinearProbe(embed_dim(model), c, weight=weight)
    dev = next(model.parameters()).device
    return {"linear_probe": head.to(dev)}


@register_method("coop", check=_check_coop, traits=MethodTraits(tasks=("classify",)))
def _coop(model, classnames=None, tokenizer=None, n_ctx=4, init_text="a photo of a", std=0.02):
    """CoOp learned prompt context (n_ctx vectors; from the token embeddings of ``init_text`` when it has exactly
    n_ctx tokens - "a photo of a" for n_ctx=4 - else N(0, std^2)); class names appended. Needs classnames, a
    tokenizer and an open_clip transformer text tower."""
    _check_coop(model, classnames, tokenizer, n_ctx, init_text, std)
    classnames = list(classnames)
    t = _lean.text_tower(model)
    width = t.token_embedding.weight.shape[1]
    init = None
    if init_text:
        tok = torch.as_tensor(tokenizer([init_text]))
        eot = int(tok[0].argmax())
        if eot - 1 == n_ctx:
            with torch.no_grad():
                init = t.token_embedding(tok.to(t.token_embedding.weight.device))[0, 1:1 + n_ctx].float().cpu()
    learner = _heads.PromptLearner(n_ctx, width, init_embeddings=init, std=std)
    learner.classnames = classnames
    return {"prompt_learner": learner.to(t.token_embedding.weight.device)}


@register_method("adapter", check=_check_adapter)
def _adapter(model, reduction=4, ratio=0.2):
    """CLIP-Adapter: residual bottleneck MLP E -> E/reduction -> E (ReLU) on image features, mixed with ``ratio``."""
    e = embed_dim(model)
    dev = next(model.parameters()).device
    return {"clip_adapter": _heads.ClipAdapter(e, reduction, ratio).to(dev)}


# ----------------------------------------------------------------------------------------------------------- prepare
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


def _accepts_any(name: str) -> bool:
    return any(v.kind == v.VAR_KEYWORD for v in inspect.signature(METHODS[name]).parameters.values())


def _split_options(parts: list[str], method: str, opts: dict, context: dict) -> list[dict]:
    per = []
    used = set()
    for p in parts:
        accepted = method_options(p)
        kw = {}
        for k, v in opts.items():
            if k in accepted or _accepts_any(p):
                kw[k] = v
                used.add(k)
        for k, v in context.items():
            if k in accepted or _accepts_any(p):
                kw[k] = v
                used.add(k)
        per.append(kw)
    unknown = sorted(set(opts) - used)
    if unknown:
        valid = sorted(set(PREPARE_OPTIONS) | {k for p in parts for k in method_options(p)})
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; valid options: {valid}")
    if context.get("tower", "both") != "both" and "tower" not in used:
        raise ValueError(f"tower={context['tower']!r} has no effect on method {method!r} (only methods with a "
                         f"tower option: {sorted(n for n in METHODS if 'tower' in method_options(n))})")
    return per


def _check_supported(model: nn.Module) -> None:
    """Any open_clip CLIP-style model: an image tower ``model.visual`` and a text tower (open_clip's transformer,
    flattened in CLIP or ``model.text`` in CustomTextCLIP / CoCa, or another module such as a Hugging Face encoder).
    Which methods and whether the lean modules apply depend on the towers (method checks, ``_choose_lean``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an open_clip model (nn.Module), got {type(model).__name__}")
    has_text = _lean.text_tower(model) is not None or isinstance(getattr(model, "text", None), nn.Module)
    if not isinstance(getattr(model, "visual", None), nn.Module) or not has_text:
        raise ValueError(f"leanclip prepares open_clip CLIP models (an image tower model.visual and a text tower); "
                         f"got {_lean.class_name(model)}")


def _check_recompute_args(lean, recompute, memory_budget, batch_size) -> None:
    if lean is not None and not isinstance(lean, bool):
        raise ValueError(f"lean must be True, False or None (automatic), got {lean!r}")
    _lean.check_policy(recompute, allow_auto=True)
    if memory_budget is not None:
        if recompute != "auto":
            raise ValueError(f"memory_budget is only used with recompute='auto' (got recompute={recompute!r})")
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or not memory_budget > 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    if recompute == "auto":
        if memory_budget is None:
            raise ValueError("recompute='auto' needs memory_budget= (bytes)")
        if batch_size is None:
            raise ValueError("recompute='auto' needs batch_size= (images per step) to predict saved bytes")
    if lean is False and recompute != "none":
        raise ValueError(f"recompute={recompute!r} needs lean=True (the plain model keeps what eager PyTorch keeps)")


def _check_frozen_dtype(frozen_dtype, lean) -> None:
    if frozen_dtype is None:
        return
    if frozen_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"frozen_dtype must be torch.bfloat16, torch.float16, torch.float32 or None, "
                         f"got {frozen_dtype!r}")
    if lean is False:
        raise ValueError("frozen_dtype needs lean=True (open_clip's plain modules cannot mix dtypes)")


def _choose_lean(model: nn.Module, lean: bool | None, recompute: str, frozen_dtype) -> tuple[bool, list[str]]:
    """(whether prepare swaps in the lean modules, notices). ``lean=None`` (automatic) falls back to open_clip's
    plain modules with a one-line notice naming what the lean modules do not cover (``leanclip.lean.lean_obstacles``);
    ``lean=True``, a recompute policy or ``frozen_dtype`` on such a model is a ValueError naming it."""
    if lean is False:
        return False, []
    obstacles = _lean.lean_obstacles(model)
    if not obstacles:
        return True, []
    why = "; ".join(obstacles)
    if lean is True:
        raise ValueError(f"lean=True: the lean modules do not cover this model: {why} (pass lean=False, or leave lean "
                         f"unset to fall back to open_clip's modules)")
    if recompute != "none":
        raise ValueError(f"recompute={recompute!r} needs the lean modules, which do not cover this model: {why}")
    if frozen_dtype is not None:
        raise ValueError(f"frozen_dtype needs the lean modules, which do not cover this model: {why}")
    return False, [f"lean=False for {_lean.class_name(model)}: {why}"]


def _check_classnames(classnames):
    if classnames is None:
        return None
    if isinstance(classnames, str):
        raise ValueError("classnames must be a list of strings, not one string")
    return [str(c) for c in classnames]


def _check_methods(model: nn.Module, parts: list[str], per_opts: list[dict]) -> list[str]:
    """Run every component's check; returns their notices."""
    notices = []
    for p, kw in zip(parts, per_opts):
        check = METHOD_CHECKS.get(p)
        if check is not None:
            notices += check(model, **{**method_options(p), **kw}) or []
    return notices


def _init_from_names(model: nn.Module, path) -> list[str]:
    """Validate a trainable-only checkpoint for ``init_from`` against ``model`` as prepare will see it (without the
    modules a previous prepare added), copying nothing. Returns the parameter names it holds."""
    from leanclip.checkpoint import check_init_from

    added = (getattr(model, "leanclip_info", None) or {}).get("modules", [])
    return check_init_from(model, path, skip_modules=added)


class _ModelState:
    """What ``prepare`` may change, recorded so that a failure midway puts the model back exactly: per module its
    class (lean swaps), attribute dict (``leanclip_info``, recompute policy, hook handles) and the contents of its
    dict/set attributes (parameters, buffers, submodules - added or removed ones -, hooks); per parameter its tensor
    (a ``frozen_dtype`` cast replaces ``.data``) and ``requires_grad``; copies of the values ``init_from``
    overwrites in place. Only the init_from values are copied: the rest is references (no second model in memory)."""

    def __init__(self, model: nn.Module, overwritten: Iterable[str] = ()):
        self.modules = [(m, type(m), dict(m.__dict__),
                         {k: copy.copy(v) for k, v in m.__dict__.items() if isinstance(v, (dict, set))})
                        for m in model.modules()]
        self.params = [(p, p.data, p.requires_grad) for p in model.parameters()]
        self.values = [(p, p.detach().clone()) for p in map(model.get_parameter, overwritten)]

    def restore(self) -> None:
        for m, cls, attrs, containers in self.modules:
            m.__class__ = cls
            m.__dict__.clear()
            m.__dict__.update(attrs)
            for k, saved in containers.items():
                attrs[k].clear()
                attrs[k].update(saved)
        for p, data, flag in self.params:
            p.data = data
            p.requires_grad_(flag)
        with torch.no_grad():
            for p, v in self.values:
                p.copy_(v)


def _jsonable(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return f"<{type(v).__name__}>"


def _remove_added(model: nn.Module) -> None:
    info = getattr(model, "leanclip_info", None) or {}
    for name in info.get("modules", []):
        if name in model._modules:
            del model._modules[name]


def _cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    for name, p in model.named_parameters():
        if not p.requires_grad and p.is_floating_point() and tower_of(name) is not None and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _apply_methods(model: nn.Module, parts: list[str], per_opts: list[dict], init_from) -> dict[str, nn.Module]:
    """Freeze everything (dropping what a previous prepare added), load ``init_from``, apply the components."""
    _remove_added(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if init_from is not None:  # LN-as-initialization
        from leanclip.checkpoint import load_into

        load_into(model, init_from)
    added: dict[str, nn.Module] = {}
    for p, kw in zip(parts, per_opts):
        mods = METHODS[p](model, **kw) or {}
        for name, mod in mods.items():
            if not isinstance(mod, nn.Module):
                raise TypeError(f"method {p!r} returned a non-module for {name!r}")
            if name in added or (hasattr(model, name) and name not in model._modules):
                raise ValueError(f"method {p!r} would overwrite model attribute {name!r}")
            model.add_module(name, mod)
            added[name] = mod
    return added


def prepare(model: nn.Module, method: str, *, lean: bool | None = None, recompute: str = "none",
            memory_budget: int | None = None, tower: str = "both", classnames: Iterable[str] | None = None,
            tokenizer: Callable | None = None, init_from: str | None = None,
            frozen_dtype: torch.dtype | None = None, model_name: str | None = None, batch_size: int | None = None,
            text_batch_size: int | None = None, text_len: int | None = None, **opts) -> nn.Module:
    """Prepare ``model`` (an open_clip CLIP model) for PEFT with ``method``, in place; returns ``model``.

    method          one of ``METHODS`` (``ln``, ``bitfit``, ``clipfit``, ``llu``, ``linear-probe``, ``coop``,
                    ``adapter``, ``full``, ...) or a ``+`` combination (``ln+linear-probe``, ``ln+coop``, ``ln+adapter``)
    lean            None (default): swap in the fused / SDPA modules (``leanclip.lean``) where they cover the model,
                    else keep open_clip's modules with a one-line notice (timm towers, ModifiedResNet, Hugging Face
                    text towers, unknown block types); True: lean or a ValueError naming what is not covered;
                    False: open_clip's plain modules
    recompute       ``none`` | ``mlp`` | ``mlp+qkv`` | ``block`` | ``auto`` (needs ``memory_budget`` bytes and
                    ``batch_size``; picks the fastest policy whose ``estimate_saved_bytes`` fits)
    tower           ``image`` | ``text`` | ``both`` for methods with a tower option (``ln``, ``bitfit``)
    classnames, tokenizer   for ``coop`` (required) and ``linear-probe`` (zero-shot init)
    init_from       path of a trainable-only checkpoint (``save_trainable``) loaded before the method is applied
    frozen_dtype    e.g. ``torch.bfloat16``: frozen tower weights stored in that dtype (trainable ones stay fp32)
    model_name      recorded in ``model.leanclip_info``
    **opts          method options (``n_ctx``, ``beta``, ``gamma``, ``num_classes``, ``reduction``, ``ratio``, ...)

    Methods that are not defined on a tower (``clipfit`` on a tower without LayerNorms, ``coop`` without open_clip
    token embeddings, ...) raise a ValueError naming the tower class. Transactional: every argument, option, the
    towers and the ``init_from`` file are validated before the model is touched, and an error midway (e.g. no
    recompute policy fits ``memory_budget``) restores the model exactly (``_ModelState``).
    """
    _check_supported(model)
    parts = parse_method(method)
    check_tower(tower)
    _check_recompute_args(lean, recompute, memory_budget, batch_size)
    _check_frozen_dtype(frozen_dtype, lean)
    classnames = _check_classnames(classnames)
    per_opts = _split_options(parts, method, opts, {"tower": tower, "classnames": classnames, "tokenizer": tokenizer})
    notices = _check_methods(model, parts, per_opts)
    loaded = _init_from_names(model, init_from) if init_from is not None else []
    lean_on, lean_notices = _choose_lean(model, lean, recompute, frozen_dtype)
    for message in notices + lean_notices:  # everything is validated: say what will differ from the usual
        _notice(message)
    state = _ModelState(model, loaded)
    try:
        added = _apply_methods(model, parts, per_opts, init_from)
        chosen = recompute
        if lean_on:
            if recompute == "auto":
                chosen = _lean.choose_recompute(model, memory_budget, batch_size, text_batch_size=text_batch_size,
                                                text_len=text_len, dtype=frozen_dtype)
            _lean.apply_lean(model, chosen)
        else:
            _lean.remove_lean(model)
        if frozen_dtype is not None:
            _cast_frozen(model, frozen_dtype)
        options = {k: _jsonable(v) for k, v in opts.items()}
        options.update(lean=lean_on, recompute=chosen, tower=tower)
        if recompute == "auto":
            options.update(recompute_requested="auto", memory_budget=int(memory_budget), batch_size=batch_size,
                           text_batch_size=text_batch_size, text_len=text_len)
        if classnames is not None:
            options["classnames"] = classnames
        if frozen_dtype is not None:
            options["frozen_dtype"] = _jsonable(frozen_dtype)
        if init_from is not None:
            options["init_from"] = str(init_from)
        json.dumps(options)  # must stay serialisable (checkpoint metadata)
        model.leanclip_info = {"method": "+".join(parts), "options": options, "model_name": model_name,
                               "version": version(), "modules": list(added)}
    except BaseException:
        state.restore()
        raise
    return model


def method_of(model: nn.Module) -> str | None:
    """The method ``prepare`` applied (``model.leanclip_info["method"]``), or None."""
    info = getattr(model, "leanclip_info", None)
    return info.get("method") if info else None


def method_parts(model: nn.Module) -> list[str]:
    m = method_of(model)
    return m.split("+") if m else []


from leanclip import lilt as _lilt  # noqa: E402,F401  (registers lilt-ln, lilt-bitfit, lilt-adapter, lilt-deep, lit)
from leanclip import lora as _lora_method  # noqa: E402,F401  (registers lora)
from leanclip import houlsby as _houlsby_method  # noqa: E402,F401  (registers houlsby)
from leanclip import compacter as _compacter_method  # noqa: E402,F401  (registers compacter)
