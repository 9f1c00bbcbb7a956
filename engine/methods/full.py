"""``full``: train every parameter (the baseline every PEFT method is measured against)."""
from __future__ import annotations

from dataclasses import dataclass

from leanclip.registry import MethodTraits, register_method


@dataclass(frozen=True)
class FullOptions:
    """``full`` takes no options."""


@register_method("full", traits=MethodTraits(alone=True, contrastive_defaults={"lr": 1e-4}, mergeable=True),
                 options=FullOptions)
def _full(model):
    """Every parameter (the baseline)."""
    for p in model.parameters():
        p.requires_grad_(True)
    return {}
