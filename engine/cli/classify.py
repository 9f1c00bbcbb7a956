"""``leanclip train`` / ``eval`` / ``zeroshot`` for classification (the few-shot protocol) and the data they share;
``--task contrastive`` / ``retrieval`` hand over to ``leanclip.cli.contrastive``."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from leanclip import data as D
from leanclip import distributed as dist
from leanclip import synthetic, utils
from leanclip.cli import contrastive as contrastive_cli
from leanclip.cli.common import (
    PROG, UsageError, build_model, check_recompute_flags, clear_run, data_record, emit, init_from_path,
    method_opts_from_flags, prepare_from_checkpoint, read_checkpoint_meta, recompute_kwargs, restore_data,
    restore_inputs, run_folder, run_provenance, setup_device, stop_together, template_override, weights_record,
)
from leanclip.cli.option_flags import options_from_flags
from leanclip.data import BadImageError, check_images
from leanclip.run_files import RESULT_FILES
from leanclip.templates import get_templates

FEWSHOT_DIR = "fewshot"  # under --output: the few-shot selections a run made, reused by later runs there
SYNTHETIC_MAX_SHOTS = 1000  # images per class the synthetic dataset may be asked to draw (and cache)

# Training defaults when the flag is not given: the CLIPFit / CoOp recipe, replaced by what the method declares
# (leanclip.methods.MethodTraits.train_defaults).
BASE_DEFAULTS = {"optimizer": "sgd", "lr": 2e-3, "weight_decay": 5e-4, "batch_size": 32, "warmup_epochs": 1,
                 "epochs": 10}


# -------------------------------------------------------------------------------------------------------------- data
def _synthetic_root(args, image_size: int, n_train: int, n_val: int, n_test: int) -> str:
    """The cached synthetic dataset for these sizes (leanclip.synthetic.cached_split_dataset: hash-checked before use,
    rebuilt atomically when it does not match). Default home: a private (0700, own, not writable by others) folder
    in the per-user cache, never a shared temp dir where another user could plant the images; ``--synthetic-dir``
    names another folder explicitly."""
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
    _check_classes(args, dataset, classnames, used["train"], new_names)
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


def _check_classes(args, dataset, classnames, train, new_names) -> None:
    """At least 2 classes in what the command classifies (the classes of --subsample), in what it trains on and in
    the new classes a base run also scores: with one, every prediction is right and the result means nothing."""
    D.check_classes(classnames, f"dataset {dataset!r}" + (f" (--subsample {args.subsample})"
                                                          if args.subsample != "all" else ""))
    if train:
        D.check_classes(sorted({s.label: s.classname for s in train}.values()), f"the train split of {dataset!r}")
    if new_names is not None:
        D.check_classes(new_names, f"dataset {dataset!r} (the new classes of --subsample base)")


def _few_shot(args, train: list, need_train: bool):
    """K-shot selection of ``train`` -> (selection, record): ``record()`` writes the selection under the run folder
    (``--output``/fewshot) for later runs; a selection recorded there before is reused as it is."""
    if not (train and args.shots and need_train):
        return train, lambda: None
    cache = os.path.join(args.output, FEWSHOT_DIR) if getattr(args, "output", None) else None
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
    _, bad = check_images([s for samples in used.values() for s in samples], decode=False)
    if bad:
        more = f" (and {len(bad) - 1} more; --skip-bad-images leaves them out)" if len(bad) > 1 else \
            " (--skip-bad-images leaves such images out)"
        raise BadImageError(f"{bad[0]}{more}", bad[0].path)
    return []


def _drop_bad_images(used: dict) -> list[str]:
    """Decode every image of the sample lists in ``used`` once; drop the unreadable ones from them in place.
    Returns one line per bad image and reports the count on stderr (one line)."""
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


def _templates(args, dataset, template_set: str | None = None):
    """``--templates``, else the dataset's template of ``--template-set`` (else ``template_set``, else CoOp's)."""
    chosen = getattr(args, "template_set", None) or template_set or "coop"
    return get_templates(dataset, template_override(args), template_set=chosen)


# ---------------------------------------------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    check_recompute_flags(args)
    if getattr(args, "task", "classify") != "classify":
        return contrastive_cli.cmd_train_contrastive(args)
    from leanclip.methods import method_trainer, parse_method

    setup_device(args)  # --threads, and LEANCLIP_BACKEND checked against --device
    parts = parse_method(args.method)
    method = "+".join(parts)
    world = int(os.environ.get("WORLD_SIZE") or 1)
    if world > 1 and method_trainer(method) == "cached":
        raise UsageError(f"--method {method} trains on cached features in one process: run it without torchrun "
                         f"(WORLD_SIZE={world})")
    info = dist.init_distributed(args.device)  # world size 1 (a no-op) outside torchrun
    try:
        return _train_classify(args, info, parts, method)
    except Exception as e:
        stop_together(info, e)
        raise
    finally:
        dist.cleanup(info)


def _memory_record(model) -> dict:
    """How the run held its memory, as ``prepare`` recorded it: lean modules, recompute policy (and chunk), and the
    dtype of the frozen weights (that of the loaded model unless ``--frozen-bf16``)."""
    opts = model.leanclip_info["options"]
    record = {"lean": opts.get("lean"), "recompute": opts.get("recompute"),
              "recompute_chunk": opts.get("recompute_chunk"), "frozen_dtype": opts.get("frozen_dtype", "as loaded")}
    if "recompute_plan" in opts:  # --memory-budget: the budget and the plan chosen for it
        record.update(memory_budget=opts["memory_budget"], recompute_plan=opts["recompute_plan"])
    return record


def _train_classify(args, info, parts, method) -> int:
    """The classification run of ``leanclip train`` in this process (``info``: its place among torchrun's)."""
    from leanclip.methods import (
        METHOD_TRAITS, is_closed_set, method_options, method_template_set, method_train_defaults, method_trainer,
        prepare,
    )
    from leanclip.trainer import TrainConfig, train

    device = info.device
    defaults = {**BASE_DEFAULTS, **method_train_defaults(method), **preset_defaults(args.preset, args)}
    pick = lambda k: getattr(args, k) if getattr(args, k) is not None else defaults[k]  # noqa: E731
    method_opts = method_opts_from_flags(parts, args.opt)
    method_opts.update(options_from_flags(args, parts, method_opts))  # --kd-lambda, --llu-*: the method's options
    default_out = os.path.join("runs", f"{method}_{args.dataset or 'synthetic'}_{args.shots}shot_seed{args.seed}")
    if info.is_main:
        run_folder(args, default_out)
    elif args.output is None:  # rank 0 checked the folder (and alone writes there); the others only need its name
        resume = Path(args.resume) if args.resume is not None else None
        args.output = default_out if resume is None else str(resume if resume.is_dir() else resume.parent)
    _check_resume(args.resume, method)
    init_from = init_from_path(args.init_from)
    if args.templates is not None:
        _templates(args, None)  # every template must hold "{}"
    dist.inputs_checked(info)  # the run folder only rank 0 checks: every rank stops here when it was refused
    weights = weights_record(args.pretrained, args.model)
    model, tok, size, (mean, std) = build_model(args)
    data = load_data(args, size, mean, std, train_transform=method_trainer(method) != "cached")
    if data["train"] is None:
        raise UsageError(f"the train split of {data['dataset']!r} is empty")
    templates = _templates(args, data["dataset"], method_template_set(method))
    # the step's text-tower batch: the class prompts, or each image's (image-conditioned prompts: CoCoOp)
    per_image = any("image_prompts" in METHOD_TRAITS[p].hooks for p in parts)
    prompts = len(data["classnames"]) * (pick("batch_size") if per_image else len(templates))
    recompute = recompute_kwargs(args, pick("batch_size"), prompts, tok)
    prepare(model, method, lean=False if args.no_lean else None, **recompute,
            tower=args.tower, classnames=data["classnames"], tokenizer=tok,
            model_name=args.model, init_from=init_from, frozen_dtype=torch.bfloat16 if args.frozen_bf16 else None, **method_opts,
            **({"templates": templates} if any("templates" in method_options(p) for p in parts) else {}))
    cfg = TrainConfig(
        method=method, epochs=pick("epochs"), batch_size=pick("batch_size"), lr=pick("lr"),
        optimizer=pick("optimizer"), weight_decay=pick("weight_decay"), warmup_epochs=pick("warmup_epochs"),
        warmup_lr=args.warmup_lr, grad_accum=args.grad_accum, clip_grad_norm=args.clip_grad_norm,
        precision=args.precision, device=str(device), seed=args.seed, output=args.output, log_every=args.log_every,
        num_workers=args.num_workers, progress=not args.no_progress,
        extra=run_provenance(args, weights, data=data_record(args, data["dataset"])),
    )
    eval_sets = {("base" if args.subsample == "base" else args.eval_split): data["eval"]}
    if data["new"] is not None and not is_closed_set(method):
        eval_sets["new"] = data["new"]
    if args.warmup_epochs is not None:
        _warmup_notice(cfg)
    _last_checks(args, model, cfg, data)
    dist.inputs_checked(info, final=True)
    _start_run_folder(args, info, data)
    dist.barrier()
    summary = train(model, data["train"], data["classnames"], templates, tok, cfg, eval_sets=eval_sets,
                    resume=args.resume)
    result = {
        "command": "train", "method": method, "model": args.model, "dataset": data["dataset"], "shots": args.shots,
        "seed": args.seed, "subsample": args.subsample, "classes": len(data["classnames"]),
        "train_images": len(data["train"]), "skipped_images": len(data["bad_images"]), "epochs": cfg.epochs,
        "steps": summary["steps"],
        "final_train_loss": summary["final_train_loss"], "metrics": summary["metrics"],
        "seconds": round(summary["seconds"], 3), "device": summary["device"], "precision": summary["precision"],
        **_memory_record(model), "checkpoint": summary.get("checkpoint"), "output": args.output,
        **summary.get("result_extra", {}),  # what a trainer adds to the result (llu: its maps' identity distances)
    }
    if info.world_size > 1:
        result["world_size"] = info.world_size
    if info.is_main:
        emit(result, args, RESULT_FILES["train"])
    return 0


def _last_checks(args, model, cfg, data) -> None:
    """The checks that need the prepared model or the config, before the run folder's first write: the starting
    weights are finite, the config is valid, a --resume checkpoint can continue this run."""
    from leanclip.training import check_resume, steps_per_epoch

    bad = utils.first_non_finite(model.named_parameters())
    if bad is not None:
        source = f"--pretrained {args.pretrained!r}" if args.pretrained else "the starting weights"
        raise UsageError(f"{source}: {bad} holds NaN/Inf (training would stop at its first step)")
    cfg.validate()
    if args.resume is not None:
        check_resume(args.resume, cfg, steps_per_epoch(len(data["train"]), cfg))


def _start_run_folder(args, info, data) -> None:
    """The run folder's first writes, on rank 0, once every check passed (a refused command leaves the folder as it
    was): --overwrite's clearing, the temp files of writes an earlier run was killed in (the folder and its few-shot
    records: the trainer cleans only the folder itself), the few-shot record."""
    if not info.is_main:
        return
    if args.overwrite:
        clear_run(args.output)
    for folder in (args.output, os.path.join(args.output, FEWSHOT_DIR)):
        utils.remove_stale_temps(folder)
    data["record_selection"]()


def _warmup_notice(cfg) -> None:
    """A warm-up as long as the run is skipped (leanclip.trainer.lr_at): say so when the user asked for one."""
    if cfg.warmup_epochs and cfg.warmup_epochs >= cfg.epochs:
        utils.get_logger().warning("notice: --warmup-epochs %d >= --epochs %d: the run skips the warm-up",
                                   cfg.warmup_epochs, cfg.epochs)


def coop_epochs(shots: int, dataset: str | None) -> int:
    """CoOp's run length: 200 epochs for 16 / 8 shots (and the full train split), 100 for 4 / 2, 50 for 1; ImageNet
    50 whatever the shots."""
    if dataset and dataset.lower().replace("-", "").replace("_", "") == "imagenet":
        return 50
    return 50 if shots == 1 else 100 if shots in (2, 4) else 200


# the classification recipes --preset names (the papers' optimisation settings: preset_defaults)
CLASSIFY_PRESETS = ("coop", "cocoop", "prograd")


def preset_defaults(preset: str | None, args) -> dict:
    """``--preset``: a paper's optimisation recipe as defaults (flags given explicitly still win). ``coop``: SGD
    (momentum 0.9) at 0.002, weight decay 5e-4, batch 32, one constant warm-up epoch at 1e-5, cosine, CoOp's epochs
    per shot count (the recipe LLU reports its few-shot results with). ``prograd``: the same (ProGrad's configs
    rn50 / rn50_ep100 / rn50_ep50 are CoOp's). ``cocoop``: the same at batch 1 for 10 epochs (KaiyangZhou/CoOp
    configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml)."""
    if preset is None:
        return {}
    if preset not in CLASSIFY_PRESETS:
        raise UsageError(f"--preset {preset} is the contrastive alignment recipe: add --task contrastive")
    recipe = {"optimizer": "sgd", "lr": 2e-3, "weight_decay": 5e-4, "batch_size": 32, "warmup_epochs": 1,
              "epochs": coop_epochs(args.shots, args.dataset)}
    if preset == "cocoop":
        recipe.update(batch_size=1, epochs=10)
    return recipe


def _check_resume(resume, method: str) -> None:
    """``--resume`` must name a leanclip checkpoint (file or run folder) of the same method, before any work."""
    if resume is None:
        return
    meta = read_checkpoint_meta(resume, flag="--resume")
    if meta["method"] != method:
        raise UsageError(f"--resume {meta['path']!r} is a {meta['method']!r} checkpoint, not --method {method!r}")


def cmd_eval(args) -> int:
    if getattr(args, "task", "classify") != "classify":
        return contrastive_cli.cmd_eval_retrieval(args)
    from leanclip.methods import is_closed_set
    from leanclip.trainer import evaluate

    device = setup_device(args)
    meta = read_checkpoint_meta(args.checkpoint)
    extra = meta.get("extra") or {}
    run_cfg = restore_inputs(args, meta)  # what `leanclip train` built the model from
    cross_dataset = restore_data(args, run_cfg.get("data"))
    model, tok, size, (mean, std) = build_model(args)
    data = load_data(args, size, mean, std, train_transform=False, need_train=False)
    from leanclip.methods import method_template_set

    if args.templates or args.template_set or cross_dataset:  # another dataset: its own template
        templates = _templates(args, data["dataset"], method_template_set(meta["method"]))
    else:
        templates = extra.get("templates") or _templates(args, data["dataset"])
    opts = meta.get("options") or {}
    train_names = opts.get("classnames") or extra.get("classnames") or data["classnames"]
    prepare_from_checkpoint(model, meta, tok, args.model, classnames=train_names)
    model.to(device)
    if is_closed_set(meta["method"]) and len(train_names) != len(data["classnames"]):
        raise UsageError(f"linear-probe checkpoint classifies {len(train_names)} classes; the evaluation set has "
                         f"{len(data['classnames'])} (a probe cannot evaluate new classes)")
    res = evaluate(model, data["eval"], data["classnames"], templates, tok, args.batch_size or 256, device=device,
                   precision=args.precision, num_workers=args.num_workers, progress=not args.no_progress)
    result = {"command": "eval", "method": meta["method"], "checkpoint": meta["path"], "dataset": data["dataset"],
              "cross_dataset": cross_dataset,
              "split": args.eval_split, "subsample": args.subsample, "classes": len(data["classnames"]),
              "skipped_images": len(data["bad_images"]), **res}
    emit(result, args, RESULT_FILES["eval"])
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
    emit(result, args, RESULT_FILES["zeroshot"])
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "zeroshot": cmd_zeroshot}
