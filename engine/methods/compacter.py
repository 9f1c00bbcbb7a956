"""Compacter (Karimi Mahabadi et al. 2021): Houlsby's placement with low-rank PHM projections.

``prepare(model, "compacter", reduction=8, n=4, tower="both")`` puts an adapter ``h + up(gelu(down(h)))`` after the
attention and after the MLP of every block (the placement of ``leanclip.methods.houlsby``, which also explains how it runs in
plain and lean blocks under every recompute policy). ``down`` (d -> m, m = d / reduction) and ``up`` (m -> d) are
low-rank parameterised hypercomplex multiplication (LPHM) layers ``y = x W + b`` with::

    W = sum_{i=1..n} A_i ⊗ (s_i t_i^T)      A_i: n x n, shared by every PHM layer of the model
                                             s_i: in/n, t_i: out/n, per layer (rank-1 factors)

The A_i live in one ``SharedRule`` module that every PHM layer holds (a tied submodule: one parameter, named after
the first layer that holds it, e.g. ``visual.transformer.resblocks.0.ls_1.compacter.down.rule.A``). Initialisation:
A_i xavier-uniform (variance 1/n), s and t normal with variance (3 in)^-1/2 each, so ``down`` starts with
nn.Linear's weight variance 1/(3 in); ``up``'s t factors and both biases are zero, so ``up`` is zero and the model
starts exactly as the unprepared one computed.

Trainable count (d the block width, m = d / reduction, L blocks per tower)::

    per PHM layer in -> out: n (in/n + out/n) + out = in + 2 out
    per adapter: (d + 2m) + (m + 2d) = 3d + 3m;  two per block;  plus n^3 shared
    total = sum over towers of 2 L (3d + 3m) + n^3

ViT-B-16, defaults (reduction 8, n 4): image 2·12·(3·768 + 3·96) = 62,208, text 2·12·(3·512 + 3·64) = 41,472,
shared 64: 103,744 (houlsby with the same bottleneck: 5,146,368).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from leanclip.lifecycle import strip
from leanclip.methods import houlsby as _houlsby
from leanclip.methods import lilt as _lilt
from leanclip.methods._options import Tower, tower_option
from leanclip.options import OptionRange, option
from leanclip.registry import register_method
from leanclip.select import model_device

__all__ = ["SharedRule", "PHMLinear", "CompacterAdapter", "compacter_count"]


class SharedRule(nn.Module):
    """The n matrices A_i (n x n) shared by every PHM layer: ``A`` of shape (n, n, n)."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.A = nn.Parameter(torch.empty(n, n, n))
        for a in self.A.data:
            nn.init.xavier_uniform_(a)


class PHMLinear(nn.Module):
    """``y = x W + b`` with ``W = sum_i A_i ⊗ (s_i t_i^T)`` (in x out); ``zero=True`` starts W and b at zero."""

    def __init__(self, in_features: int, out_features: int, rule: SharedRule, zero: bool = False):
        super().__init__()
        n = rule.n
        self.in_features, self.out_features = in_features, out_features
        self.rule = rule
        std = (3 * in_features) ** -0.25
        self.s = nn.Parameter(torch.randn(n, in_features // n) * std)
        self.t = nn.Parameter(torch.zeros(n, out_features // n) if zero else torch.randn(n, out_features // n) * std)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def weight(self) -> torch.Tensor:
        a = self.rule.A
        b = self.s[:, :, None] * self.t[:, None, :]  # (n, in/n, out/n): rank-1 B_i = s_i t_i^T
        return torch.einsum("iab,ipq->apbq", a, b).reshape(self.in_features, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight() + self.bias


class CompacterAdapter(nn.Module):
    """``h + up(gelu(down(h)))`` with PHM ``down`` / ``up`` (an in-layer adapter of ``leanclip.methods.houlsby``)."""

    inlayer_adapter = True

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return _houlsby.bottleneck(h, self.down, self.up)

    def __init__(self, dim: int, reduction: int, rule: SharedRule):
        super().__init__()
        hidden = dim // reduction
        self.down = PHMLinear(dim, hidden, rule)
        self.up = PHMLinear(hidden, dim, rule, zero=True)


def compacter_count(widths_layers, reduction: int = 8, n: int = 4) -> int:
    """Trainable parameters for towers given as (width, blocks) pairs: sum 2 L (3d + 3d/reduction) + n^3."""
    return sum(2 * layers * (3 * d + 3 * (d // reduction)) for d, layers in widths_layers) + n ** 3


# n: the shared rule holds n^3 parameters (262,144 at 64) and every PHM layer is built from n x n blocks; n is a
# handful in practice (4 by default), and the check holds it to the widths it must divide
N_RANGE = OptionRange(int, 1, 64)


def _check_compacter(model, reduction=8, n=4, tower="both", **_):
    for width in _houlsby.block_widths(model, "compacter", tower):
        _lilt.check_reduction(reduction, width)
        if width % n or (width // reduction) % n:
            raise ValueError(f"n={n} must divide the width {width} and the bottleneck {width // reduction} "
                             f"(PHM layers are built from n x n blocks)")


@dataclass(frozen=True)
class CompacterOptions:
    reduction: int = option(8, "the bottleneck is the block's width / reduction", range=_houlsby.REDUCTION_RANGE)
    n: int = option(4, "the PHM rule's size: n matrices A_i of n x n, shared by every layer", range=N_RANGE)
    tower: Tower = tower_option("that gets the adapters")


@register_method("compacter", check=_check_compacter, options=CompacterOptions)
def _compacter(model, reduction=8, n=4, tower="both"):
    """Compacter: Houlsby-placed adapters whose projections are LPHM layers, A_i shared across all of them."""
    strip(model, _houlsby.added(CompacterAdapter))
    rule = SharedRule(n).to(model_device(model))
    _houlsby.add_adapters(model, tower, "compacter", lambda width: CompacterAdapter(width, reduction, rule))
    return {}

