"""Contrastive pre-training of a whole CLIP on an in-memory corpus (the demo's and the tests' synthetic weights).

    losses = pretrain_contrastive(model, images, captions, tokenizer, steps=300, batch_size=64, lr=1e-3, seed=0)

``pretrain_contrastive`` is a plain, seeded full-training loop (AdamW, linear warm-up then cosine decay, the
symmetric InfoNCE and logit-scale cap of ``leanclip.losses``) that every parameter of ``model`` takes part in. It is meant for small in-memory
corpora (the demo's synthetic one); it does not change which parameters are trainable.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from leanclip import utils
from leanclip.losses import clamp_logit_scale_, clip_loss
from leanclip.select import model_device, trainable_parameters
from leanclip.training import cosine_lr, matrix_decay_adamw, set_lr

__all__ = ["pretrain_contrastive"]


def pretrain_contrastive(
    model: torch.nn.Module,
    images: torch.Tensor,
    captions: Sequence[str],
    tokenizer: Callable,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    *,
    weight_decay: float = 0.1,
    warmup: int | None = None,
    progress: bool = False,
    desc: str = "pretrain",
) -> list[float]:
    """Train ``model`` (an open_clip CLIP) on ``(images[i], captions[i])`` pairs for ``steps`` AdamW steps.

    ``images``: (N, 3, H, W) float tensor, already normalized for the model; ``captions``: N strings; ``tokenizer``:
    open_clip tokenizer (list of str -> (n, context_length) int64). Batches are drawn without replacement from a
    seeded permutation (a new one each epoch), so the run is reproducible for a given ``seed`` on a given machine.
    Learning rate: linear warm-up over ``warmup`` steps (default 10% of ``steps``), then cosine decay to 0.
    Returns the loss of every step. The model is left in eval mode. A non-finite loss or gradient raises
    ``leanclip.utils.NonFiniteLossError`` before the update that would spread it."""
    if images.dim() != 4:
        raise ValueError(f"images must be (N, 3, H, W); got {tuple(images.shape)}")
    if len(captions) != images.shape[0]:
        raise ValueError(f"captions: {len(captions)} captions for {images.shape[0]} images")
    if steps < 1 or batch_size < 2:
        raise ValueError(f"steps must be >= 1 and batch_size >= 2; got steps={steps}, batch_size={batch_size}")
    n = images.shape[0]
    batch_size = min(batch_size, n)
    device = model_device(model)
    tokens = tokenizer(list(captions))
    warmup = max(1, int(0.1 * steps)) if warmup is None else max(0, warmup)

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    params = [p for _, p in trainable_parameters(model)]
    if not params:
        raise ValueError("model has no trainable parameters")
    opt = matrix_decay_adamw(model, lr, weight_decay)

    def lr_at(step: int) -> float:
        return cosine_lr(step, steps, lr, warmup=warmup)

    bar = utils.Progress(steps, desc, progress)
    losses: list[float] = []
    perm, pos = torch.randperm(n, generator=gen), 0
    model.train()
    try:
        for step in range(steps):
            if pos + batch_size > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos:pos + batch_size]
            pos += batch_size
            set_lr(opt, lr_at(step))
            img = images[idx].to(device, non_blocking=True)
            txt = tokens[idx].to(device, non_blocking=True)
            img_f = F.normalize(model.encode_image(img), dim=-1)
            txt_f = F.normalize(model.encode_text(txt), dim=-1)
            loss = clip_loss(img_f, txt_f, model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            loss_v, gn = torch.stack([loss.detach().float(), utils.grad_norm(params).float().to(loss.device)]).tolist()
            utils.check_finite_step(loss_v, gn, step=step + 1, epoch=step * batch_size // n + 1, lr=lr_at(step))
            opt.step()
            clamp_logit_scale_(model)
            losses.append(loss_v)
            bar.update(1, loss=f"{loss_v:.3f}")
    finally:
        bar.close()
        model.eval()
    return losses


