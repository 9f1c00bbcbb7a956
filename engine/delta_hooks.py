"""Projection deltas on a tower's own (plain) blocks: forward hooks on the projections the block calls.

A method that changes a block's projections (LoRA) attaches a ``leanclip.lean.ProjectionDelta`` child to the block.
A lean block adds its terms inside its branch functions. A plain block can take the same terms where it calls its
projections as ``nn.Linear`` modules (timm's ViT and EVA blocks: ``attn.qkv`` or ``q_proj`` / ``k_proj`` /
``v_proj``, ``attn.proj``, ``mlp.fc1`` (SwiGLU: ``fc1_g`` | ``fc1_x``), ``mlp.fc2``): a forward hook on each adds::

    y = F.linear(x, W, b) + sum over the block's deltas of delta(site, x, start, stop)

with the same ``site`` / ``start`` / ``stop`` the lean block asks for, so a plain block computes exactly what the
lean one does, and whatever runs the plain block runs the terms with it: the tower's own gradient checkpointing
(which replays the hooks, dropout's RNG state restored) and ``torch.compile`` (dynamo traces module hooks).

A family says where its plain blocks call their projections (``sites(block)``: ``(module, site, start, stop)`` each,
or None when it cannot take deltas; ``leanclip.lean.register_lean_classes(plain_sites=...)``). open_clip's
``ResidualAttentionBlock`` cannot: ``nn.MultiheadAttention`` reads ``in_proj_weight`` itself, so ``remove_lean``
still refuses a delta there.

A hook reads the block's deltas when it runs, so stripping a delta leaves a hook that adds nothing; :func:`sync`
removes every hook and installs them again where a plain block holds a delta (``apply_lean`` / ``remove_lean`` call
it, so a lean block never has one). The hook is an object holding its block, so ``copy.deepcopy`` of a prepared
model rebinds each hook to the copied block.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

__all__ = ["DeltaHook", "sync", "remove"]


class DeltaHook:
    """Forward hook of one projection of ``block``: adds the ``(site, start, stop)`` terms of the block's deltas."""

    def __init__(self, block: nn.Module, site: str, start: int, stop: int, deltas_of: Callable):
        self.block, self.site, self.start, self.stop, self.deltas_of = block, site, start, stop, deltas_of

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor):
        x = args[0]
        terms = [t for t in (d.delta(self.site, x, self.start, self.stop) for d in self.deltas_of(self.block))
                 if t is not None]
        if not terms:
            return None
        return output + sum(terms).to(output.dtype)


def remove(model: nn.Module) -> None:
    """Unregister every :class:`DeltaHook` in ``model``."""
    for m in model.modules():
        for k, hook in list(m._forward_hooks.items()):
            if isinstance(hook, DeltaHook):
                del m._forward_hooks[k]


def sync(model: nn.Module, blocks: Iterable[nn.Module], deltas_of: Callable, sites: Callable) -> None:
    """Hooks exactly where one of ``blocks`` (the plain blocks) holds a delta: every :class:`DeltaHook` removed,
    then one per projection of each such block. ``deltas_of(block)``: its deltas; ``sites(block)``: its
    ``(module, site, start, stop)`` projections (a block without sites holds no delta here: ``remove_lean`` checks)."""
    remove(model)
    for blk in blocks:
        if not deltas_of(blk):
            continue
        for module, site, start, stop in sites(blk) or ():
            module.register_forward_hook(DeltaHook(blk, site, start, stop, deltas_of))
