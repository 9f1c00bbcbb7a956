"""``leanclip`` command line (also ``python -m leanclip``).

    leanclip train --method clipfit --data ~/data --dataset oxford_pets --shots 16 --seed 1 --output runs/pets
    leanclip eval --checkpoint runs/pets/checkpoint.safetensors --data ~/data --dataset oxford_pets
    leanclip zeroshot --model ViT-B-16 --pretrained ~/weights/vit_b16.safetensors --data ~/data --dataset dtd
    leanclip train --method ln --epochs 2            # no --data: a synthetic dataset, the tiny model (smoke run)

Data: ``--data ROOT --dataset NAME`` (CoOp layouts, see ``leanclip.data``), ``--split-file F`` (a CoOp split JSON), or
``--synthetic`` (procedural shapes, the default without ``--data``/``--split-file``). Protocol: K-shot sampling of the
train split with ``--seed``, then ``--subsample base|new|all`` (CoCoOp base-to-new; training on ``base`` also reports
the new classes and H). Weights: ``--pretrained`` takes an open_clip pretrained tag, an ``hf-hub:`` id, a hub folder or
a local file (``leanclip.weights``; no file may run code).

Bad input (unknown method, missing file, no GPU for ``--device cuda``, ...) prints one line on stderr and exits 2,
before any work or write; a run stopped by a non-finite loss exits 3. Every command prints a JSON result on stdout (and
writes it under ``--output`` when given).

Extension hook: ``register_subcommand(name, module, help)`` (``demo`` -> ``leanclip.demo``, ``bench`` ->
``leanclip.bench.cli`` are pre-registered) adds a subcommand served by ``module.add_arguments(parser)`` + ``module.run(args) -> int``; it is
listed only when the module exists and imported only when that subcommand runs.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from leanclip import utils
from leanclip.cli_common import (DATA_DEFAULTS, DEFAULT_MODEL, UsageError, build_model, check_numbers, clear_run,
                                 data_record, emit, method_opts_from_flags, pretrain_synthetic, read_checkpoint_meta,
                                 recorded_frozen_dtype, restore_data, restore_model, restore_weights, run_folder,
                                 setup_device, weights_record)

PROG = "leanclip"
EXIT_USAGE = 2
SYNTHETIC_MAX_SHOTS = 1000  # images per class the synthetic dataset may be asked to draw (and cache)

# name -> (module, help). The module provides add_arguments(parser) and run(args) -> int.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("leanclip.demo", "end-to-end demo (provided by leanclip.demo)"),
    "bench": ("leanclip.bench.cli", "benchmarks (provided by bench.cli)"),
    "sweep": ("leanclip.sweep", "run a protocol grid (methods x datasets x shots x seeds) as resumable cells"),
    "report": ("leanclip.report", "tables (Markdown, CSV, PNG) of a sweep: mean +- std over seeds"),
}

# Training defaults when the flag is not given: the CLIPFit / CoOp recipe, replaced by what the method declares
# (leanclip.methods.MethodTraits.train_defaults).
BASE_DEFAULTS = {"optimizer": "sgd", "lr": 2e-3, "weight_decay": 5e-4, "batch_size": 32, "warmup_epochs": 1,
                 "epochs": 10}


def register_subcommand(name: str, module: str, help: str = "") -> None:
    """Add (or replace) an extension subcommand served by ``module`` (``add_arguments(parser)``, ``run(args)``)."""
    if name in ("train", "eval", "zeroshot"):
        raise ValueError(f"{name!r} is a built-in subcommand")
    SUBCOMMANDS[name] = (module, help)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (``leanclip train: error: ...``, exit 2) instead of the usage
    block; ``--help`` is unchanged. Sub-parsers inherit the class."""

    def error(self, message):
        sub = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        raise UsageError(f"{sub}{message} (see {self.prog} --help)")


# --------------------------------------------------------------------------------------------------------- arguments
def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"open_clip model config name, hf-hub:ORG/REPO or local-dir:DIR (config + weights, as "
                        f"open_clip reads them; default: {DEFAULT_MODEL}, the tiny test config)")
    g.add_argument("--pretrained", metavar="SOURCE", default=None,
                   help="weights: a pretrained tag of --model (e.g. laion2b_s34b_b79k, openai), hf-hub:ORG/REPO, a "
                        "hub folder or a local safetensors / torch file; tags and hub ids are downloaded once into "
                        "the Hugging Face cache (HF_HUB_OFFLINE=1 reads it only). Default: random initialisation")
    g.add_argument("--trust-torchscript", action="store_true",
                   help="allow OpenAI TorchScript .pt archives as --pretrained: loading one RUNS CODE stored in the "
                        "file; only for files you trust (the 'openai' tag gives the same weights as safetensors)")
    g.add_argument("--image-size", type=int, default=None,
                   help="input resolution (default: the model's own); pretrained positional embeddings are resized")
    g.add_argument("--pretrain-steps", type=int, default=0, metavar="N",
                   help="before anything else, contrastively pre-train the model for N steps on a synthetic caption "
                        "corpus (smoke runs without weights; default 0)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--data", metavar="ROOT", default=None, help="data root holding the dataset (needs --dataset)")
    src.add_argument("--split-file", metavar="F", default=None,
                     help="CoOp split JSON {train,val,test: [[relpath, label, classname], ...]}")
    src.add_argument("--synthetic", action="store_true",
                     help="generate a synthetic dataset (coloured shapes); the default when neither --data nor "
                          "--split-file is given")
    g.add_argument("--dataset", default=None,
                   help="dataset name under --data (e.g. oxford_pets, OxfordPets, dtd, imagenet); also picks the "
                        "prompt template")
    g.add_argument("--image-root", default=None, help="image folder for --split-file (default: next to the file)")
    g.add_argument("--shots", type=int, default=DATA_DEFAULTS["shots"],
                   help=f"K training images per class (0 = the whole train split; default {DATA_DEFAULTS['shots']})")
    g.add_argument("--seed", type=int, default=DATA_DEFAULTS["seed"],
                   help=f"few-shot sampling and training seed (default {DATA_DEFAULTS['seed']})")
    g.add_argument("--subsample", choices=("all", "base", "new"), default=DATA_DEFAULTS["subsample"],
                   help="base-to-new protocol: keep the first half of the classes (base), the rest (new) or all")
    g.add_argument("--eval-split", choices=("test", "val"), default="test", help="split to evaluate (default test)")
    g.add_argument("--templates", nargs="+", default=None, metavar="T",
                   help="prompt template(s) with '{}' for the class name, or 'ensemble' (default: the dataset's "
                        "CoOp template)")
    g.add_argument("--synthetic-classes", type=int, default=DATA_DEFAULTS["synthetic_classes"],
                   help=f"classes of the synthetic dataset (default {DATA_DEFAULTS['synthetic_classes']})")
    g.add_argument("--synthetic-dir", default=None,
                   help="where the synthetic dataset is written (default: a private per-user cache, "
                        "$LEANCLIP_CACHE_DIR or $XDG_CACHE_HOME/leanclip or ~/.cache/leanclip, under synthetic/)")
    g.add_argument("--allow-outside-root", action="store_true",
                   help="let a split / list file name images outside the image root (absolute paths, '..', "
                        "symlinks leading out); refused by default")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="decode every image the run uses before it starts and leave out unreadable ones (counted "
                        "and reported); without it an unreadable image is an error naming its path")
    g.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes (default 0)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto = cuda when a GPU is visible; cuda without a GPU is an error")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto = bf16 autocast on CUDA, fp32 on CPU")
    g.add_argument("--batch-size", type=int, default=None, help="images per step (default 32; llu 256)")
    g.add_argument("--threads", type=int, default=None, help="torch intra-op CPU threads (default: torch's)")
    g.add_argument("--output", metavar="DIR", default=None, help="run directory (log, checkpoint, result JSON)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The argument parser. ``selected``: the subcommand about to run (extension modules are imported only for it;
    the method list in ``train --help`` only then too: importing the model side costs seconds)."""
    parser = _Parser(
        prog=PROG, description="leanclip: kernel-backed, memory-lean parameter-efficient fine-tuning of open_clip "
                               "CLIP models (CLIPFit, LN, BitFit, CoOp, LLU, linear probe, ...)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    if selected == "train":
        from leanclip.methods import METHODS

        method_help = f"PEFT method: one of {', '.join(sorted(METHODS))}, or a '+' combination (default clipfit)"
    else:
        method_help = "PEFT method (default clipfit)"
    t = sub.add_parser("train", help="fine-tune a model (few-shot protocol) and evaluate it",
                       description="Fine-tune with a PEFT method; writes log.jsonl, checkpoint.safetensors (trainable "
                                   "parameters + optimizer, each epoch) and result.json under --output.")
    _add_model_args(t)
    _add_data_args(t)
    g = t.add_argument_group("method and optimisation")
    g.add_argument("--method", default="clipfit",
                   help=method_help)
    g.add_argument("--opt", action="append", default=None, metavar="KEY=VALUE",
                   help="a method option, repeatable (e.g. --opt rank=4 --opt targets=q,v for lora, --opt beta=0.5 "
                        "for llu, --opt reduction=16 for houlsby); checked against the options the method declares")
    g.add_argument("--tower", choices=("image", "text", "both"), default="both",
                   help="tower for ln / bitfit (default both)")
    g.add_argument("--recompute", choices=("none", "mlp", "mlp+qkv", "block"), default="none",
                   help="exact activation recompute policy of the lean blocks (default none)")
    g.add_argument("--no-lean", action="store_true", help="keep open_clip's plain modules (baseline)")
    g.add_argument("--frozen-bf16", action="store_true", help="keep frozen tower weights in bf16")
    g.add_argument("--epochs", type=int, default=None, help="epochs (default 10)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3; llu / linear-probe 1e-3)")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default=None,
                   help="sgd (momentum 0.9) or adamw (default sgd; llu / linear-probe adamw)")
    g.add_argument("--weight-decay", type=float, default=None, help="weight decay (default 5e-4)")
    g.add_argument("--warmup-epochs", type=int, default=None,
                   help="constant warm-up epochs at --warmup-lr (default 1; skipped when >= --epochs)")
    g.add_argument("--warmup-lr", type=float, default=1e-5, help="warm-up learning rate (default 1e-5)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--clip-grad-norm", type=float, default=None, help="clip the gradient norm (default off)")
    g.add_argument("--kd-lambda", type=float, default=8.0, help="CLIPFit distillation weight (default 8)")
    g.add_argument("--llu-lambda", type=float, default=1e3, help="LLU regulariser weight on mean((W-I)^2)+mean(b^2) (default 1e3, the authors' value)")
    g.add_argument("--llu-clusters", type=int, default=512,
                   help="LLU image bank: at most this many agglomerative cluster centres (0 = all training features)")
    g.add_argument("--log-every", type=int, default=1, help="optimizer steps between log lines (default 1)")
    g.add_argument("--resume", metavar="PATH", default=None,
                   help="continue from a checkpoint (file or run dir) exactly where it stopped")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --output (without it, a folder holding a run is refused)")
    _add_run_args(t)
    from leanclip import lilt_cli  # --task contrastive / retrieval (LilT, LiT): leanclip.lilt_cli

    lilt_cli.add_train_arguments(t)

    e = sub.add_parser("eval", help="evaluate a fine-tuned checkpoint",
                       description="Rebuild the model, re-apply the checkpoint's method and load its trainable "
                                   "parameters, then report top-1 / top-5 accuracy.")
    e.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="checkpoint.safetensors written by 'leanclip train' (or its run directory)")
    _add_model_args(e)
    _add_data_args(e)
    _add_run_args(e)
    e.add_argument("--use-recorded-weights", action="store_true",
                   help="load the weights the checkpoint records (a file only if its sha256 still matches) instead "
                        "of naming them with --pretrained")
    # unset data flags are filled from the checkpoint's record (leanclip.cli_common.restore_data)
    e.set_defaults(**{k: None for k in DATA_DEFAULTS})
    lilt_cli.add_eval_arguments(e)

    z = sub.add_parser("zeroshot", help="zero-shot accuracy of a (pretrained) model",
                       description="Zero-shot CLIP classification with hand-written prompts.")
    _add_model_args(z)
    _add_data_args(z)
    _add_run_args(z)

    for name, (module, help_) in SUBCOMMANDS.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            continue
        sp = sub.add_parser(name, help=help_)
        if name == selected:
            mod = importlib.import_module(module)
            mod.add_arguments(sp)
            sp.set_defaults(func=mod.run)
    return parser


# ------------------------------------------------------------------------------------------------------------- model
def synthetic_pretrained_weights(folder, model_name: str = DEFAULT_MODEL, steps: int = 40, *, seed: int = 0) -> str:
    """Path of a safetensors state dict of ``model_name`` (random init with torch seed 0) after
    :func:`pretrain_synthetic` for ``steps`` steps, made once and cached in ``folder`` (keyed by the config, versions
    and the code that makes it; written atomically). For tests, demos and smoke runs: ``--pretrained PATH``."""
    import inspect
    import warnings

    import open_clip
    import torch
    from safetensors.torch import save_file

    from leanclip import contrastive
    from leanclip.configs import create_random_model, register_tiny_config

    register_tiny_config()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise UsageError(f"unknown open_clip config {model_name!r}")
    key = hashlib.sha256(json.dumps([1, model_name, cfg, steps, seed, torch.__version__, open_clip.__version__,
                                     inspect.getsource(contrastive.pretrain_contrastive),
                                     inspect.getsource(pretrain_synthetic)], sort_keys=True,
                                    default=str).encode()).hexdigest()[:16]
    folder = Path(folder)
    path = folder / f"{model_name}-synthetic{steps}-{key}.safetensors"
    if path.is_file():
        return str(path)
    model = create_random_model(model_name, 0)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pretrain_synthetic(model, open_clip.get_tokenizer(model_name), steps, size, seed=seed)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    utils.atomic_write(path, lambda tmp: save_file(state, tmp))
    return str(path)


# -------------------------------------------------------------------------------------------------------------- data
def _synthetic_root(args, image_size: int, n_train: int, n_val: int, n_test: int) -> str:
    """The cached synthetic dataset for these sizes (leanclip.synthetic.cached_split_dataset: hash-checked before use,
    rebuilt atomically when it does not match). Default home: a private (0700, own, not writable by others) folder
    in the per-user cache, never a shared temp dir where another user could plant the images; ``--synthetic-dir``
    names another folder explicitly."""
    from leanclip import synthetic

    if args.synthetic_dir:
        base = synthetic.private_dir(args.synthetic_dir, "--synthetic-dir")
    else:
        base = synthetic.private_dir(os.path.join(synthetic.cache_dir(), "synthetic"), "synthetic-data cache")
    return synthetic.cached_split_dataset(base, args.synthetic_classes, image_size, n_train, n_val, n_test, seed=0)


def load_data(args, image_size: int, mean=None, std=None, *, train_transform: bool = True, need_train: bool = True):
    """-> dict(train=Dataset | None, eval=Dataset, classnames, dataset, new=(Dataset, classnames) | None,
    bad_images=[one-line reason per image left out by --skip-bad-images], record_selection=callable writing the
    K-shot selection under --output, for the caller to run once nothing else can reject the command).
    K-shot sampling (``need_train``) happens before the base/new subsampling, as in CoOp; --skip-bad-images drops
    unreadable images after both, so it never changes which classes exist or how they are labelled."""
    from leanclip import data as D

    outside = bool(getattr(args, "allow_outside_root", False))
    if args.data is not None:
        if not args.dataset:
            raise UsageError("--data needs --dataset NAME")
        splits, _ = D.load_dataset(args.data, args.dataset, allow_outside_root=outside)
        dataset = args.dataset
    elif args.split_file is not None:
        splits = D.read_split_file(args.split_file, args.image_root, allow_outside_root=outside)
        dataset = args.dataset or _split_name(args.split_file)
    else:
        if args.dataset:
            raise UsageError("--dataset needs --data ROOT (or use --split-file)")
        if args.shots > SYNTHETIC_MAX_SHOTS:
            raise UsageError(f"--shots {args.shots}: the synthetic dataset has {SYNTHETIC_MAX_SHOTS} training images "
                             f"per class at most")
        n_train = max(16, args.shots)
        root = _synthetic_root(args, image_size, n_train, 4, 20)
        splits, _ = D.load_dataset(root, "Synthetic")
        dataset = "Synthetic"
    train, record_selection = _few_shot(args, list(splits.get("train") or []), need_train)
    splits = {"train": train, "val": list(splits.get("val") or []), "test": list(splits.get("test") or [])}
    full = splits
    splits, classnames = D.subsample_classes(full, args.subsample)
    new_splits, new_names = D.subsample_classes(full, "new") if args.subsample == "base" else (None, None)
    used = {"train": splits["train"] if need_train else [], "eval": splits[args.eval_split],
            "new": new_splits[args.eval_split] if new_splits else []}
    bad_images = _drop_bad_images(used) if getattr(args, "skip_bad_images", False) else _require_images(used)
    if not used["eval"]:
        raise UsageError(f"the {args.eval_split} split of {dataset!r} is "
                         + ("empty" if not bad_images else "empty after --skip-bad-images"))
    kw = {k: v for k, v in (("mean", mean), ("std", std)) if v}
    tf_eval = D.clip_transform(image_size, train=False, **kw)
    tf_train = D.clip_transform(image_size, train=True, **kw) if train_transform else tf_eval
    return {
        "dataset": dataset,
        "classnames": classnames,
        "train": D.ImageDataset(used["train"], tf_train) if used["train"] else None,
        "eval": D.ImageDataset(used["eval"], tf_eval),
        "new": (D.ImageDataset(used["new"], tf_eval), new_names) if used["new"] else None,
        "bad_images": bad_images,
        # writes the few-shot selection under --output: the caller runs it once every check (prepare's too) passed
        "record_selection": record_selection,
    }


def _few_shot(args, train: list, need_train: bool):
    """K-shot selection of ``train`` -> (selection, record): ``record()`` writes the selection under the run folder
    (``--output``/fewshot) for later runs; a selection recorded there before is reused as it is."""
    from leanclip import data as D

    if not (train and args.shots and need_train):
        return train, lambda: None
    cache = os.path.join(args.output, "fewshot") if getattr(args, "output", None) else None
    if cache and os.path.exists(D.few_shot_cache_path(train, args.shots, args.seed, cache)):
        return D.few_shot_cached(train, args.shots, args.seed, cache), lambda: None
    chosen = D.few_shot(train, args.shots, args.seed)
    if cache is None:
        return chosen, lambda: None
    return chosen, lambda: D.few_shot_cached(train, args.shots, args.seed, cache)


def _require_images(used: dict) -> list[str]:
    """Before any work: every image the command will read must at least open as an image (header read; a truncated
    file is still found at its first full read, as a one-line error naming it). Returns [] or raises the first
    problem, with the count."""
    from leanclip.data import BadImageError, check_images

    _, bad = check_images([s for samples in used.values() for s in samples], decode=False)
    if bad:
        more = f" (and {len(bad) - 1} more; --skip-bad-images leaves them out)" if len(bad) > 1 else \
            " (--skip-bad-images leaves such images out)"
        raise BadImageError(f"{bad[0]}{more}", bad[0].path)
    return []


def _drop_bad_images(used: dict) -> list[str]:
    """Decode every image of the sample lists in ``used`` once; drop the unreadable ones from them in place.
    Returns one line per bad image and reports the count on stderr (one line)."""
    from leanclip.data import check_images

    everything = [s for samples in used.values() for s in samples]
    _, bad = check_images(everything)
    if bad:
        bad_paths = {e.path for e in bad}
        for name, samples in used.items():
            used[name] = [s for s in samples if s.path not in bad_paths]
        print(f"{PROG}: skipped {len(bad)} unreadable image(s) (--skip-bad-images), first: {bad[0]}",
              file=sys.stderr)
    return [str(e) for e in bad]


def _split_name(path: str) -> str | None:
    stem = Path(path).stem
    return stem[len("split_zhou_"):] if stem.startswith("split_zhou_") else None


def _templates(args, dataset):
    from leanclip.templates import get_templates

    override = args.templates
    if override is not None and len(override) == 1:
        override = override[0]
    return get_templates(dataset, override)


# ---------------------------------------------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    if getattr(args, "task", "classify") != "classify":
        from leanclip.lilt_cli import cmd_train_contrastive

        return cmd_train_contrastive(args)
    import torch

    from leanclip.methods import (is_closed_set, method_options, method_train_defaults, method_trainer, parse_method,
                                prepare)
    from leanclip.trainer import TrainConfig, train

    device = setup_device(args)
    parts = parse_method(args.method)
    method = "+".join(parts)
    defaults = {**BASE_DEFAULTS, **method_train_defaults(method)}
    pick = lambda k: getattr(args, k) if getattr(args, k) is not None else defaults[k]  # noqa: E731
    method_opts = method_opts_from_flags(parts, args.opt)
    run_folder(args, os.path.join("runs", f"{method}_{args.dataset or 'synthetic'}_{args.shots}shot_seed{args.seed}"))
    _check_resume(args.resume, method)
    if args.templates is not None:
        _templates(args, None)  # every template must hold "{}"
    weights = weights_record(args.pretrained, args.model)
    model, tok, size, (mean, std) = build_model(args)
    data = load_data(args, size, mean, std, train_transform=method_trainer(method) != "cached")
    if data["train"] is None:
        raise UsageError(f"the train split of {data['dataset']!r} is empty")
    templates = _templates(args, data["dataset"])
    prepare(model, method, lean=False if args.no_lean else None, recompute=args.recompute, tower=args.tower,
            classnames=data["classnames"], tokenizer=tok, model_name=args.model,
            frozen_dtype=torch.bfloat16 if args.frozen_bf16 else None, **method_opts,
            **({"templates": templates} if any("templates" in method_options(p) for p in parts) else {}))
    data["record_selection"]()  # every input was checked: a rejected command leaves no few-shot file behind
    cfg = TrainConfig(
        method=method, epochs=pick("epochs"), batch_size=pick("batch_size"), lr=pick("lr"),
        optimizer=pick("optimizer"), weight_decay=pick("weight_decay"), warmup_epochs=pick("warmup_epochs"),
        warmup_lr=args.warmup_lr, grad_accum=args.grad_accum, clip_grad_norm=args.clip_grad_norm,
        precision=args.precision, device=str(device), seed=args.seed, output=args.output, log_every=args.log_every,
        kd_lambda=args.kd_lambda, num_workers=args.num_workers, progress=not args.no_progress,
        llu_lambda=args.llu_lambda, llu_clusters=args.llu_clusters or None,
        extra={"model_name": args.model, "weights": weights, "pretrain_steps": args.pretrain_steps,
               "image_size": args.image_size, "data": data_record(args, data["dataset"])},
    )
    eval_sets = {("base" if args.subsample == "base" else args.eval_split): data["eval"]}
    if data["new"] is not None and not is_closed_set(method):
        eval_sets["new"] = data["new"]
    if args.warmup_epochs is not None:
        _warmup_notice(cfg)
    if args.overwrite:  # only now that every input was checked: a rejected command keeps the old run
        clear_run(args.output)
    summary = train(model, data["train"], data["classnames"], templates, tok, cfg, eval_sets=eval_sets,
                    resume=args.resume)
    result = {
        "command": "train", "method": method, "model": args.model, "dataset": data["dataset"], "shots": args.shots,
        "seed": args.seed, "subsample": args.subsample, "classes": len(data["classnames"]),
        "train_images": len(data["train"]), "skipped_images": len(data["bad_images"]), "epochs": cfg.epochs,
        "steps": summary["steps"],
        "final_train_loss": summary["final_train_loss"], "metrics": summary["metrics"],
        "seconds": round(summary["seconds"], 3), "device": summary["device"], "precision": summary["precision"],
        "checkpoint": summary.get("checkpoint"), "output": args.output,
    }
    emit(result, args, "result.json")
    return 0


def _warmup_notice(cfg) -> None:
    """A warm-up as long as the run is skipped (leanclip.trainer.lr_at): say so when the user asked for one."""
    if cfg.warmup_epochs and cfg.warmup_epochs >= cfg.epochs:
        utils.get_logger().warning("notice: --warmup-epochs %d >= --epochs %d: the run skips the warm-up",
                                   cfg.warmup_epochs, cfg.epochs)


def _check_resume(resume, method: str) -> None:
    """``--resume`` must name a leanclip checkpoint (file or run folder) of the same method, before any work."""
    if resume is None:
        return
    meta = read_checkpoint_meta(resume, flag="--resume")
    if meta["method"] != method:
        raise UsageError(f"--resume {meta['path']!r} is a {meta['method']!r} checkpoint, not --method {method!r}")


def cmd_eval(args) -> int:
    if getattr(args, "task", "classify") != "classify":
        from leanclip.lilt_cli import cmd_eval_retrieval

        return cmd_eval_retrieval(args)
    from leanclip.checkpoint import load_trainable
    from leanclip.methods import PREPARE_OPTIONS, is_closed_set, method_options, parse_method, prepare
    from leanclip.trainer import evaluate

    device = setup_device(args)
    meta = read_checkpoint_meta(args.checkpoint)
    saved_model = meta.get("model_name")
    restore_model(args, saved_model, DEFAULT_MODEL)  # the checkpoint says which architecture it belongs to
    extra = meta.get("extra") or {}
    opts = dict(meta.get("options") or {})
    run_cfg = (extra.get("config") or {}).get("extra") or {}  # what `leanclip train` built the model from
    restore_weights(args, run_cfg.get("weights"), legacy_path=run_cfg.get("pretrained"))
    restore_data(args, run_cfg.get("data"))
    if not args.pretrain_steps and run_cfg.get("pretrain_steps"):
        args.pretrain_steps = int(run_cfg["pretrain_steps"])
    if args.image_size is None and run_cfg.get("image_size"):
        args.image_size = int(run_cfg["image_size"])
    model, tok, size, (mean, std) = build_model(args)
    data = load_data(args, size, mean, std, train_transform=False, need_train=False)
    templates = _templates(args, data["dataset"]) if args.templates else (extra.get("templates")
                                                                           or _templates(args, data["dataset"]))
    parts = parse_method(meta["method"])
    accepted = {k for p in parts for k in method_options(p)}
    method_opts = {k: v for k, v in opts.items() if k in accepted and k not in PREPARE_OPTIONS}
    train_names = opts.get("classnames") or extra.get("classnames") or data["classnames"]
    prepare(model, meta["method"], lean=bool(opts.get("lean", True)), tower=opts.get("tower", "both"),
            classnames=train_names, tokenizer=tok, model_name=args.model,
            frozen_dtype=recorded_frozen_dtype(opts), **method_opts)
    load_trainable(model, meta["path"])
    model.to(device)
    if is_closed_set(meta["method"]) and len(train_names) != len(data["classnames"]):
        raise UsageError(f"linear-probe checkpoint classifies {len(train_names)} classes; the evaluation set has "
                         f"{len(data['classnames'])} (a probe cannot evaluate new classes)")
    res = evaluate(model, data["eval"], data["classnames"], templates, tok, args.batch_size or 256, device=device,
                   precision=args.precision, num_workers=args.num_workers, progress=not args.no_progress)
    result = {"command": "eval", "method": meta["method"], "checkpoint": meta["path"], "dataset": data["dataset"],
              "split": args.eval_split, "subsample": args.subsample, "classes": len(data["classnames"]),
              "skipped_images": len(data["bad_images"]), **res}
    emit(result, args, "eval.json")
    return 0


def cmd_zeroshot(args) -> int:
    from leanclip.trainer import zeroshot

    device = setup_device(args)
    model, tok, size, (mean, std) = build_model(args)
    data = load_data(args, size, mean, std, train_transform=False, need_train=False)
    templates = _templates(args, data["dataset"])
    model.to(device)
    res = zeroshot(model, data["eval"], data["classnames"], templates, tok, args.batch_size or 256, device=device,
                   precision=args.precision, num_workers=args.num_workers, progress=not args.no_progress)
    result = {"command": "zeroshot", "model": args.model, "pretrained": args.pretrained, "dataset": data["dataset"],
              "split": args.eval_split, "subsample": args.subsample, "classes": len(data["classnames"]),
              "templates": templates, "skipped_images": len(data["bad_images"]), **res}
    emit(result, args, "zeroshot.json")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "zeroshot": cmd_zeroshot}


# -------------------------------------------------------------------------------------------------------------- main
def _first_command(argv: Sequence[str]) -> str | None:
    for a in argv:
        if not a.startswith("-"):
            return a
    return None


# Exceptions that report a problem with the user's input or environment: one line, no traceback (set
# LEANCLIP_TRACEBACK=1 to see it). Anything else is a bug in leanclip and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
EXIT_DIVERGED = utils.NonFiniteLossError.exit_code  # a run stopped on a non-finite loss: not bad input, not a bug




def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in msg:
        msg = f"{e.filename}: {msg}"
    return msg or type(e).__name__


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (notices such as a fallback to open_clip's plain modules) as one ``leanclip: warning:`` line."""
    text = " ".join(str(message).split())
    text = text[len(PROG) + 2:] if text.startswith(f"{PROG}: ") else text
    print(f"{PROG}: warning: {text}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: returns the exit code (0 ok, 2 bad input, 3 a run stopped on a non-finite loss)."""
    import warnings

    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(_first_command(argv))
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help (0) or an argparse usage error (2, message already printed)
            return int(e.code) if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
        func = COMMANDS.get(args.command) or getattr(args, "func", None)
        if func is None:
            raise UsageError(f"unknown command {args.command!r}")
        check_numbers(args)
        rc = func(args)
        return int(rc or 0)
    except Exception as e:
        diverged = isinstance(e, utils.NonFiniteLossError)
        if not (diverged or isinstance(e, USER_ERRORS)) or os.environ.get("LEANCLIP_TRACEBACK") == "1":
            raise
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_DIVERGED if diverged else EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
