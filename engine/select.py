"""Which parameters a method touches: the towers, anchored open_clip parameter-name patterns, unlocking, and the
checks that a tower has what a method needs (naming the tower class when it does not). Shared by every method module.
"""
from __future__ import annotations

import os
import re
import sys
import warnings
from typing import Iterable

import torch
from torch import nn

from leanclip import lean as _lean

TOWERS = ("image", "text", "both")

# Anchored parameter-name patterns (open_clip names; CLIP flattens the text tower at top level, CustomTextCLIP
# keeps it under "text.").
IMAGE_RE = re.compile(r"^visual\.")
TEXT_RE = re.compile(r"^(?:text\.|transformer\.|token_embedding\.|positional_embedding$|ln_final\.|"
                     r"text_projection(?:$|\.))")
BIAS_RE = re.compile(r"(?:^|\.)(?:bias|in_proj_bias)$")
CLIPFIT_TEXT_RE = re.compile(r"^(?:text\.)?transformer\.resblocks\.\d+\.mlp\.c_proj\.bias$")


# ----------------------------------------------------------------------------------------------------------- helpers
def tower_of(name: str) -> str | None:
    """``"image"``, ``"text"`` or None (logit_scale, added heads) for an open_clip parameter/module name."""
    if IMAGE_RE.match(name):
        return "image"
    if TEXT_RE.match(name):
        return "text"
    return None


def in_tower(name: str, tower: str) -> bool:
    t = tower_of(name)
    return t is not None and (tower == "both" or t == tower)


def check_tower(tower) -> str:
    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
    return tower


def notice(message: str) -> None:
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
    return [n for n, _ in model.named_parameters() if pattern.search(n) and in_tower(n, tower)]


def layernorm_names(model: nn.Module, tower: str = "both") -> list[str]:
    """Names of the weight and bias of every LayerNorm (open_clip's and timm's subclasses included) in ``tower``."""
    params = {id(p): n for n, p in model.named_parameters()}
    out = []
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            for p in m.parameters(recurse=False):
                n = params.get(id(p))
                if n is not None and in_tower(n, tower):
                    out.append(n)
    return out


def unlock_names(model: nn.Module, names: Iterable[str]) -> int:
    n = 0
    for name in names:
        model.get_parameter(name).requires_grad_(True)
        n += 1
    return n


def unlock(model: nn.Module, pattern: str | re.Pattern, tower: str = "both") -> int:
    """Set requires_grad on parameters whose name matches ``pattern`` (re.search; anchor it) inside ``tower``.
    Returns the number of tensors unlocked."""
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    return unlock_names(model, names_matching(model, rx, tower))


def unlock_layernorms(model: nn.Module, tower: str = "both") -> int:
    """Unlock the weight and bias of every LayerNorm (open_clip's subclasses included) inside ``tower``."""
    return unlock_names(model, layernorm_names(model, tower))


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


def require_options(method: str, **values):
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise ValueError(f"method {method!r} needs {' and '.join(missing)} (got None)")
