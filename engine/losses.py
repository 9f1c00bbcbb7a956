"""The contrastive loss every loop uses: symmetric InfoNCE (CLIP, Radford et al. 2021), local or over the global batch.

    loss = clip_loss(img_feats, txt_feats, logit_scale)               # this process's pairs only
    loss = clip_loss(img_feats, txt_feats, logit_scale, gather=True)  # negatives from every rank's batch
    clamp_logit_scale_(model)                                         # after each optimizer step

With L2-normalized features, s the logit scale (1/tau) and W ranks of b pairs each (features all-gathered WITH
gradient), rank r scores its own b images against all W*b captions and its own b captions against all W*b images:

    L_r = 1/2 * ( CE(s * I_r T^T, y_r) + CE(s * T_r I^T, y_r) ),   y_r = r*b + arange(b)

On one process (or ``gather=False``) this is the plain symmetric InfoNCE of the batch. mean_r L_r is the
single-process loss of the W*b batch, and the all-gather's backward sums every rank's gradient for a slice, so DDP's
gradient average equals the single-process gradient. The computation is open_clip's ``ClipLoss`` with
``local_loss=True, gather_with_grad=True``; this module adds the input checks and the dtype rule (float32, float64 kept
for gradcheck).

The logit scale is capped the way open_clip's training loop does it: ``model.logit_scale`` (log of the scale) is
clamped in place to [0, log 100] after each optimizer step that trained it, so the forward uses ``exp()`` as is.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from leanclip import distributed as D
from leanclip.models.openclip import ClipLoss

__all__ = ["clip_loss", "clamp_logit_scale_", "MAX_LOGIT_SCALE"]

MAX_LOGIT_SCALE = 100.0


def _check_pair(img_feats, txt_feats) -> None:
    if not isinstance(img_feats, torch.Tensor) or not isinstance(txt_feats, torch.Tensor):
        raise TypeError("img_feats and txt_feats must be tensors")
    if img_feats.dim() != 2 or txt_feats.dim() != 2:
        raise ValueError(f"img_feats and txt_feats must be 2-D (B, E); got {tuple(img_feats.shape)} and "
                         f"{tuple(txt_feats.shape)}")
    if img_feats.shape != txt_feats.shape:
        raise ValueError(f"img_feats {tuple(img_feats.shape)} and txt_feats {tuple(txt_feats.shape)} must match")
    if img_feats.shape[0] == 0:
        raise ValueError("img_feats: empty batch")


def clip_loss(img_feats: torch.Tensor, txt_feats: torch.Tensor, logit_scale, *, gather: bool = False) -> torch.Tensor:
    """Symmetric InfoNCE of matching pairs (row ``i`` of each is one pair).

    ``img_feats``, ``txt_feats``: (b, E) features, L2-normalized by the caller; ``logit_scale``: the multiplier itself
    (``model.logit_scale.exp()`` or a learnable 1/tau), a float or a scalar tensor. ``gather``: when a process group
    with more than one rank exists, negatives come from every rank's batch (every rank must pass the same b) and the
    result is this rank's loss. Computed and returned in float32 (16-bit inputs are upcast; float64 stays float64)."""
    _check_pair(img_feats, txt_feats)
    dt = torch.float64 if torch.float64 in (img_feats.dtype, txt_feats.dtype) else torch.float32
    world = D.get_world_size() if gather and D.is_distributed() else 1
    loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=D.get_rank() if world > 1 else 0, world_size=world)
    return loss(img_feats.to(dt), txt_feats.to(dt), logit_scale)


@torch.no_grad()
def clamp_logit_scale_(model: nn.Module) -> None:
    """Keep a trained ``model.logit_scale`` in [0, log 100] (open_clip's cap); a frozen one is left as loaded."""
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, torch.Tensor) and scale.requires_grad:
        scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
