"""``prepare(model, method, **opts)``: apply registered PEFT methods to an open_clip CLIP model in place, and
``merge``: fold what a mergeable method trained back into a plain model.

``prepare`` validates everything first (method names, options, each method's check, the towers, the ``init_from``
file, whether the lean modules cover the model: ``_validate``), then freezes every parameter, optionally loads a
trainable-only checkpoint (``init_from``, "LN as initialization"), lets the method unlock parameters / add modules,
swaps in the lean modules (``leanclip.lean``), optionally keeps frozen weights in bf16, and records
``model.leanclip_info``. An error after the model was touched (e.g. no recompute policy fits the budget) restores it
exactly (``_state.ModelState``). It knows no method by name: each one's options, check and traits come from the
registry (``leanclip.registry``), where its own module registered them.
"""
from __future__ import annotations

import copy
import inspect
import json
from typing import Callable, Iterable

import torch
from torch import nn

from leanclip import lean as _lean
from leanclip import utils
from leanclip.features import check_classnames
from leanclip.methods import lora
from leanclip.methods._state import ModelState, cast_frozen, jsonable, remove_added
from leanclip.methods._validate import (
    check_frozen_dtype, check_recompute_args, check_supported, choose_lean, plan_for_budget,
)
from leanclip.models import transformers as _hf
from leanclip.registry import (
    METHOD_CHECKS, METHOD_TRAITS, METHODS, check_option_ranges, method_options, parse_method,
)
from leanclip.select import check_tower, notice

# Options handled by prepare itself (not passed to method functions).
PREPARE_OPTIONS = ("lean", "recompute", "recompute_chunk", "memory_budget", "tower", "classnames", "tokenizer", "init_from",
                   "frozen_dtype", "model_name", "batch_size", "text_batch_size", "text_len")


def version() -> str:
    try:
        import leanclip
        return str(leanclip.__version__)
    except Exception:  # pragma: no cover
        return "0.1.0"


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


def _check_methods(model: nn.Module, parts: list[str], per_opts: list[dict]) -> list[str]:
    """Run every component's check; returns their notices."""
    notices = []
    for p, kw in zip(parts, per_opts):
        check_option_ranges(p, kw)  # declared with the method: before its check reads any of them
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



def _apply_methods(model: nn.Module, parts: list[str], per_opts: list[dict], init_from) -> dict[str, nn.Module]:
    """Freeze everything (dropping what a previous prepare added), load ``init_from``, apply the components."""
    remove_added(model)
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


def _recorded_options(opts: dict, *, lean_on, recompute, tower, lean_towers, recompute_chunk, plan, memory_budget,
                      batch_size, text_batch_size, text_len, classnames, frozen_dtype, init_from) -> dict:
    """The options ``model.leanclip_info`` records (JSON: checkpoint metadata), enough to prepare the model again
    (``leanclip.cli.common`` re-applies a checkpoint's method from them)."""
    options = {k: jsonable(v) for k, v in opts.items()}
    options.update(lean=lean_on, recompute=recompute, tower=tower)
    if lean_towers is not None:
        options["lean_towers"] = lean_towers
    if recompute_chunk is not None:
        options["recompute_chunk"] = recompute_chunk
    if plan is not None:
        options.update(recompute_requested="auto", memory_budget=jsonable(memory_budget), batch_size=batch_size,
                       text_batch_size=text_batch_size, text_len=text_len, recompute_plan=plan.as_record())
        options["recompute"] = "auto"
    if classnames is not None:
        options["classnames"] = classnames
    if frozen_dtype is not None:
        options["frozen_dtype"] = jsonable(frozen_dtype)
    if init_from is not None:
        options["init_from"] = str(init_from)
    return options


def prepare(model: nn.Module, method: str, *, lean: bool | None = None, recompute: str = "none",
            recompute_chunk: int | None = None, memory_budget: int | float | str | None = None, tower: str = "both", classnames: Iterable[str] | None = None,
            tokenizer: Callable | None = None, init_from: str | None = None,
            frozen_dtype: torch.dtype | None = None, model_name: str | None = None, batch_size: int | None = None,
            text_batch_size: int | None = None, text_len: int | None = None, **opts) -> nn.Module:
    """Prepare ``model`` (an open_clip CLIP model) for PEFT with ``method``, in place; returns ``model``.

    method          one of ``METHODS`` (``ln``, ``bitfit``, ``clipfit``, ``llu``, ``linear-probe``, ``coop``,
                    ``adapter``, ``full``, ...) or a ``+`` combination (``ln+linear-probe``, ``ln+coop``, ``ln+adapter``)
    lean            None (default): swap in the fused / SDPA modules (``leanclip.lean``) on every tower they cover
                    (open_clip ViT and text towers, timm ViT / EVA towers, Hugging Face BERT-style text towers); a
                    tower they do not cover (ConvNeXt, ModifiedResNet, mT5, unknown block types) keeps its modules,
                    named in a one-line notice; True: lean everywhere or a ValueError naming what is not covered;
                    False: the plain modules
    recompute       ``none`` | ``mlp`` | ``mlp+qkv`` | ``block`` | ``auto`` (needs ``memory_budget`` and
                    ``batch_size``: ``leanclip.budget`` picks each block's policy and the chunk whose predicted step
                    peak fits, with the least recompute; the plan is printed and recorded)
    batch_size, text_batch_size, text_len   with ``auto``: images per step, class prompts per step (default
                    ``batch_size``; 0: the text tower is not run in the step), and their token length (default the
                    full context)
    memory_budget   with ``auto``: the step's peak, in bytes (an int, or a string such as ``"12GiB"``) or as a
                    fraction in (0, 1] of plain open_clip's predicted peak for this model and batch
    recompute_chunk with ``recompute="block"``: samples per chunk of each block's forward and backward, so the
                    backward holds one chunk's activations instead of the batch's (None: the whole batch)
    tower           ``image`` | ``text`` | ``both`` for methods with a tower option (``ln``, ``bitfit``)
    classnames, tokenizer   for ``coop`` (required) and ``linear-probe`` (zero-shot init)
    init_from       path of a trainable-only checkpoint (``save_trainable``) loaded before the method is applied
    frozen_dtype    e.g. ``torch.bfloat16``: frozen tower weights stored in that dtype (trainable ones stay fp32)
    model_name      recorded in ``model.leanclip_info``
    **opts          method options (``n_ctx``, ``beta``, ``gamma``, ``num_classes``, ``reduction``, ``ratio``, ...)

    Methods that are not defined on a tower (``clipfit`` on a tower without LayerNorms, ``coop`` without open_clip
    token embeddings, ...) raise a ValueError naming the tower class. Transactional: every argument, option, the
    towers and the ``init_from`` file are validated before the model is touched, and an error midway (e.g. no
    recompute policy fits ``memory_budget``) restores the model exactly (``ModelState``).
    """
    check_supported(model)
    parts = parse_method(method)
    check_tower(tower)
    check_recompute_args(lean, recompute, memory_budget, batch_size, recompute_chunk)
    for name, size in (("batch_size", batch_size), ("text_batch_size", text_batch_size), ("text_len", text_len)):
        # an int >= 1, the range the command line's --batch-size has (leanclip.utils); text_batch_size=0: the step
        # does not run the text tower (class text features computed once)
        if size is not None and not (name == "text_batch_size" and size == 0 and type(size) is int):
            utils.check_number(name, size, kind_of="batch_size")
    check_frozen_dtype(frozen_dtype, lean)
    classnames = None if classnames is None else check_classnames(classnames)
    per_opts = _split_options(parts, method, opts, {"tower": tower, "classnames": classnames, "tokenizer": tokenizer})
    notices = _check_methods(model, parts, per_opts)
    loaded = _init_from_names(model, init_from) if init_from is not None else []
    lean_on, lean_notices, lean_towers = choose_lean(model, lean, recompute, frozen_dtype)
    for message in notices + lean_notices:  # everything is validated: say what will differ from the usual
        notice(message)
    state = ModelState(model, loaded)
    try:
        added = _apply_methods(model, parts, per_opts, init_from)
        chosen, plan = recompute, None
        if lean_on and recompute == "auto":
            plan = plan_for_budget(model, memory_budget, batch_size, dict(
                text_batch_size=text_batch_size, text_len=text_len, dtype=frozen_dtype), lean_towers)
        elif lean_on:
            _lean.apply_lean(model, chosen, recompute_chunk, towers=lean_towers)
        else:
            _lean.remove_lean(model)
        if frozen_dtype is not None:
            cast_frozen(model, frozen_dtype)
        options = _recorded_options(opts, lean_on=lean_on, recompute=chosen, tower=tower, lean_towers=lean_towers,
                                    recompute_chunk=recompute_chunk, plan=plan, memory_budget=memory_budget,
                                    batch_size=batch_size, text_batch_size=text_batch_size, text_len=text_len,
                                    classnames=classnames, frozen_dtype=frozen_dtype, init_from=init_from)
        json.dumps(options)  # must stay serialisable (checkpoint metadata)
        model.leanclip_info = {"method": "+".join(parts), "options": options, "model_name": model_name,
                               "version": version(), "modules": list(added)}
    except BaseException:
        state.restore()
        raise
    return model


def merge(model: nn.Module) -> nn.Module:
    """A plain model holding what ``model`` trained, for export: open_clip's own modules (or the ``transformers``
    model) with equal outputs; ``model`` is left unchanged. ln, bitfit, clipfit and full train weights the model
    already has, so nothing is folded; LoRA's pairs are folded into their projections (``leanclip.methods.lora.merge``).
    A method that adds modules a plain model has no place for (prompts, heads, adapters, LLU's maps) is a ValueError
    naming it. Frozen weights kept in 16 bits come back in the trainable parameters' dtype."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"merge needs an nn.Module, got {type(model).__name__}")
    info = getattr(model, "leanclip_info", None)
    if not info:
        raise ValueError("merge: the model was not prepared by leanclip.prepare (nothing to fold)")
    parts = parse_method(info["method"])
    kept = [p for p in parts if not METHOD_TRAITS[p].mergeable]
    if kept:
        raise ValueError(f"merge: method {info['method']!r}: {', '.join(kept)} adds modules a plain model has no "
                         f"place for; keep its trainable parameters with leanclip.save_trainable instead")
    if "lora" in parts:
        return lora.merge(model)
    out = copy.deepcopy(model)
    _lean.remove_lean(out)
    if info.get("options", {}).get("frozen_dtype"):
        out.to(next(p.dtype for p in model.parameters() if p.requires_grad))
    out.__dict__.pop("leanclip_info", None)
    return _hf.to_transformers(out) if _hf.is_transformers(out) else out
