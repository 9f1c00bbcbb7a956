"""Training components shared by the loops (``leanclip.trainer`` for back-propagating methods, ``leanclip.llu`` for
cached-feature ones): the learning-rate schedule, the optimizer, the loaders, the end-of-epoch checkpoint with every
RNG state (save / exact resume) and the run summary. A loop uses these, never another loop's internals."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from leanclip import utils
from leanclip.checkpoint import load_trainable, save_trainable
from leanclip.data import make_loader

CHECKPOINT_NAME = "checkpoint.safetensors"
LOG_NAME = "log.jsonl"
SUMMARY_NAME = "summary.json"


# ----------------------------------------------------------------------------------------------- schedule, optimizer
def lr_at(step: int, cfg, steps_per_epoch: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): constant warm-up, then cosine to 0 (per step)."""
    total = cfg.epochs * steps_per_epoch
    warm = cfg.warmup_epochs * steps_per_epoch if cfg.warmup_epochs < cfg.epochs else 0
    if step < warm:
        return cfg.warmup_lr
    if cfg.scheduler == "constant":
        return cfg.lr
    t = (step - warm) / max(1, total - warm)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * min(1.0, t)))


def build_optimizer(params: Sequence[torch.nn.Parameter], cfg) -> torch.optim.Optimizer:
    """SGD (momentum ``cfg.momentum``) or AdamW over ``params``, at ``cfg.lr`` with ``cfg.weight_decay``."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def trainable_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters with ``requires_grad``, in module order (the optimizer's and the checkpoint's order)."""
    return [p for p in model.parameters() if p.requires_grad]


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
def save_state(model, opt, path, cfg, epoch, step, steps_per_epoch, classnames, templates) -> None:
    """The end-of-epoch checkpoint: trainable parameters, optimizer, step, schedule, every RNG state, the config."""
    meta = {
        "leanclip_trainer": 1,
        "method": cfg.method,
        "epoch": epoch,               # completed epochs
        "position": 0,                # micro-batches consumed in epoch `epoch` (checkpoints sit on epoch boundaries)
        "step": step,
        "scheduler": {"kind": cfg.scheduler, "step": step, "steps_per_epoch": steps_per_epoch},
        "rng": utils.get_rng_state(),
        "config": cfg.to_dict(),
        "classnames": list(classnames),
        "templates": list(templates),
    }
    save_trainable(model, path, optimizer=opt, step=step, extra_meta=meta)


def resume_state(model, opt, path, cfg, steps_per_epoch) -> tuple[int, int, list]:
    """Load a :func:`save_state` checkpoint into ``model`` / ``opt`` and the RNGs -> (epoch, step, logged history)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {str(path)!r}")
    meta = load_trainable(model, path, optimizer=opt)
    meta = trainer_meta(meta)
    if "epoch" not in meta or "rng" not in meta:
        raise ValueError(f"resume: {str(path)!r} is not a trainer checkpoint (no epoch/rng state)")
    sched = meta.get("scheduler", {})
    if sched.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
        raise ValueError(f"resume: checkpoint has {sched.get('steps_per_epoch')} steps per epoch, this run "
                         f"{steps_per_epoch} (dataset or batch size changed)")
    if int(meta.get("position", 0)) != 0:
        raise ValueError("resume: mid-epoch checkpoints are not supported")
    utils.set_rng_state(meta["rng"])
    step = int(meta["step"])
    history = []
    if cfg.output:
        log_path = Path(cfg.output) / LOG_NAME
        if log_path.exists():
            history = [r for r in utils.read_jsonl(log_path) if "loss" in r and r.get("step", 0) <= step]
    return int(meta["epoch"]), step, history


def trainer_meta(meta) -> dict:
    """The ``extra_meta`` dict we saved, from ``leanclip.checkpoint.load_trainable``'s metadata (key ``"extra"``)."""
    if not meta:
        return {}
    extra = meta.get("extra") if isinstance(meta, dict) else None
    return dict(extra) if isinstance(extra, dict) else {}


def model_device(model) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
