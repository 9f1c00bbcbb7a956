"""What ``prepare`` validates before it changes the model: that it is a CLIP-style model, the recompute / budget /
frozen-dtype arguments, and which towers the lean modules cover (``choose_lean``); and the budgeted swap that
plans recompute per block once the methods are applied. Kept apart from ``prepare`` itself so that each step reads
on its own and ``prepare`` stays the sequence of steps."""
from __future__ import annotations

import torch
from torch import nn

from leanclip import budget as _budget
from leanclip import geometry as _geometry
from leanclip import lean as _lean
from leanclip.models import transformers as _hf
from leanclip.models.openclip import class_name, hf_text_tower, text_tower
from leanclip.select import notice, tower_class


def check_supported(model: nn.Module) -> None:
    """Any open_clip CLIP-style model: an image tower ``model.visual`` and a text tower (open_clip's transformer,
    flattened in CLIP or ``model.text`` in CustomTextCLIP / CoCa, or another module such as a Hugging Face encoder).
    Which methods and whether the lean modules apply depend on the towers (method checks, ``choose_lean``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an open_clip model (nn.Module), got {type(model).__name__}")
    has_text = text_tower(model) is not None or isinstance(getattr(model, "text", None), nn.Module)
    if not isinstance(getattr(model, "visual", None), nn.Module) or not has_text:
        raise ValueError(f"leanclip prepares open_clip CLIP models (an image tower model.visual and a text tower); "
                         f"got {class_name(model)}")


def check_recompute_args(lean, recompute, memory_budget, batch_size, recompute_chunk=None) -> None:
    if lean is not None and not isinstance(lean, bool):
        raise ValueError(f"lean must be True, False or None (automatic), got {lean!r}")
    _lean.check_policy(recompute, allow_auto=True)
    _lean.check_chunk(recompute, recompute_chunk)
    if memory_budget is not None:
        if recompute != "auto":
            raise ValueError(f"memory_budget is only used with recompute='auto' (got recompute={recompute!r})")
        _budget.resolve_budget(memory_budget, 1)  # its form; a fraction is resolved against plain's peak later
    if recompute == "auto":
        if memory_budget is None:
            raise ValueError("recompute='auto' needs memory_budget= (a step peak: bytes, '12GiB', or a fraction of "
                             "plain's)")
        if batch_size is None:
            raise ValueError("recompute='auto' needs batch_size= (images per step) to predict the step's peak")
    if lean is False and recompute != "none":
        raise ValueError(f"recompute={recompute!r} needs lean=True (the plain model keeps what eager PyTorch keeps)")


FROZEN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what frozen weights may be kept in


def check_frozen_dtype(frozen_dtype, lean) -> None:
    if frozen_dtype is None:
        return
    if frozen_dtype not in FROZEN_DTYPES:
        raise ValueError(f"frozen_dtype must be torch.bfloat16, torch.float16, torch.float32 or None, "
                         f"got {frozen_dtype!r}")
    if lean is False:
        raise ValueError("frozen_dtype needs lean=True (open_clip's plain modules cannot mix dtypes)")


def choose_lean(model: nn.Module, lean: bool | None, recompute: str, frozen_dtype) -> tuple[bool, list[str], list | None]:
    """(whether prepare swaps in the lean modules, notices, the towers to swap: None for the whole model).

    ``lean=None`` (automatic) makes every covered tower lean: when one tower is not covered (a ConvNeXt or
    ModifiedResNet image tower, an mT5 text tower), the other tower still goes lean and a one-line notice
    names the class that stays on its own modules (``leanclip.lean.tower_obstacles``); with neither covered the
    model keeps its plain modules, with a notice. ``lean=True`` needs the whole model covered, and ``frozen_dtype``
    too (a plain tower cannot mix dtypes); a recompute policy applies to the lean towers. Otherwise a ValueError
    naming what is not covered."""
    if lean is False:
        return False, [], None
    obstacles = _lean.lean_obstacles(model)
    if frozen_dtype is not None and _hf.is_transformers(model):  # its attention and LayerNorms are transformers'
        raise ValueError(f"frozen_dtype: the frozen weights of {model.name} stay in their dtype (transformers' own "
                         f"attention and LayerNorms run them); use --precision bf16 autocast instead")
    if hf_text_tower(model) is not None and frozen_dtype is not None:
        raise ValueError(f"frozen_dtype does not cover the text tower {tower_class(model, 'text')} (transformers' "
                         f"own embeddings and attention run its frozen weights): give no frozen_dtype")
    if recompute == "auto" and hf_text_tower(model) is not None and _geometry.tower_geometry(model, "text") is None:
        # planning the image tower alone would leave the text tower's memory out of the budget without saying so
        raise ValueError(f"recompute='auto' does not cover the text tower {tower_class(model, 'text')} (the memory "
                         f"planner has no estimate of its layers): give a recompute policy")
    if not obstacles:
        return True, [], None
    why = "; ".join(obstacles)
    if lean is True:
        raise ValueError(f"lean=True: the lean modules do not cover this model: {why} (pass lean=False, or leave lean "
                         f"unset to fall back to open_clip's modules)")
    if frozen_dtype is not None:
        raise ValueError(f"frozen_dtype needs the lean modules, which do not cover this model: {why}")
    towers = _lean.covered_towers(model) if hasattr(model, "visual") else []
    if towers:
        return True, [f"lean on the {' and '.join(towers)} tower only: {why} (it keeps its own modules)"], towers
    if recompute != "none":
        raise ValueError(f"recompute={recompute!r} needs the lean modules, which do not cover this model: {why}")
    return False, [f"lean=False for {class_name(model)}: {why}"], None


def plan_for_budget(model: nn.Module, memory_budget, batch_size: int, sizes: dict,
                     towers=None) -> "_budget.RecomputePlan":
    """Swap in the lean modules under the recompute plan that fits ``memory_budget`` (a step peak: bytes, or a
    fraction of plain open_clip's predicted peak, taken before the swap) at the least recompute work; says the
    plan in one line."""
    plain = _budget.plain_peak(model, batch_size, **sizes)
    limit = _budget.resolve_budget(memory_budget, plain)
    _lean.apply_lean(model, "none", towers=towers)
    plan = _budget.plan_recompute(model, limit, batch_size, **sizes)
    _budget.apply_plan(model, plan)
    plan.notes.update(budget_bytes=limit, plain_peak_bytes=plain)
    notice(f"memory budget {_budget.mib(limit)} (plain's predicted step peak {_budget.mib(plain)}): "
           f"recompute {plan.describe()}, predicted step peak {_budget.mib(plan.peak)}")
    return plan
