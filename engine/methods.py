"""PEFT methods on open_clip ViT CLIP models: ``prepare(model, method, **opts)`` (in place).

``prepare`` freezes every parameter, optionally loads a trainable-only checkpoint (``init_from``, "LN as
initialization"), then lets the method unlock parameters / add modules, swaps in the lean modules
(``engine.lean``), optionally keeps frozen weights in bf16, and records ``model.leanclip_info``.

Method registry
---------------
``METHODS`` maps a name to ``fn(model, **opts) -> dict[str, nn.Module]``. ``fn`` unlocks existing parameters
(``requires_grad_(True)``) and returns the modules to add; ``prepare`` attaches each as ``model.<name>`` (their
parameters are trainable unless ``fn`` froze some). The options a method accepts are its keyword parameters
(``tower``, ``classnames`` and ``tokenizer`` are passed to methods that declare them); anything else is a ValueError.
Adding a method is one registration::

    @register_method("lilt-ln")
    def _lilt_ln(model, tower="both"):
        _unlock(model, ..., tower)
        return {}

Combinations are written ``a+b`` (e.g. ``ln+coop``): the components are applied in order and trained together.
"""
from __future__ import annotations

import inspect
import json
import re
from typing import Callable, Iterable

import torch
from torch import nn

from engine import heads as _heads
from engine.configs import register_tiny_config  # noqa: F401  (re-exported for convenience)
from engine import lean as _lean

TOWERS = ("image", "text", "both")

# Anchored parameter-name patterns (open_clip names; CLIP flattens the text tower at top level, CustomTextCLIP
# keeps it under "text.").
IMAGE_RE = re.compile(r"^visual\.")
TEXT_RE = re.compile(r"^(?:text\.|transformer\.|token_embedding\.|positional_embedding$|ln_final\.|"
                     r"text_projection(?:$|\.))")
BIAS_RE = re.compile(r"(?:^|\.)(?:bias|in_proj_bias)$")
CLIPFIT_TEXT_RE = re.compile(r"^(?:text\.)?transformer\.resblocks\.\d+\.mlp\.c_proj\.bias$")

METHODS: dict[str, Callable[..., dict]] = {}
# Options handled by prepare itself (not passed to method functions).
PREPARE_OPTIONS = ("lean", "recompute", "memory_budget", "tower", "classnames", "tokenizer", "init_from",
                   "frozen_dtype", "model_name", "batch_size", "text_batch_size", "text_len")
_CONTEXT_ARGS = ("tower", "classnames", "tokenizer")


def version() -> str:
    try:
        import engine

        return str(engine.__version__)
    except Exception:  # pragma: no cover
        return "0.1.0"


def register_method(name: str, fn: Callable | None = None, *, overwrite: bool = False):
    """Register ``fn(model, **opts) -> dict[str, nn.Module]`` as method ``name`` (usable as a decorator)."""
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
        raise ValueError(f"method name must be lowercase letters, digits, '-' or '_' (no '+'), got {name!r}")

    def deco(f):
        if not callable(f):
            raise TypeError("a method must be callable")
        if name in METHODS and not overwrite and METHODS[name] is not f:
            raise ValueError(f"method {name!r} is already registered")
        METHODS[name] = f
        return f

    return deco(fn) if fn is not None else deco


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


def _check_tower(tower) -> str:
    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
    return tower


def unlock(model: nn.Module, pattern: str | re.Pattern, tower: str = "both") -> int:
    """Set requires_grad on parameters whose name matches ``pattern`` (re.search; anchor it) inside ``tower``.
    Returns the number of tensors unlocked."""
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    n = 0
    for name, p in model.named_parameters():
        if rx.search(name) and _in_tower(name, tower):
            p.requires_grad_(True)
            n += 1
    return n


def unlock_layernorms(model: nn.Module, tower: str = "both") -> int:
    """Unlock the weight and bias of every LayerNorm (open_clip's subclasses included) inside ``tower``."""
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.LayerNorm):
            for pn, p in m.named_parameters(recurse=False):
                if _in_tower(f"{name}.{pn}", tower):
                    p.requires_grad_(True)
                    n += 1
    return n


def embed_dim(model: nn.Module) -> int:
    vis = getattr(model, "visual", None)
    dim = getattr(vis, "output_dim", None)
    if dim is None:
        raise ValueError("cannot determine the embedding dim (model.visual.output_dim)")
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


# ----------------------------------------------------------------------------------------------------------- methods
@register_method("ln")
def _ln(model, tower="both"):
    """Every LayerNorm weight+bias (ln_pre, ln_1, ln_2, ln_post, ln_final) of ``tower``."""
    unlock_layernorms(model, _check_tower(tower))
    return {}


@register_method("bitfit")
def _bitfit(model, tower="both"):
    """Every bias of ``tower``, incl. ``attn.in_proj_bias`` and the LayerNorm biases."""
    unlock(model, BIAS_RE, _check_tower(tower))
    return {}


@register_method("clipfit")
def _clipfit(model):
    """Text ``transformer.resblocks.*.mlp.c_proj.bias`` + every image LayerNorm (ln_pre, ln_1, ln_2, ln_post)."""
    unlock(model, CLIPFIT_TEXT_RE, "text")
    unlock_layernorms(model, "image")
    return {}


@register_method("full")
def _full(model):
    """Every parameter (the baseline)."""
    for p in model.parameters():
        p.requires_grad_(True)
    return {}


@register_method("llu")
def _llu(model, beta=0.5, gamma=20.0):
    """Encoders frozen; identity-initialised affine maps on the image and text embeddings (``heads.LLUHead``)."""
    e = embed_dim(model)
    return {"llu_image": _heads.LLUHead(e, beta, gamma), "llu_text": _heads.LLUHead(e, beta, gamma)}


@register_method("linear-probe")
def _linear_probe(model, classnames=None, tokenizer=None, num_classes=None, templates=None):
    """Linear head E -> C on normalized image features, initialised from the zero-shot class text weights
    (``logit_scale.exp() * text_features``, so it starts at zero-shot accuracy) when classnames and tokenizer are
    given, else zeros. C = len(classnames) or ``num_classes``."""
    if classnames is not None:
        classnames = list(classnames)
        if not classnames:
            raise ValueError("classnames must not be empty")
        if num_classes is not None and int(num_classes) != len(classnames):
            raise ValueError(f"num_classes={num_classes} but {len(classnames)} classnames were given")
        c = len(classnames)
    elif num_classes is not None:
        c = num_classes
    else:
        raise ValueError("method 'linear-probe' needs classnames or num_classes")
    if isinstance(c, bool) or not isinstance(c, int) or c < 1:
        raise ValueError(f"num_classes must be a positive int, got {c!r}")
    weight = None
    if classnames is not None and tokenizer is not None:
        from engine.features import frozen_text_features

        zs = frozen_text_features(model, classnames, templates or ["a photo of a {}."], tokenizer)
        weight = (model.logit_scale.detach().float().exp() * zs.float()).cpu()
    head = _heads.LinearProbe(embed_dim(model), c, weight=weight)
    dev = next(model.parameters()).device
    return {"linear_probe": head.to(dev)}


@register_method("coop")
def _coop(model, classnames=None, tokenizer=None, n_ctx=4, init_text="a photo of a", std=0.02):
    """CoOp learned prompt context (n_ctx vectors; from the token embeddings of ``init_text`` when it has exactly
    n_ctx tokens - "a photo of a" for n_ctx=4 - else N(0, std^2)); class names appended. Needs classnames and
    tokenizer."""
    _require("coop", classnames=classnames, tokenizer=tokenizer)
    classnames = list(classnames)
    if not classnames:
        raise ValueError("classnames must not be empty")
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
        raise ValueError(f"n_ctx must be a positive int, got {n_ctx!r}")
    t = _lean.text_tower(model)
    if t is None:
        raise ValueError("coop needs an open_clip transformer text tower")
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


@register_method("adapter")
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
        raise ValueError(f"unknown method {method!r} ({', '.join(map(repr, unknown))}); valid methods: "
                         f"{', '.join(sorted(METHODS))} and combinations joined with '+' (e.g. 'ln+coop')")
    if len(set(parts)) != len(parts):
        raise ValueError(f"method {method!r} repeats a component")
    if "full" in parts and len(parts) > 1:
        raise ValueError("'full' already trains everything; it cannot be combined")
    return parts


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
    from open_clip.transformer import VisionTransformer

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an open_clip model (nn.Module), got {type(model).__name__}")
    if not isinstance(getattr(model, "visual", None), VisionTransformer) or _lean.text_tower(model) is None:
        raise ValueError("leanclip supports open_clip CLIP / CustomTextCLIP models with a ViT image tower "
                         "(open_clip VisionTransformer) and an open_clip transformer text tower")


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


def prepare(model: nn.Module, method: str, *, lean: bool = True, recompute: str = "none",
            memory_budget: int | None = None, tower: str = "both", classnames: Iterable[str] | None = None,
            tokenizer: Callable | None = None, init_from: str | None = None,
            frozen_dtype: torch.dtype | None = None, model_name: str | None = None, batch_size: int | None = None,
            text_batch_size: int | None = None, text_len: int | None = None, **opts) -> nn.Module:
    """Prepare ``model`` (an open_clip ViT CLIP model) for PEFT with ``method``, in place; returns ``model``.

    method          one of ``METHODS`` (``ln``, ``bitfit``, ``clipfit``, ``llu``, ``linear-probe``, ``coop``,
                    ``adapter``, ``full``, ...) or a ``+`` combination (``ln+linear-probe``, ``ln+coop``, ``ln+adapter``)
    lean            swap in the fused / SDPA modules (``engine.lean``); False keeps open_clip's plain modules
    recompute       ``none`` | ``mlp`` | ``mlp+qkv`` | ``block`` | ``auto`` (needs ``memory_budget`` bytes and
                    ``batch_size``; picks the fastest policy whose ``estimate_saved_bytes`` fits)
    tower           ``image`` | ``text`` | ``both`` for methods with a tower option (``ln``, ``bitfit``)
    classnames, tokenizer   for ``coop`` (required) and ``linear-probe`` (zero-shot init)
    init_from       path of a trainable-only checkpoint (``save_trainable``) loaded before the method is applied
    frozen_dtype    e.g. ``torch.bfloat16``: frozen tower weights stored in that dtype (trainable ones stay fp32)
    model_name      recorded in ``model.leanclip_info``
    **opts          method options (``n_ctx``, ``beta``, ``gamma``, ``num_classes``, ``reduction``, ``ratio``, ...)
    """
    _check_supported(model)
    parts = parse_method(method)
    _check_tower(tower)
    if not isinstance(lean, bool):
        raise ValueError(f"lean must be True or False, got {lean!r}")
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
    if not lean and recompute != "none":
        raise ValueError(f"recompute={recompute!r} needs lean=True (the plain model keeps what eager PyTorch keeps)")
    if frozen_dtype is not None:
        if frozen_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"frozen_dtype must be torch.bfloat16, torch.float16, torch.float32 or None, "
                             f"got {frozen_dtype!r}")
        if not lean:
            raise ValueError("frozen_dtype needs lean=True (open_clip's plain modules cannot mix dtypes)")
    if classnames is not None:
        if isinstance(classnames, str):
            raise ValueError("classnames must be a list of strings, not one string")
        classnames = [str(c) for c in classnames]
    context = {"tower": tower, "classnames": classnames, "tokenizer": tokenizer}
    per_opts = _split_options(parts, method, opts, context)

    # 1. start from a clean, fully frozen model
    _remove_added(model)
    for p in model.parameters():
        p.requires_grad_(False)
    # 2. LN-as-initialization
    if init_from is not None:
        from engine.checkpoint import load_into

        load_into(model, init_from)
    # 3. the method(s)
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
    # 4. lean modules and recompute policy
    chosen = recompute
    if lean:
        if recompute == "auto":
            chosen = _lean.choose_recompute(model, memory_budget, batch_size, text_batch_size=text_batch_size,
                                            text_len=text_len, dtype=frozen_dtype)
        _lean.apply_lean(model, chosen)
    else:
        _lean.remove_lean(model)
    if frozen_dtype is not None:
        _cast_frozen(model, frozen_dtype)
    # 5. record
    options = {k: _jsonable(v) for k, v in opts.items()}
    options.update(lean=lean, recompute=chosen, tower=tower)
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
    model.leanclip_info = {
        "method": "+".join(parts),
        "options": options,
        "model_name": model_name,
        "version": version(),
        "modules": list(added),
    }
    return model


def method_of(model: nn.Module) -> str | None:
    """The method ``prepare`` applied (``model.leanclip_info["method"]``), or None."""
    info = getattr(model, "leanclip_info", None)
    return info.get("method") if info else None


def method_parts(model: nn.Module) -> list[str]:
    m = method_of(model)
    return m.split("+") if m else []


from engine import lilt as _lilt  # noqa: E402,F401  (registers lilt-ln, lilt-bitfit, lilt-adapter, lilt-deep, lit)
