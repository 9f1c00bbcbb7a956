"""Contrastive image–text training (CLIP objective).

    loss = clip_loss(img_feats, txt_feats, logit_scale)          # symmetric InfoNCE on a batch of pairs
    losses = pretrain_contrastive(model, images, captions, tokenizer, steps=300, batch_size=64, lr=1e-3, seed=0)

``clip_loss`` is the loss of Radford et al. (2021): with ``S = logit_scale · I·Tᵀ`` for L2-normalized image features
``I`` (B×E) and text features ``T`` (B×E), pair ``i`` is the positive of row ``i`` and column ``i``:

    L = ½ · ( CE(S, arange(B)) + CE(Sᵀ, arange(B)) )

``pretrain_contrastive`` is a plain, seeded full-training loop (AdamW, linear warm-up then cosine decay, logit scale
clamped at 100 as in open_clip) that every parameter of ``model`` takes part in. It is meant for small in-memory
corpora (the demo's synthetic one); it does not change which parameters are trainable.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from leanclip import utils
from leanclip import distributed as D
from leanclip.checkpoint import load_trainable, save_trainable
from leanclip.data import ItemSeeds, clip_transform, seeded_dataset
from leanclip.distributed import all_gather_with_grad
from leanclip.metrics import retrieval_recall_from_features
from leanclip.pairs import ImageListDataset, PairDataset, PairSet
from leanclip.registry import check_task, method_hooks

__all__ = ["clip_loss", "pretrain_contrastive"]

_MAX_LOGIT_SCALE = math.log(100.0)


def clip_loss(img_feats: torch.Tensor, txt_feats: torch.Tensor, logit_scale) -> torch.Tensor:
    """Symmetric InfoNCE of a batch of matching pairs (row ``i`` of each is one pair).

    ``img_feats``, ``txt_feats``: (B, E) features, L2-normalized by the caller (as open_clip's ``CLIP.forward``
    returns them); ``logit_scale``: the multiplier itself (``model.logit_scale.exp()``), a float or a scalar tensor.
    Computed and returned in float32 (16-bit inputs are upcast; float64 inputs stay float64, for gradcheck)."""
    if not isinstance(img_feats, torch.Tensor) or not isinstance(txt_feats, torch.Tensor):
        raise TypeError("img_feats and txt_feats must be tensors")
    if img_feats.dim() != 2 or txt_feats.dim() != 2:
        raise ValueError(f"img_feats and txt_feats must be 2-D (B, E); got {tuple(img_feats.shape)} and "
                         f"{tuple(txt_feats.shape)}")
    if img_feats.shape != txt_feats.shape:
        raise ValueError(f"img_feats {tuple(img_feats.shape)} and txt_feats {tuple(txt_feats.shape)} must match")
    if img_feats.shape[0] == 0:
        raise ValueError("img_feats: empty batch")
    dt = torch.float64 if torch.float64 in (img_feats.dtype, txt_feats.dtype) else torch.float32
    logits = logit_scale * (img_feats.to(dt) @ txt_feats.to(dt).t())
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on gains, biases, embeddings' scalars or the logit scale)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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
    device = next(model.parameters()).device
    tokens = tokenizer(list(captions))
    warmup = max(1, int(0.1 * steps)) if warmup is None else max(0, warmup)

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    groups = _param_groups(model, weight_decay)
    try:  # the fused kernel is ~8x faster on CPU (one pass over the big token embedding); same update rule
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.5 * lr * (1.0 + math.cos(math.pi * t))

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
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
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
            with torch.no_grad():
                model.logit_scale.clamp_(0, _MAX_LOGIT_SCALE)
            losses.append(loss_v)
            bar.update(1, loss=f"{loss_v:.3f}")
    finally:
        bar.close()
        model.eval()
    return losses


# =====================================================================================================================
# LilT / LiT contrastive alignment: learnable temperature, global-batch InfoNCE, a DDP-ready training loop and
# retrieval evaluation (clip_loss / pretrain_contrastive above serve the synthetic pre-training of the demo).
#
#     leanclip.prepare(model, "lilt-ln")                                  # adds model.lilt_temperature
#     summary = train_contrastive(model, pairs, tokenizer, ContrastiveConfig(epochs=5, batch_size=256))
#     evaluate_retrieval(model, test_pairs, tokenizer)                  # {"i2t_R@1", ..., "t2i_R@10", "mean"}
#
# Loss. With L2-normalized features, s = 1/tau and the global batch of W ranks x b pairs (features all-gathered WITH
# gradient), rank r scores its own b images against all W*b captions and its own b captions against all W*b images:
#
#     L_r = 1/2 * ( CE(s * I_r T^T, y_r) + CE(s * T_r I^T, y_r) ),   y_r = r*b + arange(b)
#
# mean_r L_r is exactly the single-process symmetric InfoNCE of the W*b batch, and because the all-gather's backward
# sums every rank's gradient for a slice, DDP's gradient average equals the single-process gradient.
# =====================================================================================================================
import dataclasses as _dc  # noqa: E402
import time as _time  # noqa: E402
from dataclasses import dataclass as _dataclass, field as _field  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

from torch import nn as _nn  # noqa: E402

__all__ += ["LearnableTemperature", "contrastive_loss", "gather_features", "ContrastiveConfig", "train_contrastive",
            "evaluate_retrieval", "encode_pairs", "ContrastiveEncoder"]

TEMPERATURE_INIT, TEMPERATURE_MIN, TEMPERATURE_MAX = 0.07, 0.001, 0.5
CONTRASTIVE_CHECKPOINT = "checkpoint.safetensors"
CONTRASTIVE_LOG = "log.jsonl"
CONTRASTIVE_SUMMARY = "summary.json"


class LearnableTemperature(_nn.Module):
    """Learnable softmax temperature tau (ALBEF / LilT): ``temp`` starts at ``init`` (0.07) and is kept in
    [``min``, ``max``] = [0.001, 0.5] (``clamp_()`` in place after each optimizer step; the forward clamps the value too,
    with a straight-through gradient so a temperature sitting on a bound can still move back inside), i.e. a logit
    scale 1/tau in [2, 1000]. ``forward()`` returns the logit scale 1/tau."""

    def __init__(self, init: float = TEMPERATURE_INIT, min: float = TEMPERATURE_MIN, max: float = TEMPERATURE_MAX):
        super().__init__()
        for name, v in (("init", init), ("min", min), ("max", max)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"temperature {name} must be a positive finite number, got {v!r}")
        if not min <= init <= max:
            raise ValueError(f"temperature init={init} must lie in [min, max] = [{min}, {max}]")
        self.min, self.max = float(min), float(max)
        self.temp = _nn.Parameter(torch.tensor(float(init)))

    def extra_repr(self) -> str:
        return f"temp={float(self.temp):.4g}, range=[{self.min}, {self.max}]"

    @torch.no_grad()
    def clamp_(self) -> "LearnableTemperature":
        self.temp.clamp_(self.min, self.max)
        return self

    def forward(self) -> torch.Tensor:
        # Value clamped, gradient passed straight through: torch's clamp has a zero gradient AT the bounds, which
        # would freeze a temperature that reached 0.001 or 0.5 for good (ALBEF clamps in place and uses temp as is).
        t = self.temp
        return 1.0 / (t + (t.clamp(self.min, self.max) - t).detach())


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``x`` concatenated in rank order, with gradient back to each rank's slice (identity on one
    process). See ``leanclip.distributed.all_gather_with_grad``."""
    return all_gather_with_grad(x)


def contrastive_loss(img_feats: torch.Tensor, txt_feats: torch.Tensor, logit_scale, *,
                     gather: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's pairs against the GLOBAL batch (all ranks' features gathered with gradient
    when ``gather`` and a process group with >1 rank exist; otherwise the local batch, = ``clip_loss``).

    ``img_feats``, ``txt_feats``: (b, E) L2-normalized features of matching pairs; ``logit_scale``: 1/tau (tensor or
    float). Computed in float32; returns this rank's loss (the mean over ranks is the global-batch loss)."""
    if not isinstance(img_feats, torch.Tensor) or not isinstance(txt_feats, torch.Tensor):
        raise TypeError("img_feats and txt_feats must be tensors")
    if img_feats.dim() != 2 or img_feats.shape != txt_feats.shape or img_feats.shape[0] == 0:
        raise ValueError(f"img_feats and txt_feats must be non-empty (B, E) tensors of the same shape, got "
                         f"{tuple(img_feats.shape)} and {tuple(txt_feats.shape)}")
    img, txt = img_feats.float(), txt_feats.float()
    b = img.shape[0]
    if gather and D.is_distributed():
        both = gather_features(torch.cat([img, txt], dim=1))
        all_img, all_txt = both[:, :img.shape[1]], both[:, img.shape[1]:]
        offset = D.get_rank() * b
    else:
        all_img, all_txt, offset = img, txt, 0
    labels = torch.arange(offset, offset + b, device=img.device)
    logits_i2t = logit_scale * (img @ all_txt.t())
    logits_t2i = logit_scale * (txt @ all_img.t())
    return 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))


class ContrastiveEncoder(_nn.Module):
    """``forward(images, tokens) -> (image features, text features, logit scale)`` of a prepared model: the unit
    DistributedDataParallel wraps (so DDP sees the forward). Features are float32 and L2-normalized (lean models
    encode text with the exact EOT-truncated context); the logit scale is ``model.lilt_temperature()`` when the method
    added one, else ``model.logit_scale.exp()`` capped at 100 (open_clip)."""

    def __init__(self, model: _nn.Module):
        super().__init__()
        self.model = model

    def logit_scale(self) -> torch.Tensor:
        temp = method_hooks(self.model).get("temperature")
        if temp is not None:
            return temp()
        return self.model.logit_scale.float().exp().clamp(max=100.0)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        from leanclip.features import encode_tokens, image_features

        img = image_features(self.model, images)
        txt = F.normalize(encode_tokens(self.model, tokens).float(), dim=-1)
        return img, txt, self.logit_scale()


@_dataclass
class ContrastiveConfig:
    epochs: int = 1
    max_steps: int | None = None       # run length in optimizer steps, overrides epochs (None: epochs * steps per
                                       # epoch); the cosine schedule spans it
    stop_after_step: int | None = None  # end this invocation early (checkpoint written; the schedule is unchanged):
                                        # pre-emption / tests, continue with resume=
    batch_size: int = 64               # GLOBAL batch (all processes together); must divide by the world size
    lr: float = 1e-3
    weight_decay: float = 0.02         # on matrices only (not gains, biases, the temperature)
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 0              # linear warm-up, then cosine to min_lr (per step)
    min_lr: float = 0.0
    clip_grad_norm: float | None = None
    precision: str = "auto"            # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "fp32" | "bf16"
    device: str = "auto"
    seed: int = 0
    output: str | None = None          # run dir: log.jsonl, checkpoint.safetensors, summary.json (rank 0)
    log_every: int = 1
    progress: bool = True
    num_workers: int = 0
    augment: bool = False              # random resized crop (scale 0.5-1, no flip: captions say left/right)
    gather: bool = True                # negatives from the global batch (all ranks)
    checkpoint_every_epoch: bool = True
    eval_batch_size: int = 256
    extra: dict = _field(default_factory=dict)

    def validate(self) -> "ContrastiveConfig":
        def pos_int(name, v, minimum=1):
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")

        pos_int("epochs", self.epochs)
        pos_int("batch_size", self.batch_size)
        pos_int("log_every", self.log_every)
        pos_int("warmup_steps", self.warmup_steps, 0)
        pos_int("num_workers", self.num_workers, 0)
        pos_int("eval_batch_size", self.eval_batch_size)
        if self.max_steps is not None:
            pos_int("max_steps", self.max_steps)
        if self.stop_after_step is not None:
            pos_int("stop_after_step", self.stop_after_step)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not (isinstance(self.min_lr, (int, float)) and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"min_lr must be in [0, lr], got {self.min_lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be > 0 or None, got {self.clip_grad_norm!r}")
        if self.precision not in utils.PRECISIONS:
            raise ValueError(f"precision must be one of {utils.PRECISIONS}, got {self.precision!r}")
        return self

    def to_dict(self) -> dict:
        return _dc.asdict(self)


def _lr_at(step: int, cfg: ContrastiveConfig, total: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(1.0, t)))


def _adamw_groups(model: _nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "temperature" not in name and "logit_scale" not in name else no_decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def _default_transform(model: _nn.Module, train: bool, augment: bool):
    size = model.visual.image_size
    size = size if isinstance(size, int) else tuple(size)
    pp = getattr(model.visual, "preprocess_cfg", None) or {}
    kw = {k: tuple(pp[k]) for k in ("mean", "std") if pp.get(k)}
    if train and augment:
        return clip_transform(size, train=True, scale=(0.5, 1.0), flip=False, **kw)
    return clip_transform(size, train=False, **kw)


def _precision_for(model: _nn.Module, precision: str, device: torch.device) -> str:
    """``utils.resolve_precision``, except that a model holding 16-bit frozen weights (``prepare(...,
    frozen_dtype=torch.bfloat16)``) runs under bf16 autocast with ``auto`` (its fp32 trainable projections / adapters
    meet bf16 activations) and is an error with an explicit ``fp32``."""
    half = any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters() if not p.requires_grad)
    if half and precision == "fp32":
        raise ValueError("precision='fp32' but the model keeps frozen weights in 16 bits (frozen_dtype): use "
                         "precision='bf16' or 'auto'")
    if half and (precision or "auto") == "auto":
        return "bf16"
    return utils.resolve_precision(precision, device)


def _model_device_of(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _check_contrastive_method(model) -> str:
    info = getattr(model, "leanclip_info", None)
    if not info:
        raise ValueError("model was not prepared: call leanclip.prepare(model, method) (e.g. 'lilt-ln') before "
                         "train_contrastive()")
    method = info["method"]
    check_task(method, "contrastive")
    return method


def train_contrastive(model: _nn.Module, pairs, tokenizer: Callable, cfg: ContrastiveConfig | None = None, *,
                      eval_pairs=None, transform: Callable | None = None, resume=None) -> dict:
    """Contrastive alignment of a prepared model on image-text ``pairs`` (an ``leanclip.pairs.PairSet``).

    AdamW on the trainable parameters (weight decay on matrices only), linear warm-up + cosine per step, symmetric
    InfoNCE over the global batch with the learnable temperature, seeded (the batch order of epoch e is a function
    of (seed, e) only: ``DistributedSampler(seed=cfg.seed)`` + ``set_epoch(e)``; the last incomplete global batch is
    dropped). Under ``torchrun`` (a process group initialised, e.g. by ``leanclip.distributed.init_distributed``) the
    model runs under DistributedDataParallel with ``cfg.batch_size / world_size`` pairs per process; rank 0 writes
    ``log.jsonl`` (one line per logged step, the loss averaged over ranks), the trainable-only checkpoint (each epoch
    and at the end; ``leanclip.checkpoint.save_trainable`` with the optimizer state) and ``summary.json``.
    ``resume``: a checkpoint of this run (file or run dir) to continue from. ``eval_pairs``: evaluated (retrieval)
    after training on rank 0. Returns a summary dict (losses per step, timing, metrics)."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    cfg = (cfg or ContrastiveConfig()).validate()
    method = _check_contrastive_method(model)
    if not isinstance(pairs, PairSet):
        raise TypeError(f"pairs must be an leanclip.pairs.PairSet, got {type(pairs).__name__}")
    if tokenizer is None or not callable(tokenizer):
        raise ValueError("a tokenizer (callable: list[str] -> LongTensor) is needed")
    rank, world = D.get_rank(), D.get_world_size()
    local_bs = D.check_batch_size(cfg.batch_size, world)
    n = len(pairs)
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the {n} training pairs (the last incomplete "
                         f"global batch is dropped, so no step would run)")
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else cfg.max_steps
    n_epochs = math.ceil(total / steps_per_epoch)
    device = utils.resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    precision = _precision_for(model, cfg.precision, device)
    main = rank == 0
    out_dir = _Path(cfg.output) if cfg.output else None
    if out_dir is not None and main:
        out_dir.mkdir(parents=True, exist_ok=True)
        utils.remove_stale_temps(out_dir)
    log = utils.get_logger()
    ckpt = out_dir / CONTRASTIVE_CHECKPOINT if out_dir is not None else None

    utils.seed_everything(cfg.seed)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters: call leanclip.prepare(model, method) first")
    groups = _adamw_groups(model, cfg.weight_decay)
    try:  # the fused kernel (one pass per tensor) is much faster, on CPU too (LiT's token embedding); same rule
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    temp = method_hooks(model).get("temperature")
    encoder = ContrastiveEncoder(model)
    net = D.wrap_ddp(encoder, device)
    # a random augmentation must not be cached: each pass draws its own crops (seeded per item and epoch)
    ds = PairDataset(pairs, transform if transform is not None else _default_transform(model, True, cfg.augment),
                     cache=False if cfg.augment else None)

    step, history = 0, []
    if resume is not None:
        step, history = _resume_contrastive(model, opt, resume, cfg, steps_per_epoch)
    elif out_dir is not None and main and (out_dir / CONTRASTIVE_LOG).exists():
        (out_dir / CONTRASTIVE_LOG).unlink()
    D.barrier()

    def save(epoch_done: int) -> None:
        if out_dir is None or not main:
            return
        utils.check_finite_params(params, step=step, epoch=epoch_done, lr=_lr_at(max(step - 1, 0), cfg, total),
                                  checkpoint=ckpt)
        meta = {"leanclip_task": "contrastive", "method": method, "step": step, "steps_per_epoch": steps_per_epoch,
                "epoch": epoch_done, "world_size": world, "config": cfg.to_dict(), "rng": utils.get_rng_state()}
        meta.update(cfg.extra or {})
        save_trainable(model, out_dir / CONTRASTIVE_CHECKPOINT, optimizer=opt, step=step, extra_meta=meta)

    bar = utils.Progress(total, f"contrastive {method}", cfg.progress and main, initial=step)
    t_start, pairs_seen = _time.perf_counter(), 0
    model.train()
    try:
        start_epoch = step // steps_per_epoch
        stop = total if cfg.stop_after_step is None else min(total, cfg.stop_after_step)
        for epoch in range(start_epoch, n_epochs):
            if step >= stop:
                break
            sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                         drop_last=True)
            sampler.set_epoch(epoch)
            # augmentations seeded per (seed, epoch, pair): the run does not depend on the worker count
            loader = DataLoader(seeded_dataset(ds), batch_size=local_bs, sampler=ItemSeeds(sampler, cfg.seed, epoch),
                                drop_last=True, num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                                persistent_workers=False, generator=torch.Generator().manual_seed(cfg.seed))
            skip = step - epoch * steps_per_epoch  # > 0 only when resuming mid-epoch
            t_step = _time.perf_counter()
            for i, (images, captions) in enumerate(loader):
                if i < skip:
                    continue
                if step >= stop or i >= steps_per_epoch:
                    break
                lr = _lr_at(step, cfg, total)
                for g in opt.param_groups:
                    g["lr"] = lr
                tokens = torch.as_tensor(tokenizer(list(captions)))
                images = images.to(device, non_blocking=True)
                tokens = tokens.to(device, non_blocking=True)
                with utils.autocast(device, precision):
                    img_f, txt_f, scale = net(images, tokens)
                loss = contrastive_loss(img_f, txt_f, scale.float(), gather=cfg.gather)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad_norm is not None:  # the norm before clipping: non-finite iff a gradient is
                    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
                else:
                    gnorm = utils.grad_norm(params)
                # one host sync per step, before the update; the loss is the mean over ranks and the gradients
                # are all-reduced, so every rank sees the same values and stops together
                gloss, gn = torch.stack([D.all_reduce_mean(loss.detach().float()),
                                         gnorm.detach().float().to(loss.device)]).tolist()
                utils.check_finite_step(gloss, gn, step=step + 1, epoch=epoch + 1, lr=lr, checkpoint=ckpt)
                opt.step()
                if temp is not None:
                    temp.clamp_()
                step += 1
                dt = _time.perf_counter() - t_step
                t_step = _time.perf_counter()
                pairs_seen += cfg.batch_size
                rec = {"step": step, "epoch": epoch + 1, "loss": gloss, "lr": lr,
                       "temperature": float(1.0 / scale.detach().float()),
                       "pairs_per_s": cfg.batch_size / dt if dt > 0 else None}
                mem = utils.peak_memory_bytes(device)
                if mem is not None:
                    rec["peak_mem_bytes"] = mem
                history.append(rec)
                if main:
                    if out_dir is not None and (step % cfg.log_every == 0 or step == stop):
                        utils.append_jsonl(out_dir / CONTRASTIVE_LOG, rec)
                    bar.update(1, loss=f"{gloss:.4f}", tau=f"{rec['temperature']:.4f}", lr=f"{lr:.2e}")
            ep = [r["loss"] for r in history if r["epoch"] == epoch + 1]
            if ep and main:
                log.info("epoch %d/%d: loss %.4f", epoch + 1, n_epochs, sum(ep) / len(ep))
            if cfg.checkpoint_every_epoch and step < stop:
                save(epoch + 1)
                D.barrier()
        save(math.ceil(step / steps_per_epoch))
        D.barrier()
    finally:
        bar.close()
        model.eval()
    seconds = _time.perf_counter() - t_start
    metrics = {}
    if eval_pairs is not None and main:
        metrics = evaluate_retrieval(model, eval_pairs, tokenizer, batch_size=cfg.eval_batch_size, device=device,
                                     precision=precision, transform=transform)
        log.info("retrieval: %s", metrics)
    summary = {
        "task": "contrastive", "method": method, "config": cfg.to_dict(), "device": str(device),
        "precision": precision, "world_size": world, "steps": step, "steps_per_epoch": steps_per_epoch,
        "losses": [r["loss"] for r in history], "final_loss": history[-1]["loss"] if history else None,
        "temperature": float(1.0 / encoder.logit_scale().detach().float()), "metrics": metrics,
        "seconds": seconds, "pairs_per_s": pairs_seen / seconds if seconds > 0 else None,
    }
    if out_dir is not None and main:
        summary["checkpoint"] = str(out_dir / CONTRASTIVE_CHECKPOINT)
        summary["log"] = str(out_dir / CONTRASTIVE_LOG)
        utils.atomic_write_json(out_dir / CONTRASTIVE_SUMMARY, {k: v for k, v in summary.items() if k != "losses"})
    return summary


def _resume_contrastive(model, opt, path, cfg, steps_per_epoch) -> tuple[int, list]:
    p = _Path(path)
    if p.is_dir():
        p = p / CONTRASTIVE_CHECKPOINT
    if not p.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {str(p)!r}")
    meta = load_trainable(model, p, optimizer=opt)
    extra = meta.get("extra") or {}
    if extra.get("leanclip_task") != "contrastive":
        raise ValueError(f"resume: {str(p)!r} is not a contrastive-training checkpoint")
    if int(extra.get("steps_per_epoch", steps_per_epoch)) != steps_per_epoch:
        raise ValueError(f"resume: checkpoint has {extra.get('steps_per_epoch')} steps per epoch, this run "
                         f"{steps_per_epoch} (dataset or batch size changed)")
    if "rng" in extra:
        utils.set_rng_state(extra["rng"])
    step = int(extra.get("step", meta.get("step") or 0))
    history = []
    if cfg.output:
        lp = _Path(cfg.output) / CONTRASTIVE_LOG
        if lp.exists():
            utils.truncate_jsonl(lp, lambda r: r.get("step", 0) <= step)
            history = [r for r in utils.read_jsonl(lp) if "loss" in r]
    return step, history


@torch.no_grad()
def encode_pairs(model: _nn.Module, pairs, tokenizer: Callable, *, batch_size: int = 256, device=None,
                 precision: str = "auto", transform: Callable | None = None, progress: bool = False):
    """(image features (N_img, E), text features (N_txt, E)), float32, L2-normalized, of a PairSet."""
    from torch.utils.data import DataLoader

    from leanclip.features import encode_tokens, image_features
    if not isinstance(pairs, PairSet):
        raise TypeError(f"pairs must be an leanclip.pairs.PairSet, got {type(pairs).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = utils.resolve_device(device if device is not None else _model_device_of(model))
    precision = _precision_for(model, precision, device)
    tf = transform if transform is not None else _default_transform(model, False, False)
    was_training = model.training
    model.eval()
    try:
        imgs = []
        loader = DataLoader(ImageListDataset(pairs, tf), batch_size=batch_size, shuffle=False)
        for x in utils.track(loader, "encode images", progress):
            with utils.autocast(device, precision):
                imgs.append(image_features(model, x.to(device)).float())
        txts = []
        for a in range(0, len(pairs.captions), batch_size):
            tok = torch.as_tensor(tokenizer(list(pairs.captions[a:a + batch_size])))
            with utils.autocast(device, precision):
                txts.append(F.normalize(encode_tokens(model, tok.to(device)).float(), dim=-1))
    finally:
        model.train(was_training)
    return torch.cat(imgs), torch.cat(txts)


def evaluate_retrieval(model: _nn.Module, pairs, tokenizer: Callable, *, batch_size: int = 256, device=None,
                       precision: str = "auto", transform: Callable | None = None, ks=(1, 5, 10),
                       progress: bool = False) -> dict:
    """Image->text and text->image recall@k (k = 1, 5, 10, in %) and their means (``leanclip.metrics``), over the unique
    images of ``pairs`` against all captions (an image is a hit when any of its captions ranks in the top k)."""
    img, txt = encode_pairs(model, pairs, tokenizer, batch_size=batch_size, device=device, precision=precision,
                            transform=transform, progress=progress)
    out = retrieval_recall_from_features(img, txt, torch.as_tensor(pairs.txt_to_img), ks=tuple(ks), normalize=False)
    out["n_images"], out["n_captions"] = pairs.num_images, len(pairs)
    return out
