"""Which parameters a method touches: the towers (their name patterns come from ``leanclip.models.openclip``),
unlocking, and the checks that a tower has what a method needs (naming the tower class when it does not). Shared by
every method module.
"""
from __future__ import annotations

import os
import re
import sys
import warnings
from typing import Iterable

import torch
from torch import nn

from leanclip.models import openclip as _openclip
from leanclip.models import transformers as _transformers
from leanclip.models.openclip import (  # noqa: F401  (the patterns are re-exported for the method modules)
    BIAS_RE, IMAGE_RE, TEXT_RE, class_name, is_vit_image_tower, text_tower, tower_class, tower_of,
)
from leanclip.models.openclip import embed_dim as _embed_dim

# CLIPFit's text biases in every model family (each family's names are anchored and cannot meet another's)
CLIPFIT_TEXT_RE = re.compile(f"(?:{_openclip.CLIPFIT_TEXT_RE.pattern})|(?:{_transformers.CLIPFIT_TEXT_RE.pattern})")

TOWERS = ("image", "text", "both")


# ----------------------------------------------------------------------------------------------------------- helpers
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
    for t in ("image", "text") if tower == "both" else (tower,):
        ok = is_vit_image_tower(model) if t == "image" else text_tower(model) is not None
        if not ok:
            kind = "an open_clip VisionTransformer" if t == "image" else "an open_clip transformer text tower"
            raise ValueError(f"method {method!r} needs {kind} ({why}); the {t} tower is {tower_class(model, t)}")


def require_block_tower(model: nn.Module, method: str, tower: str, why: str) -> None:
    """ValueError naming the class unless every tower in ``tower`` is made of transformer blocks the lean engine
    implements (``leanclip.lean.tower_obstacles``: open_clip ViT and text transformers, timm ViT / EVA trunks)."""
    from leanclip import lean

    for t in ("image", "text") if tower == "both" else (tower,):
        obstacles = lean.tower_obstacles(model, t)
        if obstacles:
            raise ValueError(f"method {method!r} needs transformer blocks leanclip implements ({why}); "
                             f"{'; '.join(obstacles)}")


def embed_dim(model: nn.Module) -> int:
    """The joint embedding width (``leanclip.models.openclip.embed_dim``); ValueError when the model does not say."""
    dim = _embed_dim(model)
    if dim is None:
        raise ValueError(f"cannot determine the embedding width of {class_name(model)} (no visual.output_dim, "
                         f"text projection or text.output_dim); the image tower is {tower_class(model, 'image')}")
    return dim


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs that require grad, in ``named_parameters`` order (the optimizer's and the
    checkpoint's order)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for _, p in trainable_parameters(model))


def require_options(method: str, **values):
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise ValueError(f"method {method!r} needs {' and '.join(missing)} (got None)")
