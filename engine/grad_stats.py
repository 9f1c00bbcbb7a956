"""Sums of squared gradients of a training loss, per trainable tensor (CLIPFit's gradient analysis, Fig. 4 left).

For batches ``b = 1..N`` and a trainable tensor ``θ``: ``S(θ) = Σ_b Σ_i (∂L_b/∂θ_i)²``, where ``L_b`` is the whole
loss of one optimizer step on batch ``b`` (cross-entropy plus the method's extra terms, e.g. CLIPFit's distillation),
as ``leanclip.step.ClassifyStep`` computes it: the gradient of each batch alone (zeroed in between), squared and
summed in float64. Summing squares per batch rather than squaring the summed gradient keeps batches whose gradients
point in opposite directions from cancelling: it measures how strongly the loss pulls on a tensor, the empirical
Fisher diagonal summed over the tensor.
"""
from __future__ import annotations

from typing import Iterable

import torch

from leanclip.select import trainable_parameters

__all__ = ["squared_grad_sums"]


def squared_grad_sums(model: torch.nn.Module, step, batches: Iterable) -> tuple[dict[str, float], int]:
    """``({name: S(θ)}, batches run)`` over the trainable tensors of ``model`` (prepared); ``step(images, labels)``
    back-propagates one step's loss into ``.grad`` (a ``ClassifyStep``). A tensor the loss does not reach sums to 0.
    The model's gradients are left cleared."""
    params = trainable_parameters(model)
    if not params:
        raise ValueError("model has no trainable parameters: call leanclip.prepare(model, method) first")
    sums = {n: torch.zeros((), dtype=torch.float64) for n, _ in params}
    count = 0
    for images, labels in batches:
        model.zero_grad(set_to_none=True)
        step(images, labels)
        for n, p in params:
            if p.grad is not None:
                sums[n] += p.grad.detach().double().pow(2).sum().cpu()
        count += 1
    model.zero_grad(set_to_none=True)
    return {n: float(v) for n, v in sums.items()}, count
