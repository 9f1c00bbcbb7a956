"""LoRA on plain ``nn.Linear`` projections: how ``lora`` runs on a model family whose blocks the lean modules do not
implement (``leanclip.models.transformers``: CLIP's and SigLIP's separate ``q_proj`` / ``k_proj`` / ``v_proj``).

The family's boundary module names the sites (``linear_sites(model, tower, targets)``: target, name, ``nn.Linear``).
Each site's class is swapped in place to :class:`LoRALinear` (an ``nn.Linear`` subclass, so the frozen weight and
bias keep their names and the family's own forward calls it unchanged) and gets one child ``lora``, a
:class:`LinearLoRA` pair::

    y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T        A: (rank, in) kaiming-uniform, B: (out, rank) zero

exactly ``leanclip.methods.lora``'s term (the same init, one dropout mask per target), so the prepared model computes what
the unprepared one did. Parameters are named ``<site>.lora.A`` / ``<site>.lora.B``. ``prepare``'s rollback restores
swapped classes and removed children, so a failed prepare leaves no half-swapped site.

:func:`merge` folds ``W += (alpha / rank) B A`` into a copy and swaps the class back: the family's own plain
modules, with the same outputs.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


class LinearLoRA(nn.Module):
    """One low-rank pair of one projection: ``scaling * dropout(x) A^T B^T``."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        self.dropout = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * F.linear(F.linear(self.dropout(x.to(self.A.dtype)), self.A), self.B)

    def weight_delta(self) -> torch.Tensor:
        return self.scaling * (self.B @ self.A)


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` whose output adds its child ``lora``'s term (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y + self.lora(x).to(y.dtype)


def sites(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _unswap(m: LoRALinear) -> None:
    del m._modules["lora"]
    m.__class__ = nn.Linear


def remove_pairs(model: nn.Module) -> nn.Module:
    """Remove every pair (without folding it in). Returns ``model``."""
    for _, m in sites(model):
        _unswap(m)
    return model


def check_rank(linears, rank: int) -> None:
    """A rank no larger than the narrowest targeted projection (a pair of rank min(in, out) spans every update)."""
    widths = [min(m.in_features, m.out_features) for m in linears]
    if widths and rank > min(widths):
        raise ValueError(f"method 'lora': rank={rank} exceeds the width {min(widths)} of the targeted projections "
                         f"(a LoRA pair of that rank is no longer low-rank)")


def attach(linears, rank: int, alpha: float, dropout: float) -> None:
    """Swap each ``nn.Linear`` of ``linears`` to :class:`LoRALinear` with a fresh pair."""
    for m in linears:  # a plain projection or a lean one (nn.Linear subclasses computing x W^T + b)
        if not isinstance(m, nn.Linear) or isinstance(m, LoRALinear):
            raise ValueError(f"method 'lora': the site {type(m).__module__}.{type(m).__qualname__} is not an "
                             f"nn.Linear without LoRA")
    for m in linears:
        pair = LinearLoRA(m.in_features, m.out_features, rank, alpha, dropout).to(m.weight.device)
        m.__class__ = LoRALinear
        m.add_module("lora", pair)


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every pair folded into its weight (computed in float32 at least) and the sites plain
    ``nn.Linear`` again; ``model`` is left unchanged."""
    out = copy.deepcopy(model)
    for _, m in sites(out):
        wide = torch.promote_types(m.weight.dtype, torch.float32)
        m.weight.copy_((m.weight.to(wide) + m.lora.weight_delta().to(wide)).to(m.weight.dtype))
        _unswap(m)
    out.__dict__.pop("leanclip_info", None)
    return out
