"""The trainer: few-shot classification fine-tuning of a prepared open_clip model (CoOp / CLIPFit protocol).

    import leanclip, open_clip
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    leanclip.prepare(model, "clipfit", classnames=classnames, tokenizer=tok)
    cfg = leanclip.TrainConfig(method="clipfit", epochs=10, batch_size=32, lr=2e-3, output="runs/clipfit")
    summary = leanclip.train(model, train_set, classnames, templates, tok, cfg, eval_sets={"test": test_set})
    leanclip.train(model, ..., cfg, resume="runs/clipfit/checkpoint.safetensors")   # continues bit-for-bit

One optimizer step (``grad_accum`` micro-batches)::

    txt = text_features(model, classnames, templates, tok)   # all classes, ONCE per step when the text side trains
                                                             # (once per run when it is frozen: decided from the graph)
    for each micro-batch:  CE(class_logits(model, image_features(model, images), txt), y) -> backward
    [+ a method's loss terms: CLIPFit's clipfit_kd_loss(txt, teacher, kd_lambda), teacher = frozen zero-shot
       features, once per run; its weights are the method's options (``leanclip methods clipfit``), not the config's]
    [a method's gradient rule (ProGrad's projection) then rewrites the step's gradients: ``leanclip.step``]
    the text tower back-propagates once per step (micro-batches fill the gradient of a detached copy of txt), so
    grad_accum=k x batch b gives the same update as batch k*b.

Learning rate: constant ``warmup_lr`` for ``warmup_epochs`` (CoOp's ConstantWarmupScheduler), then cosine from ``lr``
to 0 over the remaining optimizer steps (per step). Warm-up is skipped when it would take the whole run.

Determinism / resume: the batches of epoch ``e``, random augmentations included, are a function of ``(seed, e)``
only (``leanclip.data.make_loader``: not of the worker count, of the progress display, or of the global RNG); the
checkpoint written at the end of every epoch holds the trainable parameters, the optimizer state, the step,
the scheduler state, every RNG state and the loader position, so ``resume=`` continues exactly as an uninterrupted run
(same per-step losses). A non-finite loss, gradient or weight stops the run before the optimizer step that would
spread it (``leanclip.utils.NonFiniteLossError``, one line): the last checkpoint written, all finite, is kept. The LLU
method does not back-propagate through the encoders: ``train`` hands it to
:func:`leanclip.llu.run_llu` (cached features).

Multi-process (``torchrun``, full-data runs as well as few-shot): ``cfg.batch_size`` is the GLOBAL batch. Every
process iterates the same seeded epoch loader and keeps its contiguous share of each batch (rank ``r`` of ``W``: rows
``[r*ceil(b/W), (r+1)*ceil(b/W))``, possibly empty for a short last batch) with the micro weight
``len(share)/step_batch``; after the step's backward the trainable gradients are summed over the processes (one
flattened all-reduce), the method's extra loss terms (computed identically everywhere) back-propagate scaled by
``1/W``, and the step's statistics are summed before its one host sync, so every process applies the update of one
process with the whole batch (same losses, same weights, up to float summation order) and a non-finite stop is
collective. Known cost: each process loads and augments the WHOLE global batch and keeps its share (the loader stays a
function of ``(seed, epoch)`` only); the text tower also runs on every process. Rank 0 alone writes the log, the
checkpoints and the summary (the others wait at a barrier after each checkpoint); ``resume=`` is read by every
process. The LLU trainer (cached features) is single-process.

Outputs under ``cfg.output`` (when set): ``log.jsonl`` (one line per logged step, flushed), ``checkpoint.safetensors``
(trainable-only, atomically replaced each epoch), ``summary.json``; temp files of a write killed in an earlier
run there are removed at the start.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from leanclip import distributed as D
from leanclip import features as feats
from leanclip import utils
from leanclip.calibration import FirstStepCheck
from leanclip.data import check_classes
from leanclip.feature_cache import cached_batches
from leanclip.llu import run_llu
from leanclip.metrics import AccuracyMeter, harmonic_mean
from leanclip.registry import method_hooks, method_trainer
from leanclip.run_files import CHECKPOINT_NAME, LOG_NAME
from leanclip.select import model_device, trainable_parameters
from leanclip.step import ClassifyStep
from leanclip.training import (
    build_optimizer, check_config, check_labels, check_resume, dataset_labels,
    epoch_loader, eval_loader, lr_at, resume_state, run_summary, save_state, steps_per_epoch,
)

__all__ = ["TrainConfig", "train", "evaluate", "zeroshot", "base_to_new", "lr_at", "saved_run_options"]

OPTIMIZERS = ("sgd", "adamw")


@dataclass
class TrainConfig:
    method: str | None = None         # None: the method the model was prepared with
    epochs: int = 10
    batch_size: int = 32
    lr: float = 2e-3
    optimizer: str = "sgd"            # "sgd" | "adamw"
    momentum: float = 0.9             # SGD momentum (AdamW: beta1 stays 0.9)
    weight_decay: float = 5e-4
    warmup_epochs: int = 1            # constant warm-up at warmup_lr (CoOp), skipped if >= epochs
    warmup_lr: float = 1e-5
    scheduler: str = "cosine"         # "cosine" | "constant"
    grad_accum: int = 1               # micro-batches per optimizer step
    clip_grad_norm: float | None = None
    precision: str = "auto"           # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "fp32" | "bf16"
    device: str = "auto"              # "auto" | "cpu" | "cuda"
    seed: int = 1
    output: str | None = None         # run directory (log, checkpoint, summary); None = write nothing
    log_every: int = 1                # optimizer steps between JSONL log lines
    num_workers: int = 0
    eval_batch_size: int = 256
    eval_every: int = 0               # epochs between evaluations of eval_sets (0: only after the last epoch)
    progress: bool = True             # a bar on a terminal, plain log lines elsewhere (never changes the run)
    stop_after_epoch: int | None = None  # end this invocation after that epoch (checkpoint written): pre-emption/tests
    cache_dir: str | None = None      # cached-feature trainers (LLU): default <output>/features, none without output
    extra: dict = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        """ValueError naming the first field out of range: the numbers the command line also takes are checked
        against its table (``leanclip.utils.NUMBER_RANGES``), so the API accepts exactly what the CLI accepts."""
        check_config(self, ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "warmup_lr", "grad_accum",
                            "log_every", "seed", "num_workers", "eval_batch_size",
                            "eval_every", "momentum"),
                     optional=("clip_grad_norm", "stop_after_epoch"),
                     kinds={"eval_batch_size": "batch_size", "eval_every": "warmup_epochs",  # an int >= 0
                            "stop_after_epoch": "epochs", "momentum": "weight_decay"})  # a finite float >= 0
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.scheduler not in ("cosine", "constant"):
            raise ValueError(f"scheduler must be 'cosine' or 'constant', got {self.scheduler!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# config fields that are now a method's options -> that method. A run saved while TrainConfig carried them records
# them in its config (every run, whatever its method), never in its method options.
CONFIG_FIELDS_NOW_OPTIONS = {"kd_lambda": "clipfit", "llu_lambda": "llu", "llu_clusters": "llu"}


def saved_run_options(method: str, options: Mapping | None, config: Mapping | None) -> dict:
    """The method options a saved run trained with: those its checkpoint records, plus each field of its saved
    ``config`` (``TrainConfig.to_dict``) that is now an option of one of ``method``'s ``+`` components and that the
    options do not hold. What reads a run (eval, analyze, report) passes these to ``prepare``, so a run saved with
    ``kd_lambda`` in its config rebuilds its loss terms with that weight."""
    out = dict(options or {})
    parts = set(str(method).split("+"))
    for key, owner in CONFIG_FIELDS_NOW_OPTIONS.items():
        if owner in parts and key not in out and key in (config or {}):
            out[key] = config[key]
    return out


# ------------------------------------------------------------------------------------------------ schedule, optimizer
# ------------------------------------------------------------------------------------------------------------- train
def train(
    model: torch.nn.Module,
    train_set,
    classnames: Sequence[str],
    templates: Sequence[str],
    tokenizer,
    cfg: TrainConfig,
    eval_sets: Mapping[str, Any] | None = None,
    resume: str | os.PathLike | None = None,
) -> dict:
    """Fine-tune the trainable parameters of ``model`` (already ``leanclip.prepare``-d) on ``train_set`` (items
    ``(image_tensor, label)``, labels index ``classnames``). ``eval_sets``: ``{name: dataset}`` evaluated with the
    same classnames (or ``{name: (dataset, classnames)}`` for another class set, e.g. base-to-new's new classes).
    Returns a summary dict (per-step losses, final metrics, paths, timing). Every check (the config, the classes
    and labels, a resume's checkpoint) comes before the run's first write under ``cfg.output``."""
    cfg.validate()
    info = getattr(model, "leanclip_info", None)
    if not info:
        raise ValueError("model was not prepared: call leanclip.prepare(model, method) before train()")
    if cfg.method is None:
        cfg = dataclasses.replace(cfg, method=info["method"])
    elif cfg.method != info["method"]:
        raise ValueError(f"cfg.method={cfg.method!r} but the model was prepared with {info['method']!r}")
    _check_train_inputs(train_set, classnames, eval_sets)
    if method_trainer(cfg.method) == "cached":
        if D.get_world_size() > 1:
            raise ValueError(f"method {cfg.method!r} trains on cached features in one process: run it without "
                             f"torchrun (world size {D.get_world_size()})")
        if resume is not None:  # before the feature cache and the log are written
            check_resume(resume, cfg, steps_per_epoch(len(train_set), cfg))
        return run_llu(model, train_set, classnames, templates, tokenizer, cfg, eval_sets=eval_sets, resume=resume)
    if len(train_set) == 0:
        raise ValueError("train_set is empty")
    run = _start_run(model, train_set, list(classnames), list(templates), tokenizer, cfg, resume)
    for epoch in range(run.start_epoch, cfg.epochs):
        _train_epoch(run, epoch)
        last = epoch + 1 == cfg.epochs
        if eval_sets and not last and cfg.eval_every and (epoch + 1) % cfg.eval_every == 0:
            metrics = _evaluate_sets(model, eval_sets, run.classnames, run.templates, tokenizer, cfg, run.device,
                                     run.precision)
            utils.get_logger().info("epoch %d eval: %s", epoch + 1, metrics)
            if run.out_dir is not None:
                utils.append_jsonl(run.out_dir / LOG_NAME, {"step": run.step, "epoch": epoch + 1, "eval": metrics})
        if cfg.output:  # after any evaluation, so the saved RNG state is the one epoch+1 starts from
            # every process checks (the weights are the same everywhere: a stop is collective); rank 0 writes
            utils.check_finite_params(run.params, step=run.step, epoch=epoch + 1, checkpoint=run.checkpoint,
                                      lr=lr_at(max(run.step - 1, 0), cfg, run.steps_per_epoch))
            if run.out_dir is not None:
                save_state(model, run.opt, run.checkpoint, cfg, epoch + 1, run.step, run.steps_per_epoch,
                           run.classnames, run.templates)
            D.barrier()
        if cfg.stop_after_epoch is not None and epoch + 1 >= cfg.stop_after_epoch and not last:
            return run_summary(cfg, run.history, {}, run.out_dir, time.perf_counter() - run.t_start, run.images_seen,
                               run.device, run.precision, stopped_at=epoch + 1)
    metrics = {}
    if eval_sets and run.rank == 0:  # the final evaluation: rank 0 alone (the others' summaries have no metrics)
        metrics = _evaluate_sets(model, eval_sets, run.classnames, run.templates, tokenizer, cfg, run.device,
                                 run.precision)
        utils.get_logger().info("final eval: %s", metrics)
    return run_summary(cfg, run.history, metrics, run.out_dir, time.perf_counter() - run.t_start, run.images_seen,
                       run.device, run.precision)


def _check_train_inputs(train_set, classnames, eval_sets) -> None:
    """At least 2 classes, and every label a dataset states (``training.dataset_labels``) a class index; the labels
    of datasets that do not state them are checked batch by batch."""
    check_classes(classnames, "classnames")
    labels = dataset_labels(train_set)
    if labels is not None:
        check_labels(labels, len(classnames), "train_set")
    for name, ds in (eval_sets or {}).items():
        ds, cn = ds if isinstance(ds, tuple) else (ds, classnames)
        check_classes(cn, f"eval_sets[{name!r}]")
        labels = dataset_labels(ds)
        if labels is not None:
            check_labels(labels, len(cn), f"eval_sets[{name!r}]")


@dataclass
class _Run:
    """What one training run carries from epoch to epoch."""
    model: torch.nn.Module
    train_set: Any
    classnames: list
    templates: list
    cfg: TrainConfig
    device: torch.device
    precision: str
    params: list
    opt: torch.optim.Optimizer
    step_fn: ClassifyStep
    micro_per_epoch: int
    steps_per_epoch: int
    out_dir: Path | None              # where this process writes: None on ranks other than 0
    rank: int = 0
    world: int = 1
    start_epoch: int = 0
    step: int = 0
    history: list = field(default_factory=list)
    images_seen: int = 0
    t_start: float = field(default_factory=time.perf_counter)
    peak_check: FirstStepCheck | None = None   # the first step's measured peak against the recompute plan (CUDA)

    @property
    def checkpoint(self) -> Path | None:
        return Path(self.cfg.output) / CHECKPOINT_NAME if self.cfg.output else None


def _start_run(model, train_set, classnames, templates, tokenizer, cfg: TrainConfig, resume) -> _Run:
    """Seed, optimizer, the step, and the state of an interrupted run when resuming."""
    device = utils.resolve_device(cfg.device)
    precision = utils.resolve_precision(cfg.precision, device)
    rank, world = D.get_rank(), D.get_world_size()
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no trainable parameters: call leanclip.prepare(model, method) first")
    if resume is not None:  # before the first write: a refused resume leaves the run folder as it was
        check_resume(resume, cfg, steps_per_epoch(len(train_set), cfg))
    out_dir = Path(cfg.output) if cfg.output and rank == 0 else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        utils.remove_stale_temps(out_dir)
    utils.seed_everything(cfg.seed)
    model.to(device)
    params = [p for _, p in trainable_parameters(model)]
    opt = build_optimizer(params, cfg)
    micro_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    model.train()
    # the step's extra loss terms start from the weights the run starts from, so BEFORE a resume loads any
    step_fn = ClassifyStep(model, classnames, templates, tokenizer, cfg=cfg, device=device, precision=precision)
    run = _Run(model, train_set, classnames, templates, cfg, device, precision, params, opt, step_fn,
               micro_per_epoch, steps_per_epoch(len(train_set), cfg), out_dir, rank, world)
    if resume is not None:  # model: prepared the same way from the same weights as the interrupted run
        # every process loads the checkpoint; rank 0 alone cuts the log back to it (the others keep no history)
        run.start_epoch, run.step, run.history = resume_state(
            model, opt, resume, cfg if rank == 0 else dataclasses.replace(cfg, output=None), run.steps_per_epoch)
        D.barrier()
    elif out_dir is not None and (out_dir / LOG_NAME).exists():
        (out_dir / LOG_NAME).unlink()
    run.peak_check = FirstStepCheck(model, device)
    run.t_start = time.perf_counter()
    return run


def _train_epoch(run: _Run, epoch: int) -> None:
    """One epoch of optimizer steps of ``grad_accum`` micro-batches each."""
    cfg, device = run.cfg, run.device
    run.model.train()
    loader = epoch_loader(run.train_set, cfg.batch_size, cfg.seed, epoch, cfg.num_workers, device.type == "cuda")
    bar = utils.Progress(run.steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    n_data, bs, accum = len(run.train_set), cfg.batch_size, cfg.grad_accum
    for i, (images, labels) in enumerate(loader):
        if i % accum == 0:  # a new optimizer step: its micro-batches, its class text features
            last_mb = min(i + accum, run.micro_per_epoch)
            group_n = sum(min(bs, n_data - j * bs) for j in range(i, last_mb))
            sums = torch.zeros(3, dtype=torch.float64, device=device)  # CE * n, correct, n
            t_step = time.perf_counter()
            run.peak_check.begin()
            run.step_fn.begin()
        if run.world > 1:  # this process's contiguous share of the global batch (possibly empty: no micro)
            share = -(-len(labels) // run.world)
            lo, hi = min(run.rank * share, len(labels)), min((run.rank + 1) * share, len(labels))
            images, labels = images[lo:hi], labels[lo:hi]
        if len(labels):
            check_labels(labels, len(run.classnames), "train_set")  # a dataset that does not state its labels
            sums += run.step_fn.micro(images, labels, weight=len(labels) / group_n)
        if i + 1 == last_mb:
            rec = _finish_step(run, epoch, sums, t_step)
            if run.out_dir is not None and (run.step % cfg.log_every == 0 or i == run.micro_per_epoch - 1):
                utils.append_jsonl(run.out_dir / LOG_NAME, rec)
            bar.update(1, loss=f"{rec['loss']:.4f}", acc=f"{rec['acc']:.3f}", lr=f"{rec['lr']:.2e}")
    bar.close()
    recs = [r for r in run.history if r["epoch"] == epoch + 1]
    if recs:
        utils.get_logger().info("epoch %d/%d: loss %.4f acc %.3f lr %.2e", epoch + 1, cfg.epochs,
                                sum(r["loss"] for r in recs) / len(recs), sum(r["acc"] for r in recs) / len(recs),
                                recs[-1]["lr"])


def _finish_step(run: _Run, epoch: int, sums: torch.Tensor, t_step: float) -> dict:
    """End an optimizer step: extra loss terms and the text tower's backward, the finiteness check (the step's only
    host sync, BEFORE the update: a non-finite step never reaches the weights), the update; returns its log record."""
    terms = run.step_fn.finish(term_weight=1.0 / run.world, apply_rule=run.world == 1)
    if run.world > 1:  # a gradient rule acts on the whole batch's gradients: after they are summed
        _all_reduce_grads(run.params, sums)
        run.step_fn.apply_rule(reduce=_all_reduce_sum)
    lr = lr_at(run.step, run.cfg, run.steps_per_epoch)
    for g in run.opt.param_groups:
        g["lr"] = lr
    if run.cfg.clip_grad_norm is not None:  # the norm before clipping: non-finite iff a gradient is
        gnorm = torch.nn.utils.clip_grad_norm_(run.params, run.cfg.clip_grad_norm)
    else:
        gnorm = utils.grad_norm(run.params)
    extra_t = torch.stack([v.double() for v in terms.values()]).reshape(-1) if terms else sums.new_zeros(0)
    gn_t = gnorm.detach().double().reshape(1).to(run.device)
    ce_sum, correct, n, *extra, gn = torch.cat([sums, extra_t, gn_t]).tolist()
    loss = ce_sum / n + sum(extra)
    utils.check_finite_step(loss, gn, step=run.step + 1, epoch=epoch + 1, lr=lr, checkpoint=run.checkpoint)
    run.peak_check.end()  # the forward and backward are done: the step's activations have peaked
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    run.step += 1
    dt = time.perf_counter() - t_step
    rec = {"step": run.step, "epoch": epoch + 1, "loss": loss, "acc": correct / n, "lr": lr,
           "img_per_s": n / dt if dt > 0 else None, "ce": ce_sum / n, **dict(zip(terms, extra))}
    mem = utils.peak_memory_bytes(run.device)
    if mem is not None:
        rec["peak_mem_bytes"] = mem
    run.history.append(rec)
    run.images_seen += int(n)
    return rec


def _all_reduce_sum(tensors: list) -> None:
    """Sum ``tensors`` (same shapes and dtype on every process) over the processes, in place, as one buffer."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    off = 0
    for t in tensors:
        t.copy_(flat[off:off + t.numel()].view_as(t))
        off += t.numel()


def _all_reduce_grads(params: list, sums: torch.Tensor) -> None:
    """Sum the gradients of ``params`` and the step's statistics ``sums`` (in place) over the processes: the
    gradients as one flattened buffer; the statistics and which parameters have a gradient in float64. A parameter
    no process has a gradient for keeps ``grad=None`` (as in one process, so the optimizer skips it: no weight decay
    on it either)."""
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    has = torch.tensor([float(p.grad is not None) for p in params], dtype=torch.float64, device=sums.device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
                      for p in params])
    torch.distributed.all_reduce(flat)
    both = torch.cat([sums, has])  # float64: exact counts, CE sums in double
    torch.distributed.all_reduce(both)
    sums.copy_(both[:sums.numel()])
    present = both[sums.numel():] > 0
    off = 0
    for p, keep in zip(params, present.tolist()):
        n = p.numel()
        if keep:
            g = flat[off:off + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        off += n


# -------------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset,
    classnames: Sequence[str],
    templates: Sequence[str],
    tokenizer,
    batch_size: int = 256,
    *,
    device: str | torch.device | None = None,
    precision: str = "auto",
    num_workers: int = 0,
    progress: bool = False,
    zero_shot: bool = False,
) -> dict:
    """Top-1 / top-5 accuracy (in %) of ``model`` on ``dataset`` against ``classnames`` (text features computed once).
    ``zero_shot=True`` uses the frozen zero-shot features (E1's ``frozen_text_features`` / raw encoder image features)
    instead of the method-aware ones."""
    utils.check_number("batch_size", batch_size)
    check_classes(classnames, "classnames")
    labels = dataset_labels(dataset)
    if labels is not None:
        check_labels(labels, len(classnames), "dataset")
    device = utils.resolve_device(device if device is not None else model_device(model))
    precision = utils.resolve_precision(precision, device)
    probe = method_hooks(model).get("logits")
    if probe is not None and not zero_shot and getattr(probe, "num_classes", len(classnames)) != len(classnames):
        raise ValueError(f"the linear probe classifies {probe.num_classes} classes, got {len(classnames)} class names "
                         f"(a probe cannot score classes it was not trained on)")
    was_training = model.training
    model.eval()
    try:
        with utils.autocast(device, precision):
            if zero_shot:
                txt = feats.frozen_text_features(model, list(classnames), list(templates), tokenizer)
            else:
                txt = feats.text_features(model, list(classnames), list(templates), tokenizer)
        meter = AccuracyMeter(topk=(1, 5))
        # a frozen image tower's features of this dataset, once per weights (leanclip.feature_cache; None: no cache)
        cached = cached_batches(model, dataset, batch_size, device=device, precision=precision,
                                num_workers=num_workers, progress=progress, encoder_only=zero_shot)
        batches = cached if cached is not None else utils.track(eval_loader(dataset, batch_size, num_workers),
                                                                "eval", progress)
        for images, labels in batches:
            check_labels(labels, len(classnames), "dataset")  # a dataset that does not state its labels
            images = images.to(device, non_blocking=True)
            labels = torch.as_tensor(labels).to(device)
            with utils.autocast(device, precision):
                if cached is not None:  # ``images`` are the encoder's features of the batch
                    img = F.normalize(images.float(), dim=-1)
                    logits = (model.logit_scale.exp().float() * img @ txt.float().t() if zero_shot
                              else feats.class_logits(model, img, txt))
                elif zero_shot:
                    img = F.normalize(model.encode_image(images).float(), dim=-1)
                    logits = model.logit_scale.exp().float() * img @ txt.float().t()
                else:
                    img = feats.image_features(model, images)
                    logits = feats.class_logits(model, img, txt)
            meter.update(logits.float(), labels)
    finally:
        model.train(was_training)
    if meter.n == 0:
        raise ValueError("evaluate: empty dataset")
    return {**meter.compute(), "n": meter.n}


def zeroshot(model, dataset, classnames, templates, tokenizer, batch_size: int = 256, **kw) -> dict:
    """Zero-shot CLIP accuracy: frozen encoders, hand-written prompts (whatever method ``model`` was prepared for)."""
    return evaluate(model, dataset, classnames, templates, tokenizer, batch_size, zero_shot=True, **kw)


def base_to_new(model, base_set, base_classnames, new_set, new_classnames, templates, tokenizer,
                batch_size: int = 256, **kw) -> dict:
    """CoCoOp base-to-new: accuracy on the base classes, on the new classes (each set relabelled from 0) and their
    harmonic mean H = 2BN/(B+N)."""
    b = evaluate(model, base_set, base_classnames, templates, tokenizer, batch_size, **kw)["top1"]
    n = evaluate(model, new_set, new_classnames, templates, tokenizer, batch_size, **kw)["top1"]
    return {"base": b, "new": n, "H": harmonic_mean(b, n)}


def _evaluate_sets(model, eval_sets, classnames, templates, tokenizer, cfg, device, precision) -> dict:
    out = {}
    for name, ds in eval_sets.items():
        cn = classnames
        if isinstance(ds, tuple):
            ds, cn = ds
        out[name] = evaluate(model, ds, cn, templates, tokenizer, cfg.eval_batch_size, device=device,
                             precision=precision, num_workers=cfg.num_workers)
    if "base" in out and "new" in out:
        out["H"] = harmonic_mean(out["base"]["top1"], out["new"]["top1"])
    return out
