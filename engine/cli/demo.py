"""``leanclip demo``: the whole pipeline on procedural data, no downloads, a few minutes on a 2-core CPU.

    leanclip demo [--output DIR] [--seed N] [--quick] [--threads N] [--no-progress]

1. A procedural image–caption corpus (``leanclip.synthetic``: coloured, textured shapes; mostly the "source" domain, a
   small share of the "shifted" one) contrastively pre-trains a small open_clip ViT CLIP from scratch
   (``leanclip.contrastive``, AdamW, every parameter).
2. Downstream task: K-shot classification in the *shifted* domain (light patterned backgrounds, colour jitter, noise),
   CoOp base-to-new split (sorted labels, base = first ceil(n/2)); zero-shot accuracy with the model's template.
3. ``ln``, ``bitfit``, ``clipfit``, ``llu`` and ``full`` (reference) are fine-tuned on the base classes with the lean
   trainer (``leanclip.trainer``, ``lean=True``) and evaluated on base and new classes (H = harmonic mean).
4. Per method, side by side in this process: the step time of the lean model relative to the same method on open_clip's
   plain modules (``prepare(..., lean=False)``; interleaved repetitions, medians) and the bytes autograd saves for one
   training step's forward (``leanclip.memory.saved_activation_bytes``; lean under the recompute plan its memory
   budget gets from ``leanclip.budget``, vs plain): ``leanclip.cli.demo_measure``.
5. One table on stdout; ``demo.json`` and ``demo.png`` under ``--output`` (atomic writes). Nothing else touches disk.

Ratios are lean / plain: below 1 means faster / less memory. Every number is seeded; two runs with the same seed,
thread count and machine give the same accuracies. A fine-tuning method that does not beat zero-shot H is reported as
such (a NOTE line and ``"beats_zero_shot": false``), never hidden.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import open_clip
import torch

from leanclip import kernels, utils
from leanclip import data as D
from leanclip import synthetic as S
from leanclip.bench.common import machine
from leanclip.cli.demo_measure import lean_options, measure_method
from leanclip.configs import create_random_model, register_config
from leanclip.data import CLIP_MEAN, CLIP_STD
from leanclip.methods import count_trainable, prepare
from leanclip.metrics import harmonic_mean
from leanclip.pretrain import pretrain_contrastive
from leanclip.registry import method_trainer
from leanclip.select import model_device
from leanclip.templates import get_templates
from leanclip.trainer import TrainConfig, train, zeroshot
from leanclip.utils import SEED_MAX, atomic_write, atomic_write_json, derive_seed

__all__ = ["DemoConfig", "FULL", "QUICK", "register_demo_config", "run_demo", "add_arguments", "run", "METHODS"]

METHODS = ("ln", "bitfit", "clipfit", "llu", "full")
PEFT_METHODS = ("ln", "bitfit", "clipfit", "llu")  # must beat zero-shot H; "full" is the reference
DEFAULT_OUTPUT = "leanclip-demo"


@dataclass(frozen=True)
class MethodRecipe:
    """Fine-tuning hyper-parameters of one method (leanclip.trainer.TrainConfig fields)."""

    lr: float
    epochs: int
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    batch_size: int = 32
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    options: dict = field(default_factory=dict)               # extra prepare() options of the method


@dataclass(frozen=True)
class DemoConfig:
    name: str = "full"
    # model (registered as open_clip config ``model_name``)
    model_name: str = "leanclip-demo"
    image_size: int = 32
    patch_size: int = 8
    width: int = 128
    vision_layers: int = 3
    text_width: int = 128
    text_layers: int = 2
    embed_dim: int = 128
    context_length: int = 20          # captions and prompts fit (the tokenizer truncates longer ones)
    # pre-training corpus
    corpus_size: int = 12000
    shifted_fraction: float = 0.05    # share of the corpus drawn from the shifted domain (rarely seen in training)
    pretrain_steps: int = 250
    pretrain_batch: int = 128
    pretrain_lr: float = 1e-3
    # downstream task
    n_classes: int = 20
    shots: int = 16
    pool_per_class: int = 32          # candidate training images per class; few_shot picks `shots` of them
    test_per_class: int = 50
    # methods. AdamW for all (100 steps on a tiny model trained from scratch; the CLIPFit SGD recipe is tuned for
    # pre-trained ViT-B). LLU: lambda and gamma re-tuned for this model (paper: lambda 1e3, gamma 20): its features
    # are less tightly clustered than CLIP ViT-B's, so gamma 20 closes the gate on most test images.
    methods: tuple = METHODS
    recipes: dict = field(default_factory=lambda: {
        "ln": MethodRecipe(lr=2e-2, epochs=20),
        "bitfit": MethodRecipe(lr=1e-2, epochs=20),
        "clipfit": MethodRecipe(lr=2e-2, epochs=20),
        "llu": MethodRecipe(lr=1e-2, epochs=50, batch_size=256, warmup_epochs=0,
                            options={"gamma": 5.0, "llu_lambda": 10.0, "llu_clusters": 0}),
        "full": MethodRecipe(lr=2e-4, epochs=20),
    })
    # the lean trainer's memory budget, a fraction of plain open_clip's predicted step peak (leanclip.budget): 1.0 is
    # plain's own peak, so the planner keeps every block without recompute (the fastest lean plan)
    memory_budget: float = 1.0
    # measurements
    timing_reps: int = 7              # at least this many interleaved repetitions per side ...
    timing_min_seconds: float = 1.0   # ... and enough of them to spend this long per side (cheap llu head steps)
    timing_warmup: int = 2


FULL = DemoConfig()
QUICK = dataclasses.replace(
    FULL,
    name="quick",
    model_name="leanclip-demo-quick",
    width=64,
    vision_layers=2,
    text_width=64,
    text_layers=2,
    embed_dim=64,
    corpus_size=1500,
    pretrain_steps=30,
    pretrain_batch=64,
    pretrain_lr=2e-3,
    n_classes=6,
    shots=4,
    pool_per_class=6,
    test_per_class=8,
    recipes={
        "ln": MethodRecipe(lr=2e-2, epochs=2, batch_size=8),
        "bitfit": MethodRecipe(lr=1e-2, epochs=2, batch_size=8),
        "clipfit": MethodRecipe(lr=2e-2, epochs=2, batch_size=8),
        "llu": MethodRecipe(lr=1e-2, epochs=3, batch_size=16, warmup_epochs=0,
                            options={"gamma": 5.0, "llu_lambda": 10.0, "llu_clusters": 0}),
        "full": MethodRecipe(lr=2e-4, epochs=2, batch_size=8),
    },
    timing_reps=3,
    timing_warmup=1,
)


def model_config(cfg: DemoConfig) -> dict:
    """The open_clip model config dict of the demo model."""
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {"image_size": cfg.image_size, "layers": cfg.vision_layers, "width": cfg.width,
                       "head_width": 32, "patch_size": cfg.patch_size},
        "text_cfg": {"context_length": cfg.context_length, "vocab_size": 49408, "width": cfg.text_width,
                     "heads": max(1, cfg.text_width // 32), "layers": cfg.text_layers},
    }


def register_demo_config(cfg: DemoConfig = FULL) -> str:
    """Register the demo model's open_clip config under ``cfg.model_name``; returns the name."""
    return register_config(cfg.model_name, model_config(cfg))


# ------------------------------------------------------------------------------------------------------------ helpers
def _log(msg: str, progress: bool) -> None:
    """A line on stderr that does not break a progress bar on a terminal."""
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr, flush=True)


def _seed(seed: int, *parts: int) -> int:
    """A seed derived from ``seed`` and ``parts``, within the range every seed the API takes has (utils.SEED_MAX)."""
    return derive_seed(seed, *parts) & SEED_MAX


def _create_model(name: str, seed: int):
    return create_random_model(name, seed), open_clip.get_tokenizer(name)


def _normalizer(model):
    pp = getattr(model.visual, "preprocess_cfg", None) or {}
    mean = torch.tensor(pp.get("mean", CLIP_MEAN), dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(pp.get("std", CLIP_STD), dtype=torch.float32).view(1, 3, 1, 1)

    def normalize(x: torch.Tensor) -> torch.Tensor:  # uint8 [0, 255] or float [0, 1] -> normalized float32 (one copy)
        y = x.to(torch.float32, copy=True)
        if x.dtype == torch.uint8:
            y.div_(255.0)
        return y.sub_(mean).div_(std)

    return normalize


def _machine(device: torch.device) -> dict:
    info = machine()
    info.update(open_clip=open_clip.__version__, device_used=str(device), torch_threads=torch.get_num_threads())
    if hasattr(os, "getloadavg"):
        info["load_avg_1m_at_start"] = round(os.getloadavg()[0], 2)
    return info


def build_task(cfg: DemoConfig, seed: int, normalize: Callable) -> dict:
    """The downstream shifted-domain task: K-shot base-class training set, base / new test sets (CoOp protocol)."""

    classes = S.make_classes(cfg.n_classes, seed=seed)
    names = [c.name for c in classes]
    pool_x, pool_y = S.make_classification_set(classes, cfg.pool_per_class, size=cfg.image_size,
                                               seed=_seed(seed, 11), domain="shifted")
    test_x, test_y = S.make_classification_set(classes, cfg.test_per_class, size=cfg.image_size,
                                               seed=_seed(seed, 12), domain="shifted")
    # Sample records whose "path" is the row index: the data layer's few-shot sampling and base/new split apply as is.
    pool = [D.Sample(f"{i:07d}", int(y), names[int(y)]) for i, y in enumerate(pool_y)]
    test = [D.Sample(f"{i:07d}", int(y), names[int(y)]) for i, y in enumerate(test_y)]
    train = D.few_shot(pool, cfg.shots, seed)
    splits = {"train": train, "test": test}
    base, base_names = D.subsample_classes(splits, "base")
    new, new_names = D.subsample_classes(splits, "new")

    def dataset(samples, images):
        idx = torch.tensor([int(s.path) for s in samples], dtype=torch.long)
        return D.TensorImageDataset(normalize(images[idx]), [s.label for s in samples])

    return {
        "classnames": names,
        "base_names": base_names,
        "new_names": new_names,
        "train": dataset(base["train"], pool_x),
        "base_test": dataset(base["test"], test_x),
        "new_test": dataset(new["test"], test_x),
    }


def pretrain(model, tokenizer, cfg: DemoConfig, seed: int, normalize: Callable, progress: bool) -> list[float]:
    """Synthesise the caption corpus (mostly source domain) and contrastively pre-train ``model`` on it."""

    n_shift = int(round(cfg.corpus_size * cfg.shifted_fraction))
    x, caps = S.make_caption_corpus(cfg.corpus_size - n_shift, size=cfg.image_size, seed=_seed(seed, 1))
    if n_shift:
        x2, caps2 = S.make_caption_corpus(n_shift, size=cfg.image_size, seed=_seed(seed, 2), domain="shifted")
        x, caps = torch.cat([x, x2]), list(caps) + list(caps2)
    x = normalize(x)
    device = model_device(model)
    return pretrain_contrastive(model.to(device), x, caps, tokenizer, steps=cfg.pretrain_steps,
                                batch_size=cfg.pretrain_batch, lr=cfg.pretrain_lr, seed=_seed(seed, 3),
                                progress=progress, desc="pre-training")


# ---------------------------------------------------------------------------------------------------------- outputs
COLUMNS = ("method", "trainable params", "base acc", "new acc", "H", "step time (lean/plain)",
           "saved act (lean/plain)")


def _fmt_ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def format_table(results: dict) -> str:
    rows = []
    for name, r in results.items():
        rows.append((
            name,
            "-" if r.get("trainable_params") is None else f"{r['trainable_params']:,}",
            f"{100 * r['base_acc']:.1f}%",
            f"{100 * r['new_acc']:.1f}%",
            f"{100 * r['H']:.1f}%",
            _fmt_ratio(r.get("step_time_ratio")),
            _fmt_ratio(r.get("saved_act_ratio")),
        ))
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(COLUMNS)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in  # noqa: E731
                                   enumerate(zip(cells, widths)))
    out = [line(COLUMNS), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def write_plot(path: Path, results: dict, title: str) -> Path:
    """Grouped bars of base / new / H accuracy per method (incl. zero-shot), atomically written as PNG."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt


    names = list(results)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4.2), dpi=110)
    w = 0.26
    for k, (key, label, colour) in enumerate((("base_acc", "base", "#4C72B0"), ("new_acc", "new", "#DD8452"),
                                              ("H", "H", "#55A868"))):
        xs = [i + (k - 1) * w for i in range(len(names))]
        vals = [100 * results[n][key] for n in names]
        bars = ax.bar(xs, vals, w, label=label, color=colour)
        if key == "H":
            for b, v in zip(bars, vals):
                ax.text(b.get_x() + b.get_width() / 2, v + 1, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    if "zero-shot" in results:
        ax.axhline(100 * results["zero-shot"]["H"], color="#55A868", ls="--", lw=1, label="zero-shot H")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8, ncol=4)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return path


def compare_to_zero_shot(results: dict, methods) -> list[str]:
    """Set ``results[m]["beats_zero_shot"]`` (H strictly above zero-shot H) for every method and return one NOTE
    line per PEFT method that does not beat zero-shot."""
    zs_h = results["zero-shot"]["H"]
    notes = []
    for method in methods:
        beats = bool(results[method]["H"] > zs_h)
        results[method]["beats_zero_shot"] = beats
        if method in PEFT_METHODS and not beats:
            notes.append(f"NOTE: {method} does NOT beat zero-shot H on the shifted task "
                         f"({100 * results[method]['H']:.1f}% <= {100 * zs_h:.1f}%)")
    return notes


def zero_shot_row(model, task: dict, templates, tok) -> dict:
    """Zero-shot base / new accuracy and H of the pre-trained model."""
    b = zeroshot(model, task["base_test"], task["base_names"], templates, tok)["top1"] / 100
    n = zeroshot(model, task["new_test"], task["new_names"], templates, tok)["top1"] / 100
    return {"trainable_params": 0, "base_acc": b, "new_acc": n, "H": harmonic_mean(b, n), "step_time_ratio": None,
            "saved_act_ratio": None}


def finetune(model, method: str, task: dict, templates, tok, cfg: DemoConfig, seed: int, model_name: str,
             device: str, progress: bool) -> dict:
    """Fine-tune a copy of ``model`` with ``method``'s recipe on the task's base classes with the lean trainer;
    its trainable count, base / new accuracy and H."""
    tm = time.perf_counter()
    r = cfg.recipes[method]
    m = copy.deepcopy(model)
    kw = {**r.options, **lean_options(cfg, method, r.batch_size, len(task["base_names"]) * len(templates))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the plan is reported with the results
        prepare(m, method, lean=True, classnames=task["base_names"], tokenizer=tok, model_name=model_name, **kw)
    tcfg = TrainConfig(method=method, epochs=r.epochs, batch_size=r.batch_size, lr=r.lr, optimizer=r.optimizer,
                       weight_decay=r.weight_decay, warmup_epochs=r.warmup_epochs, warmup_lr=r.warmup_lr,
                       seed=_seed(seed, 31), output=None, progress=progress, device=device)
    summary = train(m, task["train"], task["base_names"], templates, tok, tcfg,
                    eval_sets={"base": task["base_test"], "new": (task["new_test"], task["new_names"])})
    b = summary["metrics"]["base"]["top1"] / 100
    n = summary["metrics"]["new"]["top1"] / 100
    out = {"trainable_params": count_trainable(m), "base_acc": b, "new_acc": n, "H": harmonic_mean(b, n),
           "train_steps": summary["steps"], "final_train_loss": summary["final_train_loss"],
           "train_seconds": round(time.perf_counter() - tm, 2), "recipe": dataclasses.asdict(r)}
    _log(f"      {method:8s} base {100 * b:5.1f}%  new {100 * n:5.1f}%  H {100 * out['H']:5.1f}%"
         f"  ({summary['steps']} steps, {time.perf_counter() - tm:.1f}s)", progress)
    return out


# --------------------------------------------------------------------------------------------------------- the demo
def run_demo(cfg: DemoConfig = FULL, output: str | os.PathLike | None = DEFAULT_OUTPUT, seed: int = 0, *,
             progress: bool = True, device: str = "auto", measure: bool = True) -> dict:
    """Run the demo; returns the ``demo.json`` payload (also written, with ``demo.png``, under ``output`` unless it
    is None). Prints the table on stdout, progress on stderr. ``measure=False`` skips the lean-vs-plain step-time and
    saved-activation measurements (their ratios are then None)."""
    t_start = time.perf_counter()
    unknown = [m for m in cfg.methods if m not in cfg.recipes]
    if unknown:
        raise ValueError(f"methods without a recipe: {unknown}")
    dev = utils.resolve_device(device)
    # CPU: the torch reference kernels (the Triton interpreter is for tests); CUDA: automatic choice.
    backend = kernels.set_backend("torch" if dev.type == "cpu" else None)
    logger = logging.getLogger(utils.LOGGER_NAME)  # the trainer's per-epoch lines: the demo prints its own summary
    log_level = logger.level
    logger.setLevel(logging.WARNING)
    timings: dict[str, float] = {}
    try:
        name = register_demo_config(cfg)
        model, tok = _create_model(name, seed)
        model.to(dev)
        normalize = _normalizer(model)
        machine = _machine(dev)

        # 1. pre-training
        t0 = time.perf_counter()
        _log(f"[1/4] pre-training {name} ({sum(p.numel() for p in model.parameters()):,} params) on "
             f"{cfg.corpus_size:,} synthetic image-caption pairs, {cfg.pretrain_steps} steps", progress)
        losses = pretrain(model, tok, cfg, seed, normalize, progress)
        model.eval()
        timings["pretrain"] = time.perf_counter() - t0

        # 2. task + zero-shot
        t0 = time.perf_counter()
        task = build_task(cfg, seed, normalize)
        templates = get_templates("Synthetic")
        _log(f"[2/4] shifted-domain task: {cfg.n_classes} classes ({len(task['base_names'])} base / "
             f"{len(task['new_names'])} new), {cfg.shots}-shot base training set ({len(task['train'])} images), "
             f"templates {templates}", progress)
        results = {"zero-shot": zero_shot_row(model, task, templates, tok)}
        timings["task_and_zero_shot"] = time.perf_counter() - t0

        # 3. fine-tuning
        t0 = time.perf_counter()
        _log(f"[3/4] fine-tuning {', '.join(cfg.methods)} (lean trainer, memory budget {cfg.memory_budget:g} of "
             f"plain's step peak)", progress)
        for method in cfg.methods:
            results[method] = finetune(model, method, task, templates, tok, cfg, seed, name, str(dev), progress)
        timings["fine_tuning"] = time.perf_counter() - t0

        # 4. lean vs plain
        if measure:
            t0 = time.perf_counter()
            _log(f"[4/4] lean vs plain PyTorch: step time (>= {cfg.timing_reps} interleaved reps, medians) and saved "
                 f"activations", progress)
            for method in utils.track(cfg.methods, "lean vs plain", enabled=progress):
                results[method].update(measure_method(model, method, task, templates, tok, cfg, _seed(seed, 21)))
            timings["lean_vs_plain"] = time.perf_counter() - t0
        else:
            for method in cfg.methods:
                results[method].update(step_time_ratio=None, saved_act_ratio=None)
    finally:
        backend.__exit__(None, None, None)
        logger.setLevel(log_level)

    timings["total"] = time.perf_counter() - t_start
    payload = _payload(results, cfg, seed, losses, task, templates, machine, timings)
    _print_report(results, payload, cfg, measure)
    if output is not None:
        out = Path(output)
        atomic_write_json(out / "demo.json", payload)
        write_plot(out / "demo.png", {k: results[k] for k in ["zero-shot", *cfg.methods]},
                   f"leanclip demo ({cfg.name}, seed {seed}): {cfg.shots}-shot base-to-new, shifted domain")
        print(f"wrote {out / 'demo.json'} and {out / 'demo.png'}")
    return payload


def _payload(results, cfg: DemoConfig, seed: int, losses, task, templates, machine, timings) -> dict:
    """The ``demo.json`` payload (notes on methods that do not beat zero-shot included)."""
    notes = compare_to_zero_shot(results, cfg.methods)
    return {
        **{k: _public(v) for k, v in results.items()},
        "summary": {
            "zero_shot_H": results["zero-shot"]["H"],
            "peft_methods_beating_zero_shot": [m for m in cfg.methods if m in PEFT_METHODS
                                               and results[m]["beats_zero_shot"]],
            "notes": notes,
            "ratios": f"lean (memory budget {cfg.memory_budget:g} of plain's step peak) / plain (open_clip modules, prepare(lean=False)); "
                      f"< 1 = faster / fewer saved bytes",
        },
        "pretrain": {"steps": len(losses), "first_loss": losses[0], "final_loss": losses[-1],
                     "loss_every_10": losses[::10]},
        "task": {"classes": task["classnames"], "base": task["base_names"], "new": task["new_names"],
                 "shots": cfg.shots, "train_images": len(task["train"]), "base_test_images": len(task["base_test"]),
                 "new_test_images": len(task["new_test"]), "domain": "shifted", "templates": templates},
        "config": _jsonable(dataclasses.asdict(cfg)) | {"seed": seed, "model_config": model_config(cfg)},
        "machine": machine,
        "seconds": {k: round(v, 2) for k, v in timings.items()},
    }


def _print_report(results, payload, cfg: DemoConfig, measure: bool) -> None:
    """The table and the notes on stdout."""
    zs_h, notes = payload["summary"]["zero_shot_H"], payload["summary"]["notes"]
    print(format_table({k: results[k] for k in ["zero-shot", *cfg.methods]}))
    for line in notes:
        print(line)
    if cfg.name == "quick":
        print("(--quick: smoke-test sizes; its accuracies say nothing about the methods)")
    if not notes:
        print(f"All PEFT methods ({', '.join(m for m in cfg.methods if m in PEFT_METHODS)}) beat zero-shot H "
              f"({100 * zs_h:.1f}%) on the shifted-domain task.")
    print(f"ratios = lean (memory budget {cfg.memory_budget:g} of plain's step peak) / plain PyTorch (same method, "
          f"open_clip modules, prepare(lean=False)); < 1 = faster / fewer saved bytes")
    plans = [f"{m}: {results[m]['recompute_plan']}" for m in cfg.methods if results[m].get("recompute_plan")]
    if plans:
        print("recompute plans: " + "; ".join(plans))
    no_rc = [f"{m} {results[m]['step_time_ratio_no_recompute']:.2f}x" for m in cfg.methods
             if results[m].get("step_time_ratio_no_recompute") is not None]
    if no_rc:
        print(f"step time of the lean model without recompute: {', '.join(no_rc)}")
    if any(method_trainer(m) == "cached" for m in cfg.methods) and measure:
        print("cached-feature methods (llu) train their heads on cached features: lean and plain run the same step "
              "(ratios ~1 by design)")
    machine = payload["machine"]
    print(f"{machine.get('device_used')}, {torch.get_num_threads()} thread(s); "
          f"total {payload['seconds']['total']:.0f}s")


_PUBLIC_KEYS = ("trainable_params", "base_acc", "new_acc", "H", "step_time_ratio", "saved_act_ratio",
                "beats_zero_shot", "step_time_ratio_no_recompute", "step_seconds", "saved_act_bytes", "timing_batch",
                "timing_reps", "train_steps", "final_train_loss", "train_seconds", "recipe")


def _public(r: dict) -> dict:
    return {k: r[k] for k in _PUBLIC_KEYS if k in r}


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


# -------------------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Pre-train a small CLIP on synthetic image-caption data, then compare zero-shot with "
                          "ln / bitfit / clipfit / llu / full fine-tuning on a shifted-domain few-shot task "
                          "(base-to-new), with step-time and saved-activation ratios of the lean engine vs plain "
                          "PyTorch. No downloads; a few minutes on a 2-core CPU.")
    parser.add_argument("--output", metavar="DIR", default=DEFAULT_OUTPUT,
                        help=f"where demo.json and demo.png go (default ./{DEFAULT_OUTPUT})")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of every random choice (default 0)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (~30 s; for tests and smoke runs)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="torch CPU threads (default 1: the demo model is tiny, extra threads mostly spin on a "
                             "shared box; results are reproducible for a given thread count). 0 = torch's default")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = cuda when a GPU is visible")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    run_demo(QUICK if args.quick else FULL, args.output, args.seed, progress=not args.no_progress,
             device=args.device)
    return 0
