"""Training components shared by the loops (``leanclip.trainer`` for back-propagating methods, ``leanclip.llu`` for
cached-feature ones, ``leanclip.contrastive`` for image-text alignment, ``leanclip.pretrain`` for the synthetic
pre-training): the learning-rate schedule, the optimizers, the loaders, the checkpoint with every RNG state (save /
exact resume), the run log and the run summary. A loop uses these, never another loop's internals."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from leanclip import utils
from leanclip.checkpoint import load_trainable, read_metadata, save_trainable
from leanclip.data import make_loader
from leanclip.registry import method_trainer
from leanclip.run_files import CHECKPOINT_NAME, LOG_NAME, SUMMARY_NAME


# ------------------------------------------------------------------------------------------------------------ config
def check_config(cfg, numbers: Iterable[str], *, optional: Iterable[str] = (),
                 kinds: Mapping[str, str] | None = None) -> None:
    """The one validation of a loop's config (``TrainConfig``, ``ContrastiveConfig``): each field in ``numbers``, and
    each in ``optional`` that is not None (off), against its row of ``leanclip.utils.NUMBER_RANGES`` (the command
    line's table, so the API accepts exactly what the CLI accepts; ``kinds``: field -> the row it is checked as), then
    ``precision``. ValueError naming the first field out of range."""
    kinds = kinds or {}
    for name in numbers:
        utils.check_number(name, getattr(cfg, name), kind_of=kinds.get(name))
    for name in optional:
        if getattr(cfg, name) is not None:
            utils.check_number(name, getattr(cfg, name), kind_of=kinds.get(name))
    if cfg.precision not in utils.PRECISIONS:
        raise ValueError(f"precision must be one of {utils.PRECISIONS}, got {cfg.precision!r}")


# ----------------------------------------------------------------------------------------------- schedule, optimizer
def cosine_lr(step: int, total: int, lr: float, *, warmup: int = 0, warmup_lr: float | None = None,
              min_lr: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total``: during the first ``warmup`` steps constant at
    ``warmup_lr`` (CoOp's ConstantWarmupScheduler) or, without one, linear up to ``lr``; then cosine from ``lr`` to
    ``min_lr`` over the remaining steps."""
    if step < warmup:
        return warmup_lr if warmup_lr is not None else lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, t)))


def lr_at(step: int, cfg, steps_per_epoch: int) -> float:
    """Learning rate of the classification trainer's step ``step``: constant warm-up for ``cfg.warmup_epochs`` (skipped
    when it would take the whole run), then cosine to 0 per step, or constant (``cfg.scheduler``)."""
    warm = cfg.warmup_epochs * steps_per_epoch if cfg.warmup_epochs < cfg.epochs else 0
    if cfg.scheduler == "constant" and step >= warm:
        return cfg.lr
    return cosine_lr(step, cfg.epochs * steps_per_epoch, cfg.lr, warmup=warm, warmup_lr=cfg.warmup_lr)


def build_optimizer(params: Sequence[torch.nn.Parameter], cfg) -> torch.optim.Optimizer:
    """SGD (momentum ``cfg.momentum``) or AdamW over ``params``, at ``cfg.lr`` with ``cfg.weight_decay``."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def matrix_decay_adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.98),
                       eps: float = 1e-6) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model`` with weight decay on matrices only (not on gains, biases,
    the logit scale or a temperature), CLIP's recipe; the fused kernel where torch has one for the device (one pass
    per tensor, much faster on CPU too), the same update rule either way."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "temperature" not in name and "logit_scale" not in name else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def steps_per_epoch(n_train: int, cfg) -> int:
    """Optimizer steps of one epoch over ``n_train`` items under ``cfg`` (a ``TrainConfig``): one per batch for the
    cached-feature trainer (LLU), one per ``grad_accum`` batches for the back-propagating one."""
    batches = math.ceil(n_train / cfg.batch_size)
    return batches if method_trainer(cfg.method) == "cached" else math.ceil(batches / cfg.grad_accum)


# ------------------------------------------------------------------------------------------------------------ labels
def dataset_labels(dataset) -> torch.Tensor | None:
    """The labels of ``dataset`` as an int64 tensor without loading an image (``ImageDataset`` and
    ``TensorImageDataset`` know them), or None for a dataset that does not say."""
    labels = getattr(dataset, "labels", None)
    if labels is None or callable(labels):
        return None
    return torch.as_tensor(labels if isinstance(labels, torch.Tensor) else list(labels)).long().reshape(-1)


def check_labels(labels, n_classes: int, what: str) -> None:
    """ValueError naming ``what`` when a label is not a class index in ``[0, n_classes)`` (labels index the class
    names): an out-of-range label would otherwise surface as an IndexError deep in the loss, or not at all."""
    y = torch.as_tensor(labels)
    if y.numel() == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= n_classes:
        raise ValueError(f"{what}: label {lo if lo < 0 else hi} is out of range for {n_classes} class names "
                         f"(labels must lie in [0, {n_classes}))")


# ----------------------------------------------------------------------------------------------------------- loaders
def epoch_loader(dataset, batch_size: int, seed: int, epoch: int, num_workers: int = 0, pin_memory: bool = False):
    """The shuffled loader of one epoch: its batches (order and augmentations) are a function of ``(seed, epoch)``
    only, whichever worker count and however often it is iterated."""
    return make_loader(dataset, batch_size, shuffle=True, seed=seed, epoch=epoch, num_workers=num_workers,
                       drop_last=False, pin_memory=pin_memory, persistent_workers=False)


def eval_loader(dataset, batch_size: int, num_workers: int = 0, pin_memory: bool = False):
    """The loader of an evaluation set, in order."""
    return make_loader(dataset, batch_size, shuffle=False, seed=0, epoch=0, num_workers=num_workers,
                       drop_last=False, pin_memory=pin_memory, persistent_workers=False)


def run_summary(cfg, history, metrics, out_dir, seconds, images_seen, device, precision, stopped_at=None) -> dict:
    """The run's summary dict (per-step losses, final metrics, timing); also ``summary.json`` under ``out_dir``."""
    s = {
        "method": cfg.method,
        "config": cfg.to_dict(),
        "device": str(device),
        "precision": precision,
        "steps": len(history) and history[-1]["step"],
        "losses": [r["loss"] for r in history],
        "accs": [r["acc"] for r in history],
        "final_train_loss": history[-1]["loss"] if history else None,
        "metrics": metrics,
        "seconds": seconds,
        "img_per_s": images_seen / seconds if seconds > 0 else None,
        "stopped_at_epoch": stopped_at,
    }
    if out_dir is not None:
        s["checkpoint"] = str(out_dir / CHECKPOINT_NAME)
        s["log"] = str(out_dir / LOG_NAME)
        utils.atomic_write_json(out_dir / SUMMARY_NAME, {k: v for k, v in s.items() if k not in ("losses", "accs")})
    return s


# -------------------------------------------------------------------------------------------------- checkpoint/resume
def save_run_state(model, opt, path, step: int, meta: dict) -> None:
    """A loop's checkpoint: trainable parameters, optimizer state, ``step``, every RNG state and the loop's ``meta``
    (written atomically)."""
    save_trainable(model, path, optimizer=opt, step=step, extra_meta={**meta, "rng": utils.get_rng_state()})


def load_run_state(model, opt, path, name: str = CHECKPOINT_NAME) -> dict:
    """Load a :func:`save_run_state` checkpoint (a file, or a run folder holding ``name``) into ``model`` and ``opt``;
    returns the loop's meta (the RNG states are the caller's to restore once it accepted the meta)."""
    path = Path(path)
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {str(path)!r}")
    return {**trainer_meta(load_trainable(model, path, optimizer=opt)), "path": str(path)}


def resume_log(out_dir, step: int, name: str = LOG_NAME) -> list:
    """The run log of an interrupted run, cut back to its checkpoint's ``step`` (lines a crash wrote after it are
    dropped from the file too): the logged step records it keeps."""
    if out_dir is None:
        return []
    log_path = Path(out_dir) / name
    if not log_path.exists():
        return []
    utils.truncate_jsonl(log_path, lambda r: r.get("step", 0) <= step)
    return [r for r in utils.read_jsonl(log_path) if "loss" in r]


def save_state(model, opt, path, cfg, epoch, step, steps_per_epoch, classnames, templates) -> None:
    """The trainer's end-of-epoch checkpoint: trainable parameters, optimizer, step, schedule, every RNG state, the
    config."""
    meta = {
        "leanclip_trainer": 1,
        "method": cfg.method,
        "epoch": epoch,               # completed epochs
        "position": 0,                # micro-batches consumed in epoch `epoch` (checkpoints sit on epoch boundaries)
        "step": step,
        "scheduler": {"kind": cfg.scheduler, "step": step, "steps_per_epoch": steps_per_epoch},
        "config": cfg.to_dict(),
        "classnames": list(classnames),
        "templates": list(templates),
    }
    save_run_state(model, opt, path, step, meta)


_OPTIMIZER_CLASSES = {"sgd": "SGD", "adamw": "AdamW"}  # cfg.optimizer -> the class build_optimizer makes


def check_resume(path, cfg, steps_per_epoch: int, name: str = CHECKPOINT_NAME) -> str:
    """The checks of :func:`resume_state` that need no model, from the checkpoint's header alone: ``path`` (a file,
    or a run folder holding ``name``) is a trainer checkpoint of ``cfg.method`` saved at an epoch boundary, holding
    the state of the optimizer ``cfg.optimizer`` builds, with ``steps_per_epoch`` steps per epoch (same data, batch
    size and grad_accum). A run calls it before its first write, so a refused resume leaves the run folder as it
    was. Returns the checkpoint file's path."""
    path = Path(path)
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {str(path)!r}")
    meta = read_metadata(path)
    where = f"resume: {str(path)!r}"
    extra = json.loads(meta.get("extra") or "null")
    if not isinstance(extra, dict) or "epoch" not in extra or "rng" not in extra:
        raise ValueError(f"{where} is not a trainer checkpoint (no epoch/rng state)")
    if cfg.method is not None and meta.get("method") != cfg.method:
        raise ValueError(f"{where} is a {meta.get('method')!r} checkpoint, this run trains {cfg.method!r}")
    saved_opt = (json.loads(meta.get("optimizer") or "null") or {}).get("class")
    if saved_opt != _OPTIMIZER_CLASSES.get(cfg.optimizer):
        raise ValueError(f"{where} holds {saved_opt} optimizer state, this run's optimizer is {cfg.optimizer!r}")
    saved_steps = (extra.get("scheduler") or {}).get("steps_per_epoch", steps_per_epoch)
    if saved_steps != steps_per_epoch:
        raise ValueError(f"{where} has {saved_steps} steps per epoch, this run {steps_per_epoch} (dataset, batch "
                         f"size or grad_accum changed)")
    if int(extra.get("position", 0)) != 0:
        raise ValueError(f"{where}: mid-epoch checkpoints are not supported")
    return str(path)


def resume_state(model, opt, path, cfg, steps_per_epoch) -> tuple[int, int, list]:
    """Load a :func:`save_state` checkpoint into ``model`` / ``opt`` and the RNGs -> (epoch, step, logged history;
    the log file is cut back to the checkpoint). :func:`check_resume` first: nothing is loaded from a checkpoint
    this run cannot continue."""
    check_resume(path, cfg, steps_per_epoch)
    meta = load_run_state(model, opt, path)
    utils.set_rng_state(meta["rng"])
    step = int(meta["step"])
    return int(meta["epoch"]), step, resume_log(cfg.output, step)


def trainer_meta(meta) -> dict:
    """The ``extra_meta`` dict we saved, from ``leanclip.checkpoint.load_trainable``'s metadata (key ``"extra"``)."""
    if not meta:
        return {}
    extra = meta.get("extra") if isinstance(meta, dict) else None
    return dict(extra) if isinstance(extra, dict) else {}
