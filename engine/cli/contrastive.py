"""``leanclip train --task contrastive`` and ``leanclip eval --task retrieval`` (LilT / LiT image-text alignment).

    leanclip train --task contrastive --method lilt-ln --pairs train.csv --eval-pairs test.csv --epochs 5 \\
        --batch-size 256 --pretrained vit_b16.safetensors --model ViT-B-16 --output runs/lilt-ln
    leanclip eval --task retrieval --checkpoint runs/lilt-ln --pairs test.csv
    torchrun --nproc_per_node=4 -m leanclip train --task contrastive --method lilt-adapter --pairs coco.json ...
    leanclip train --task contrastive --method lilt-ln --epochs 2        # no --pairs: synthetic pairs (smoke run)

Hooked into ``leanclip.cli`` (``add_train_arguments`` / ``add_eval_arguments`` add the options, ``cmd_train`` /
``cmd_eval`` hand over when ``--task`` is not ``classify``). This module imports nothing heavy at import time.
"""
from __future__ import annotations

import argparse
import os

import torch

from leanclip import data as D_data
from leanclip import distributed as D
from leanclip.cli.common import (
    UsageError, build_model, clear_run, emit, init_from_path, method_opts_from_flags, prepare_from_checkpoint,
    read_checkpoint_meta, recompute_kwargs, restore_inputs, run_folder, run_provenance, setup_device,
    stop_together, template_override, weights_record,
)
from leanclip.contrastive import ContrastiveConfig, evaluate_retrieval, train_contrastive
from leanclip.pairs import load_pairs, synthetic_pairs
from leanclip.run_files import RESULT_FILES
from leanclip.templates import get_templates

TRAIN_TASKS = ("classify", "contrastive")
EVAL_TASKS = ("classify", "retrieval")
SYNTHETIC_TRAIN_SEED, SYNTHETIC_EVAL_SEED = 100, 101   # not seed 0: the CLI's --pretrain-steps corpus
DEFAULTS = {"batch_size": 64, "lr": 1e-3, "weight_decay": 0.02, "epochs": 1}  # a method may declare its own lr


# --------------------------------------------------------------------------------------------------------- arguments
def _add_pair_args(g, *, train: bool) -> None:
    g.add_argument("--pairs", metavar="FILE", default=None,
                   help="image-text pairs: CSV/TSV (columns image, caption), JSONL ({image, caption} per line) or "
                        "JSON (Karpathy split file, COCO captions file, or a list of {image, caption}); relative "
                        "image paths resolve against --image-root or the file's folder. Default: synthetic pairs")
    g.add_argument("--pairs-split", metavar="SPLIT", default=None,
                   help="keep only entries of this split (JSON/JSONL files with a 'split' field; 'train' includes "
                        "Karpathy's 'restval'). Default: every entry")
    g.add_argument("--synthetic-eval-pairs", type=int, default=256, metavar="N",
                   help="size of the synthetic evaluation set when no pair file is given (default 256)")
    if train:
        g.add_argument("--eval-pairs", metavar="FILE", default=None,
                       help="pairs to evaluate retrieval on before and after training (default: none with --pairs, "
                            "a synthetic set without)")
        g.add_argument("--eval-pairs-split", metavar="SPLIT", default=None, help="split of --eval-pairs to keep")
        g.add_argument("--synthetic-pairs", type=int, default=1024, metavar="N",
                       help="number of synthetic training pairs when no --pairs is given (default 1024)")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=TRAIN_TASKS, default="classify",
                   help="classify: few-shot classification fine-tuning (default); contrastive: LilT / LiT image-text "
                        "alignment on --pairs (symmetric InfoNCE, learnable temperature, DDP under torchrun)")
    g = p.add_argument_group("contrastive task (--task contrastive; see docs/LILT.md)")
    _add_pair_args(g, train=True)
    g.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="run length in optimizer steps (overrides --epochs; the cosine schedule spans it)")
    g.add_argument("--warmup-steps", type=int, default=None, metavar="N",
                   help="linear warm-up steps (default 0; --warmup-epochs counts it in epochs instead)")
    g.add_argument("--min-lr", type=float, default=None, help="the cosine schedule ends at this rate (default 0)")
    g.add_argument("--max-pairs", type=int, default=None, metavar="N",
                   help="train on a seeded subset of N training pairs (data-scaling runs; default: all)")
    g.add_argument("--zeroshot-data", metavar="ROOT", default=None,
                   help="after training, zero-shot classification accuracy (top-1/5) on the test split of "
                        "--zeroshot-dataset under ROOT (e.g. ImageNetV2), with the dataset's template")
    g.add_argument("--zeroshot-dataset", metavar="NAME", default=None, help="the dataset of --zeroshot-data")
    g.add_argument("--randaugment", nargs="?", const="torchvision", choices=("torchvision", "albef"), default=None,
                   help="RandAugment after the random crops on the training images (implies --augment): "
                        "torchvision's (the default, colour operations included) or albef, ALBEF's colour-free "
                        "N=2, M=7 that LilT trains with (--preset lilt)")
    g.add_argument("--temperature", type=float, default=None,
                   help="initial learnable temperature of the LilT methods (default 0.07, kept in [0.001, 0.5])")
    g.add_argument("--reduction", type=int, default=None, help="lilt-adapter bottleneck reduction r (default 4)")
    g.add_argument("--deep-init", choices=("copy", "random"), default=None,
                   help="lilt-deep: the extra block starts as a copy of the tower's last block (default) or "
                        "randomly initialised; its output projections are zero either way (the identity), except "
                        "on a post-LN BERT tower, whose extra layer changes the output from the start")
    g.add_argument("--no-projections", action="store_true",
                   help="LilT methods: keep visual.proj / text_projection frozen")
    g.add_argument("--augment", action="store_true", help="random resized crops (no flips) on the training images")
    g.add_argument("--no-initial-eval", action="store_true", help="skip the retrieval evaluation before training")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=EVAL_TASKS, default="classify",
                   help="classify: top-1/top-5 accuracy (default); retrieval: image<->text recall@1/5/10 on --pairs")
    g = p.add_argument_group("retrieval task (--task retrieval)")
    _add_pair_args(g, train=False)


# ------------------------------------------------------------------------------------------------------------ helpers
def _usage(msg: str):
    return UsageError(msg)


def _load(path, root, split, allow_outside_root=False):
    return load_pairs(path, root, split=split, allow_outside_root=allow_outside_root)


def _image_size(model) -> int:
    s = model.visual.image_size
    return int(s[0] if isinstance(s, (tuple, list)) else s)


def _synthetic(n: int, size: int, seed: int):
    return synthetic_pairs(n, size=size, seed=seed)


def _method_opts(args, parts) -> dict:
    from leanclip.methods import method_options

    accepted = {k for p in parts for k in method_options(p)}
    given = {"temperature": args.temperature, "reduction": args.reduction, "deep_init": args.deep_init,
             "projections": False if args.no_projections else None}
    flags = {"temperature": "--temperature", "reduction": "--reduction", "deep_init": "--deep-init",
             "projections": "--no-projections"}
    opts = {}
    for k, v in given.items():
        if v is None:
            continue
        if k not in accepted:
            raise _usage(f"{flags[k]} has no effect on method {'+'.join(parts)!r}")
        opts[k] = v
    return opts


def _short(metrics: dict) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in metrics.items()}


def _train_and_eval_pairs(args, size: int):
    """The training pairs and the pairs evaluated before and after training (synthetic ones without ``--pairs``)."""
    if args.pairs is not None:
        train_pairs = _load(args.pairs, args.image_root, args.pairs_split, args.allow_outside_root)
    elif args.pairs_split is not None:
        raise _usage("--pairs-split needs --pairs FILE")
    else:
        train_pairs = _synthetic(args.synthetic_pairs, size, SYNTHETIC_TRAIN_SEED)
    if args.max_pairs is not None:
        train_pairs = train_pairs.subset(args.max_pairs, seed=args.seed)
    given = args.eval_pairs is not None if args.pairs is not None else bool(args.eval_pairs)
    if given:
        return train_pairs, _load(args.eval_pairs, args.image_root, args.eval_pairs_split, args.allow_outside_root)
    return train_pairs, None if args.pairs is not None else _synthetic(args.synthetic_eval_pairs, size,
                                                                      SYNTHETIC_EVAL_SEED)


def _zeroshot_set(args, model):
    """``--zeroshot-data`` (a CoOp-layout root, torchvision's CIFAR-100 / SVHN folder, or a CoOp split file) and
    ``--zeroshot-dataset``: (dataset name, test images, classnames), read and checked before any training; None when
    not asked for."""
    from leanclip.zeroshot_sets import read_torchvision_set, torchvision_set

    if args.zeroshot_data is None:
        if args.zeroshot_dataset is not None:
            raise _usage("--zeroshot-data and --zeroshot-dataset go together")
        if args.templates is not None or args.template_set is not None:
            raise _usage("--templates / --template-set pick the zero-shot prompts: they need --zeroshot-data")
        return None
    is_file = os.path.isfile(args.zeroshot_data)
    if args.zeroshot_dataset is None and not is_file:
        raise _usage("--zeroshot-data and --zeroshot-dataset go together (a split file may go alone)")
    pp = getattr(model.visual, "preprocess_cfg", None) or {}
    kw = {k: tuple(pp[k]) for k in ("mean", "std") if pp.get(k)}
    tf = D_data.clip_transform(_image_size(model), train=False, **kw)
    name = args.zeroshot_dataset
    if torchvision_set(name) and not is_file:
        images, labels, classnames = read_torchvision_set(args.zeroshot_data, name)
        return name, D_data.TensorImageDataset(images, labels, transform=tf), classnames
    if is_file:
        splits = D_data.read_split_file(args.zeroshot_data, args.image_root,
                                        allow_outside_root=args.allow_outside_root)
        classnames = D_data.classnames_from_samples(splits)
        name = name or os.path.splitext(os.path.basename(args.zeroshot_data))[0].removeprefix("split_zhou_")
    else:
        splits, classnames = D_data.load_dataset(args.zeroshot_data, name,
                                                 allow_outside_root=args.allow_outside_root)
    if not splits.get("test"):
        raise _usage(f"--zeroshot-data {args.zeroshot_data!r} has no test split")
    return name, D_data.ImageDataset(splits["test"], tf), classnames


def _zeroshot_templates(args, name) -> list[str]:
    """LilT's prompt (``leanclip.zeroshot_sets.lilt_templates``) unless ``--templates`` or ``--template-set``."""
    from leanclip.zeroshot_sets import lilt_templates

    if args.templates is None and args.template_set is None:
        return lilt_templates(name)
    return get_templates(name, template_override(args), template_set=args.template_set or "coop")


def _zeroshot(model, zs_set, tok, device, args) -> dict:
    """Zero-shot top-1 / top-5 of the aligned model (the method's features, hand-written prompts)."""
    from leanclip.trainer import evaluate

    name, images, classnames = zs_set
    templates = _zeroshot_templates(args, name)
    res = evaluate(model, images, classnames, templates, tok, args.batch_size or 256, device=device,
                   precision=args.precision, num_workers=args.num_workers, progress=not args.no_progress)
    return {"dataset": name, "templates": templates, **_short(res)}


# --preset lilt: LilT's recipe (its CLIPAdjustable config and pre-training script). The global batch is one step's
# batch over every rank (torchrun splits it), so the InfoNCE negatives span all 512 pairs.
LILT_PRESET = {"lr": 1e-4, "weight_decay": 0.02, "warmup_epochs": 1, "min_lr": 1e-5, "epochs": 15,
               "batch_size": 512, "image_size": 256, "randaugment": "albef"}


def apply_preset(args) -> dict:
    """``--preset lilt``: fill every flag of :data:`LILT_PRESET` the user did not give (explicit flags win);
    returns the values the run uses for them, which the run records. Before the model is built (``image_size``)."""
    if args.preset not in (None, "lilt"):
        raise _usage(f"--preset {args.preset} is a classification recipe; --task contrastive takes --preset lilt")
    if args.preset is None:
        return {}
    for k, v in LILT_PRESET.items():
        if getattr(args, k) is None and not (k == "warmup_epochs" and args.warmup_steps is not None):
            setattr(args, k, v)
    return {k: getattr(args, k) for k in LILT_PRESET}


def _warmup_steps(args, n_pairs: int, batch_size: int) -> int:
    """``--warmup-steps``, or ``--warmup-epochs`` in optimizer steps (an epoch is ``n_pairs // batch_size`` steps:
    the last partial batch is dropped)."""
    if args.warmup_epochs is not None and args.warmup_steps is not None:
        raise _usage("--warmup-epochs and --warmup-steps both set the warm-up: give one")
    if args.warmup_epochs is not None:
        return args.warmup_epochs * max(1, n_pairs // batch_size)
    return args.warmup_steps or 0


def _contrastive_config(args, method: str, device, weights, n_pairs: int) -> ContrastiveConfig:
    """The run's config from the flags, the method's declared defaults and the task's (``DEFAULTS``)."""
    from leanclip.methods import method_contrastive_defaults

    pick = lambda k: getattr(args, k) if getattr(args, k) is not None else DEFAULTS[k]  # noqa: E731
    lr = args.lr if args.lr is not None else method_contrastive_defaults(method).get("lr", DEFAULTS["lr"])
    return ContrastiveConfig(
        epochs=pick("epochs"), max_steps=args.max_steps, batch_size=pick("batch_size"), lr=lr,
        weight_decay=pick("weight_decay"), warmup_steps=_warmup_steps(args, n_pairs, pick("batch_size")),
        min_lr=args.min_lr or 0.0, clip_grad_norm=args.clip_grad_norm,
        precision=args.precision, device=str(device), seed=args.seed, output=args.output, log_every=args.log_every,
        progress=not args.no_progress, num_workers=args.num_workers, augment=args.augment or bool(args.randaugment),
        randaugment=args.randaugment or False,
        extra=run_provenance(args, weights, pairs=os.path.abspath(args.pairs) if args.pairs else None,
                             pairs_split=args.pairs_split, max_pairs=args.max_pairs, preset=args.preset))


def _train_result(args, method, model, cfg, summary, train_pairs, eval_pairs, before, world_size) -> dict:
    """The JSON result of ``train --task contrastive``."""
    from leanclip.methods.lilt import trainable_summary

    counts = trainable_summary(model)
    return {
        "command": "train", "task": "contrastive", "method": method, "model": args.model,
        "pairs": args.pairs or "synthetic", "train_pairs": len(train_pairs), "train_images": train_pairs.num_images,
        "eval_pairs": len(eval_pairs) if eval_pairs else None, "world_size": world_size,
        "batch_size": cfg.batch_size, "epochs": cfg.epochs, "steps": summary["steps"],
        "final_loss": summary["final_loss"], "temperature": summary["temperature"],
        "trainable": counts["trainable"], "trainable_percent": counts["percent"],
        "metrics_before": _short(before) if before else None, "metrics": _short(summary["metrics"]),
        "seconds": round(summary["seconds"], 3), "device": summary["device"], "precision": summary["precision"],
        "checkpoint": summary.get("checkpoint"), "output": args.output,
    }


# ------------------------------------------------------------------------------------------------------------ train
def cmd_train_contrastive(args) -> int:
    from leanclip.methods import parse_method, prepare

    if args.optimizer not in (None, "adamw"):
        raise _usage("--task contrastive trains with AdamW (--optimizer sgd is not supported)")
    recipe = apply_preset(args)
    parts = parse_method(args.method)
    method = "+".join(parts)
    opts = {**method_opts_from_flags(parts, args.opt), **_method_opts(args, parts)}
    if args.threads is not None:  # its range: check_numbers
        torch.set_num_threads(args.threads)
    init_from = init_from_path(args.init_from)
    info = D.init_distributed(args.device)
    try:
        if info.is_main:
            run_folder(args, os.path.join("runs", f"contrastive_{method}_seed{args.seed}"))
        elif args.output is None:
            args.output = os.path.join("runs", f"contrastive_{method}_seed{args.seed}")
        D.inputs_checked(info)  # the run folder only rank 0 checks: every rank stops here when it was refused
        weights = weights_record(args.pretrained, args.model)
        model, tok, size, _ = build_model(args)
        size = _image_size(model)
        train_pairs, eval_pairs = _train_and_eval_pairs(args, size)
        zs_set = _zeroshot_set(args, model)
        cfg = _contrastive_config(args, method, info.device, weights, len(train_pairs))
        prepare(model, method, lean=False if args.no_lean else None,
                **recompute_kwargs(args, cfg.batch_size, tokenizer=tok),
                tower=args.tower, tokenizer=tok, model_name=args.model,
                frozen_dtype=torch.bfloat16 if args.frozen_bf16 else None, init_from=init_from, **opts)
        cfg.validate()
        D.check_batch_size(cfg.batch_size, info.world_size)
        D.inputs_checked(info, final=True)
        before = None
        if eval_pairs is not None and info.is_main and not args.no_initial_eval:
            model.to(info.device)
            before = evaluate_retrieval(model, eval_pairs, tok, device=info.device, precision=args.precision)
        if args.overwrite and info.is_main:  # only now that every input was checked
            clear_run(args.output)
        summary = train_contrastive(model, train_pairs, tok, cfg, eval_pairs=eval_pairs, resume=args.resume)
        if info.is_main:
            result = _train_result(args, method, model, cfg, summary, train_pairs, eval_pairs, before,
                                   info.world_size)
            result["options"] = opts  # the method options given (--opt and the flags that set one)
            if recipe:
                result.update(preset=args.preset, recipe=recipe, warmup_steps=cfg.warmup_steps)
            if zs_set is not None:
                result["zeroshot"] = _zeroshot(model, zs_set, tok, info.device, args)
            emit(result, args, RESULT_FILES["train"])
        return 0
    except Exception as e:
        stop_together(info, e)
        raise
    finally:
        D.cleanup(info)


# ------------------------------------------------------------------------------------------------------------- eval
def cmd_eval_retrieval(args) -> int:
    device = setup_device(args)
    meta = read_checkpoint_meta(args.checkpoint)
    extra = meta.get("extra") or {}
    if extra.get("leanclip_task") != "contrastive":
        raise _usage(f"--checkpoint {meta['path']!r} was not written by 'train --task contrastive' (use --task "
                     f"classify for classification checkpoints)")
    restore_inputs(args, meta)
    model, tok, size, _ = build_model(args)
    size = _image_size(model)
    if args.pairs is not None:
        pairs = _load(args.pairs, args.image_root, args.pairs_split, args.allow_outside_root)
    else:
        if args.pairs_split is not None:
            raise _usage("--pairs-split needs --pairs FILE")
        pairs = _synthetic(args.synthetic_eval_pairs, size, SYNTHETIC_EVAL_SEED)
    prepare_from_checkpoint(model, meta, tok, args.model)
    model.to(device)
    res = evaluate_retrieval(model, pairs, tok, batch_size=args.batch_size or 256, device=device,
                             precision=args.precision, progress=not args.no_progress)
    result = {"command": "eval", "task": "retrieval", "method": meta["method"], "checkpoint": meta["path"],
              "pairs": args.pairs or "synthetic", **_short(res)}
    emit(result, args, RESULT_FILES["eval"])
    return 0
