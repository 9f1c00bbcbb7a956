"""LilT / LiT contrastive alignment: learnable temperature, global-batch InfoNCE, a DDP-ready training loop and
retrieval evaluation.

    leanclip.prepare(model, "lilt-ln")                                  # adds the learnable temperature
    summary = train_contrastive(model, pairs, tokenizer, ContrastiveConfig(epochs=5, batch_size=256))
    evaluate_retrieval(model, test_pairs, tokenizer)                  # {"i2t_R@1", ..., "t2i_R@10", "mean"}

Loss: ``leanclip.losses.clip_loss`` with ``gather=cfg.gather`` (negatives from the global batch, all ranks), the
learnable temperature's scale when the method added one, else ``model.logit_scale.exp()`` (capped in place after each
step by ``leanclip.losses.clamp_logit_scale_``).

The loop uses the shared training components (``leanclip.training``: schedule, AdamW with decay on matrices,
checkpoint state with every RNG, run log).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from leanclip import distributed as D
from leanclip import utils
from leanclip.calibration import FirstStepCheck
from leanclip.data import ItemSeeds, clip_transform, seeded_dataset
from leanclip.losses import clamp_logit_scale_, clip_loss
from leanclip.metrics import retrieval_recall_from_features
from leanclip.pairs import ImageListDataset, PairDataset, PairSet
from leanclip.registry import check_task, method_hooks
from leanclip.run_files import CHECKPOINT_NAME, LOG_NAME, SUMMARY_NAME
from leanclip.select import model_device, trainable_parameters
from leanclip.training import (check_config, cosine_lr, load_run_state, matrix_decay_adamw, resume_log,
                               save_run_state, set_lr)

__all__ = ["LearnableTemperature", "ContrastiveConfig", "train_contrastive", "evaluate_retrieval", "encode_pairs",
           "ContrastiveEncoder"]

TEMPERATURE_INIT, TEMPERATURE_MIN, TEMPERATURE_MAX = 0.07, 0.001, 0.5


class LearnableTemperature(nn.Module):
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
        self.temp = nn.Parameter(torch.tensor(float(init)))

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


class ContrastiveEncoder(nn.Module):
    """``forward(images, tokens) -> (image features, text features, logit scale)`` of a prepared model: the unit
    DistributedDataParallel wraps (so DDP sees the forward). Features are float32 and L2-normalized (lean models
    encode text with the exact EOT-truncated context); the logit scale is ``model.lilt_temperature()`` when the method
    added one, else ``model.logit_scale.exp()``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def logit_scale(self) -> torch.Tensor:
        temp = method_hooks(self.model).get("temperature")
        if temp is not None:
            return temp()
        return self.model.logit_scale.float().exp()

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        from leanclip.features import encode_tokens, image_features

        img = image_features(self.model, images)
        txt = F.normalize(encode_tokens(self.model, tokens).float(), dim=-1)
        return img, txt, self.logit_scale()


@dataclass
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
    randaugment: bool | str = False    # + RandAugment: True / "torchvision", or "albef" (LilT's; with augment)
    gather: bool = True                # negatives from the global batch (all ranks)
    checkpoint_every_epoch: bool = True
    eval_batch_size: int = 256
    extra: dict = field(default_factory=dict)

    def validate(self) -> "ContrastiveConfig":
        """ValueError naming the first field out of range (``leanclip.training.check_config``)."""
        check_config(self, ("epochs", "batch_size", "lr", "min_lr", "weight_decay", "warmup_steps", "log_every",
                            "seed", "num_workers", "eval_batch_size"),
                     optional=("max_steps", "stop_after_step", "clip_grad_norm"),
                     kinds={"eval_batch_size": "batch_size", "stop_after_step": "max_steps"})
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr must be in [0, lr], got {self.min_lr!r} with lr={self.lr!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _default_transform(model: nn.Module, train: bool, augment: bool, randaugment: bool = False):
    size = model.visual.image_size
    size = size if isinstance(size, int) else tuple(size)
    pp = getattr(model.visual, "preprocess_cfg", None) or {}
    kw = {k: tuple(pp[k]) for k in ("mean", "std") if pp.get(k)}
    if train and augment:
        return clip_transform(size, train=True, scale=(0.5, 1.0), flip=False, randaugment=randaugment, **kw)
    return clip_transform(size, train=False, **kw)


def _precision_for(model: nn.Module, precision: str, device: torch.device) -> str:
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


def _check_contrastive_method(model) -> str:
    info = getattr(model, "leanclip_info", None)
    if not info:
        raise ValueError("model was not prepared: call leanclip.prepare(model, method) (e.g. 'lilt-ln') before "
                         "train_contrastive()")
    method = info["method"]
    check_task(method, "contrastive")
    return method


def train_contrastive(model: nn.Module, pairs, tokenizer: Callable, cfg: ContrastiveConfig | None = None, *,
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
    cfg = (cfg or ContrastiveConfig()).validate()
    method = _check_contrastive_method(model)
    if not isinstance(pairs, PairSet):
        raise TypeError(f"pairs must be an leanclip.pairs.PairSet, got {type(pairs).__name__}")
    if tokenizer is None or not callable(tokenizer):
        raise ValueError("a tokenizer (callable: list[str] -> LongTensor) is needed")
    run = _start_contrastive(model, method, pairs, tokenizer, cfg, transform, resume)
    model.train()
    try:
        for epoch in range(run.step // run.steps_per_epoch, run.n_epochs):
            if run.step >= run.stop:
                break
            _contrastive_epoch(run, epoch)
            if cfg.checkpoint_every_epoch and run.step < run.stop:
                _save_contrastive(run, epoch + 1)
                D.barrier()
        _save_contrastive(run, math.ceil(run.step / run.steps_per_epoch))
        D.barrier()
    finally:
        run.bar.close()
        model.eval()
    return _contrastive_summary(run, eval_pairs, transform)


@dataclass
class _ContrastiveRun:
    """What one contrastive run carries from step to step."""
    model: nn.Module
    method: str
    tokenizer: Callable
    cfg: ContrastiveConfig
    device: torch.device
    precision: str
    rank: int
    world: int
    local_batch: int
    steps_per_epoch: int
    total: int
    n_epochs: int
    stop: int
    out_dir: Path | None
    params: list
    opt: torch.optim.Optimizer
    encoder: ContrastiveEncoder
    net: nn.Module
    dataset: Any
    bar: Any = None
    step: int = 0
    history: list = field(default_factory=list)
    pairs_seen: int = 0
    t_start: float = field(default_factory=time.perf_counter)
    peak_check: FirstStepCheck | None = None   # the first step's measured peak against the recompute plan (CUDA)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def checkpoint(self) -> Path | None:
        return self.out_dir / CHECKPOINT_NAME if self.out_dir is not None else None


def _run_length(cfg: ContrastiveConfig, n_pairs: int) -> tuple[int, int, int, int]:
    """(steps per epoch, total steps, epochs, steps of this invocation) for ``n_pairs`` pairs."""
    steps_per_epoch = n_pairs // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the {n_pairs} training pairs (the last "
                         f"incomplete global batch is dropped, so no step would run)")
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else cfg.max_steps
    stop = total if cfg.stop_after_step is None else min(total, cfg.stop_after_step)
    return steps_per_epoch, total, math.ceil(total / steps_per_epoch), stop


def _start_contrastive(model, method, pairs, tokenizer, cfg, transform, resume) -> _ContrastiveRun:
    """Device, seed, optimizer, the DDP-wrapped encoder, the dataset, and the state of an interrupted run."""
    rank, world = D.get_rank(), D.get_world_size()
    local_batch = D.check_batch_size(cfg.batch_size, world)
    steps_per_epoch, total, n_epochs, stop = _run_length(cfg, len(pairs))
    device = utils.resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    precision = _precision_for(model, cfg.precision, device)
    out_dir = Path(cfg.output) if cfg.output else None
    if out_dir is not None and rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        utils.remove_stale_temps(out_dir)
    utils.seed_everything(cfg.seed)
    model.to(device)
    params = [p for _, p in trainable_parameters(model)]
    if not params:
        raise ValueError("model has no trainable parameters: call leanclip.prepare(model, method) first")
    opt = matrix_decay_adamw(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps)
    encoder = ContrastiveEncoder(model)
    # a random augmentation must not be cached: each pass draws its own crops (seeded per item and epoch)
    tf = transform if transform is not None else _default_transform(model, True, cfg.augment, cfg.randaugment)
    ds = PairDataset(pairs, tf, cache=False if cfg.augment else None)
    run = _ContrastiveRun(model, method, tokenizer, cfg, device, precision, rank, world, local_batch,
                          steps_per_epoch, total, n_epochs, stop, out_dir, params, opt, encoder,
                          D.wrap_ddp(encoder, device), ds)
    if resume is not None:
        run.step, run.history = _resume_contrastive(model, opt, resume, cfg, steps_per_epoch)
    elif out_dir is not None and rank == 0 and (out_dir / LOG_NAME).exists():
        (out_dir / LOG_NAME).unlink()
    D.barrier()
    run.bar = utils.Progress(total, f"contrastive {method}", cfg.progress and rank == 0, initial=run.step)
    run.peak_check = FirstStepCheck(model, device)
    run.t_start = time.perf_counter()
    return run


def _epoch_loader(run: _ContrastiveRun, epoch: int) -> DataLoader:
    """This rank's batches of ``epoch``: a function of (seed, epoch) only, whatever the worker count."""
    cfg = run.cfg
    sampler = DistributedSampler(run.dataset, num_replicas=run.world, rank=run.rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    return DataLoader(seeded_dataset(run.dataset), batch_size=run.local_batch,
                      sampler=ItemSeeds(sampler, cfg.seed, epoch), drop_last=True, num_workers=cfg.num_workers,
                      pin_memory=run.device.type == "cuda", persistent_workers=False,
                      generator=torch.Generator().manual_seed(cfg.seed))


def _contrastive_epoch(run: _ContrastiveRun, epoch: int) -> None:
    skip = run.step - epoch * run.steps_per_epoch  # > 0 only when resuming mid-epoch
    t_step = time.perf_counter()
    for i, (images, captions) in enumerate(_epoch_loader(run, epoch)):
        if i < skip:
            continue
        if run.step >= run.stop or i >= run.steps_per_epoch:
            break
        rec = _contrastive_step(run, epoch, images, captions, t_step)
        t_step = time.perf_counter()
        if run.main:
            if run.out_dir is not None and (run.step % run.cfg.log_every == 0 or run.step == run.stop):
                utils.append_jsonl(run.out_dir / LOG_NAME, rec)
            run.bar.update(1, loss=f"{rec['loss']:.4f}", tau=f"{rec['temperature']:.4f}", lr=f"{rec['lr']:.2e}")
    losses = [r["loss"] for r in run.history if r["epoch"] == epoch + 1]
    if losses and run.main:
        utils.get_logger().info("epoch %d/%d: loss %.4f", epoch + 1, run.n_epochs, sum(losses) / len(losses))


def _contrastive_step(run: _ContrastiveRun, epoch: int, images, captions, t_step: float) -> dict:
    """One optimizer step on a batch; the finiteness check is its one host sync, before the update. The loss is the
    mean over ranks and the gradients are all-reduced, so every rank sees the same values and stops together."""
    cfg, device = run.cfg, run.device
    lr = cosine_lr(run.step, run.total, cfg.lr, warmup=cfg.warmup_steps, min_lr=cfg.min_lr)
    set_lr(run.opt, lr)
    run.peak_check.begin()
    tokens = torch.as_tensor(run.tokenizer(list(captions))).to(device, non_blocking=True)
    images = images.to(device, non_blocking=True)
    with utils.autocast(device, run.precision):
        img_f, txt_f, scale = run.net(images, tokens)
    loss = clip_loss(img_f, txt_f, scale.float(), gather=cfg.gather)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.clip_grad_norm is not None:  # the norm before clipping: non-finite iff a gradient is
        gnorm = torch.nn.utils.clip_grad_norm_(run.params, cfg.clip_grad_norm)
    else:
        gnorm = utils.grad_norm(run.params)
    gloss, gn = torch.stack([D.all_reduce_mean(loss.detach().float()),
                             gnorm.detach().float().to(loss.device)]).tolist()
    utils.check_finite_step(gloss, gn, step=run.step + 1, epoch=epoch + 1, lr=lr, checkpoint=run.checkpoint)
    run.peak_check.end()
    run.opt.step()
    temp = method_hooks(run.model).get("temperature")
    if temp is not None:
        temp.clamp_()
    else:
        clamp_logit_scale_(run.model)
    run.step += 1
    dt = time.perf_counter() - t_step
    run.pairs_seen += cfg.batch_size
    rec = {"step": run.step, "epoch": epoch + 1, "loss": gloss, "lr": lr,
           "temperature": float(1.0 / scale.detach().float()),
           "pairs_per_s": cfg.batch_size / dt if dt > 0 else None}
    mem = utils.peak_memory_bytes(device)
    if mem is not None:
        rec["peak_mem_bytes"] = mem
    run.history.append(rec)
    return rec


def _save_contrastive(run: _ContrastiveRun, epoch_done: int) -> None:
    """Rank 0's checkpoint (``leanclip.training.save_run_state``), all weights finite."""
    if run.out_dir is None or not run.main:
        return
    cfg = run.cfg
    utils.check_finite_params(run.params, step=run.step, epoch=epoch_done, checkpoint=run.checkpoint,
                              lr=cosine_lr(max(run.step - 1, 0), run.total, cfg.lr, warmup=cfg.warmup_steps,
                                           min_lr=cfg.min_lr))
    meta = {"leanclip_task": "contrastive", "method": run.method, "step": run.step,
            "steps_per_epoch": run.steps_per_epoch, "epoch": epoch_done, "world_size": run.world,
            "config": cfg.to_dict()}
    save_run_state(run.model, run.opt, run.checkpoint, run.step, meta)


def _resume_contrastive(model, opt, path, cfg, steps_per_epoch) -> tuple[int, list]:
    meta = load_run_state(model, opt, path, CHECKPOINT_NAME)
    if meta.get("leanclip_task") != "contrastive":
        raise ValueError(f"resume: {meta['path']!r} is not a contrastive-training checkpoint")
    if int(meta.get("steps_per_epoch", steps_per_epoch)) != steps_per_epoch:
        raise ValueError(f"resume: checkpoint has {meta.get('steps_per_epoch')} steps per epoch, this run "
                         f"{steps_per_epoch} (dataset or batch size changed)")
    if "rng" in meta:
        utils.set_rng_state(meta["rng"])
    step = int(meta.get("step") or 0)
    return step, resume_log(cfg.output, step, LOG_NAME)


def _contrastive_summary(run: _ContrastiveRun, eval_pairs, transform) -> dict:
    """Retrieval on ``eval_pairs`` (rank 0) and the run's summary (also ``summary.json``)."""
    seconds = time.perf_counter() - run.t_start
    metrics = {}
    if eval_pairs is not None and run.main:
        metrics = evaluate_retrieval(run.model, eval_pairs, run.tokenizer, batch_size=run.cfg.eval_batch_size,
                                     device=run.device, precision=run.precision, transform=transform)
        utils.get_logger().info("retrieval: %s", metrics)
    history = run.history
    summary = {
        "task": "contrastive", "method": run.method, "config": run.cfg.to_dict(), "device": str(run.device),
        "precision": run.precision, "world_size": run.world, "steps": run.step,
        "steps_per_epoch": run.steps_per_epoch, "losses": [r["loss"] for r in history],
        "final_loss": history[-1]["loss"] if history else None,
        "temperature": float(1.0 / run.encoder.logit_scale().detach().float()), "metrics": metrics,
        "seconds": seconds, "pairs_per_s": run.pairs_seen / seconds if seconds > 0 else None,
    }
    if run.out_dir is not None and run.main:
        summary["checkpoint"] = str(run.checkpoint)
        summary["log"] = str(run.out_dir / LOG_NAME)
        utils.atomic_write_json(run.out_dir / SUMMARY_NAME,
                                {k: v for k, v in summary.items() if k != "losses"})
    return summary


@torch.no_grad()
def encode_pairs(model: nn.Module, pairs, tokenizer: Callable, *, batch_size: int = 256, device=None,
                 precision: str = "auto", transform: Callable | None = None, progress: bool = False):
    """(image features (N_img, E), text features (N_txt, E)), float32, L2-normalized, of a PairSet."""
    from leanclip.features import encode_tokens, image_features

    if not isinstance(pairs, PairSet):
        raise TypeError(f"pairs must be an leanclip.pairs.PairSet, got {type(pairs).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = utils.resolve_device(device if device is not None else model_device(model))
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


def evaluate_retrieval(model: nn.Module, pairs, tokenizer: Callable, *, batch_size: int = 256, device=None,
                       precision: str = "auto", transform: Callable | None = None, ks=(1, 5, 10),
                       progress: bool = False) -> dict:
    """Image->text and text->image recall@k (k = 1, 5, 10, in %) and their means (``leanclip.metrics``), over the unique
    images of ``pairs`` against all captions (an image is a hit when any of its captions ranks in the top k)."""
    img, txt = encode_pairs(model, pairs, tokenizer, batch_size=batch_size, device=device, precision=precision,
                            transform=transform, progress=progress)
    out = retrieval_recall_from_features(img, txt, torch.as_tensor(pairs.txt_to_img), ks=tuple(ks), normalize=False)
    out["n_images"], out["n_captions"] = pairs.num_images, len(pairs)
    return out
