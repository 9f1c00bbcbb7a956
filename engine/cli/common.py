"""What the ``leanclip`` subcommands share (``leanclip.cli.classify``, ``leanclip.cli.contrastive``): checks, run
records, the model built from ``--model`` / ``--pretrained``, the device, checkpoint metadata, the one restore path of
``eval`` (``restore_inputs`` + ``prepare_from_checkpoint``) and result output. The subcommand modules import this one,
never each other's internals.

Everything here runs BEFORE any work or any write, so a rejected command leaves no trace:

- :func:`check_numbers` validates every numeric flag of the parsed namespace against one table (:data:`NUMBERS`),
  whichever subcommand defined it; NaN, infinities and out-of-range values name their flag.
- :func:`check_backend_env` rejects a ``LEANCLIP_BACKEND`` that is unknown or cannot run on the chosen device
  (otherwise it would fail only at the first fused op, after the model and data were built).
- :func:`check_output` refuses an ``--output`` that is not a writable directory, or that holds another run unless
  ``--resume`` or ``--overwrite`` is given.

Run records and ``eval``'s restore path (``weights_record``, ``restore_inputs``, ``prepare_from_checkpoint``, ...)
live in ``leanclip.cli.provenance``, ``UsageError`` / ``PROG`` / ``DEFAULT_MODEL`` in ``leanclip.cli.usage``; both
are re-exported here.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from leanclip import utils, weights
from leanclip.checkpoint import verify as verify_checkpoint
from leanclip.budget import resolve_budget
from leanclip.cli.provenance import (
    DATA_DEFAULTS, data_record, method_opts_from_flags, prepare_from_checkpoint, recorded_frozen_dtype,
    restore_data, restore_inputs, restore_model, restore_weights, run_provenance, run_record, split_file_of,
    template_override, weights_record,
)
from leanclip.cli.usage import DEFAULT_MODEL, EXIT_USAGE, PROG, UsageError
from leanclip.configs import register_tiny_config
from leanclip.data import clip_transform
from leanclip.feature_cache import active_cache as active_feature_cache
from leanclip.models import transformers as hf
from leanclip.pretrain import pretrain_contrastive
from leanclip.run_files import CHECKPOINT_NAME, RUN_DIRS, RUN_FILES
from leanclip.synthetic import cache_dir, make_caption_corpus, private_dir

# What the subcommands import from here, the run records of leanclip.cli.provenance and the usage basics of
# leanclip.cli.usage included (re-exported: one import line per subcommand).
__all__ = [
    "DATA_DEFAULTS", "DEFAULT_MODEL", "EXIT_USAGE", "LR_MAX", "NUMBERS", "PROG", "SEED_MAX", "SMOKE_PRETRAIN_STEPS",
    "build_model", "build_recorded_model", "build_transformers_model", "check_backend_env", "check_numbers",
    "check_output", "check_recompute_flags", "checkpoint_classnames", "clear_run", "data_record",
    "default_pretrain_steps", "emit", "eval_model", "init_from_path", "method_opts_from_flags",
    "prepare_from_checkpoint", "pretrain_synthetic", "read_checkpoint_meta", "recompute_kwargs",
    "recorded_frozen_dtype", "resolve_pretrain_steps", "restore_data", "restore_inputs", "restore_model",
    "restore_weights", "run_folder", "run_provenance", "run_record", "setup_device", "split_file_of",
    "stop_together", "synthetic_pretrained_weights", "template_override", "UsageError", "weights_record",
]

# dest -> (flag, kind, lowest, highest), from the library's one table of ranges (leanclip.utils.NUMBER_RANGES, which
# the API's configs check too): every flag is its destination with dashes. Bounds are inclusive; None = unbounded.
LR_MAX, SEED_MAX = utils.LR_MAX, utils.SEED_MAX
NUMBERS: dict[str, tuple[str, type, float | None, float | None]] = {
    dest: ("--" + dest.replace("_", "-"), *row) for dest, row in utils.NUMBER_RANGES.items()}


def check_numbers(args) -> None:
    """Raise :class:`UsageError` naming the first numeric flag of ``args`` that is out of range (None = not given)."""
    for dest, (flag, *_) in NUMBERS.items():
        v = getattr(args, dest, None)
        if v is None:
            continue
        try:
            utils.check_number(dest, v, label=flag)
        except ValueError as e:
            raise UsageError(str(e)) from None


def check_recompute_flags(args) -> None:
    """``--recompute-chunk`` splits the ``block`` policy's work; with any other policy it would do nothing.
    ``--memory-budget`` chooses the policy and the chunk itself, and needs the lean modules."""
    budget = getattr(args, "memory_budget", None)
    if budget is not None:
        if args.recompute != "none" or args.recompute_chunk is not None:
            raise UsageError("--memory-budget chooses the recompute policy and chunk itself; drop --recompute and "
                             "--recompute-chunk")
        if args.no_lean:
            raise UsageError("--memory-budget plans the lean modules' recompute; it cannot go with --no-lean")
        try:
            resolve_budget(budget, 1, "--memory-budget")
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.recompute_chunk is not None and args.recompute != "block":
        raise UsageError(f"--recompute-chunk runs a block's forward and backward over chunks of samples; it needs "
                         f"--recompute block, got --recompute {args.recompute}")


def recompute_kwargs(args, batch_size: int, text_batch_size: int | None = None, tokenizer=None) -> dict:
    """``prepare``'s recompute arguments from the flags: a policy (and chunk), or a budget to plan for. The plan's
    text length is the tokenizer's context (a Hugging Face text tower's own context, ``max_position_embeddings``,
    is often far longer than what open_clip's tokenizer feeds it: 514 against 77 for RoBERTa)."""
    if getattr(args, "memory_budget", None) is not None:
        return {"recompute": "auto", "memory_budget": args.memory_budget, "batch_size": batch_size,
                "text_batch_size": text_batch_size, "text_len": getattr(tokenizer, "context_length", None)}
    return {"recompute": args.recompute, "recompute_chunk": args.recompute_chunk}


def check_backend_env(device) -> None:
    """``LEANCLIP_BACKEND`` must name a backend that runs on ``device`` (a torch.device)."""
    from leanclip import kernels

    wanted = os.environ.get("LEANCLIP_BACKEND") or None
    if wanted is None or wanted == "auto":
        return
    if wanted not in kernels.BACKENDS:
        raise UsageError(f"LEANCLIP_BACKEND={wanted!r}: must be one of {', '.join(kernels.BACKENDS)} or auto")
    problem = kernels.backend_problem(wanted, device)
    if problem:
        raise UsageError(f"LEANCLIP_BACKEND={wanted}: cannot run on {device.type}: {problem}")


# ------------------------------------------------------------------------------------------------------ run folder


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def run_folder(args, default: str) -> str:
    """``--output`` for a training command: as given, else the folder ``--resume`` names (a run continues where it
    lives), else ``default``; then :func:`check_output`."""
    if args.resume is not None and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: --resume continues the run in --output, "
                         "--overwrite deletes it")
    if args.output is None:
        if args.resume is not None:
            resume = Path(args.resume)
            args.output = str(resume if resume.is_dir() else resume.parent)
        else:
            args.output = default
    check_output(args.output, resume=args.resume, overwrite=args.overwrite)
    return args.output


def check_output(output, *, resume, overwrite: bool) -> None:
    """``--output`` must be (or be creatable as) a writable directory; a folder that already holds a run needs
    ``--resume`` (continue it) or ``--overwrite`` (replace it)."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {str(out)!r} exists and is not a directory")
    base = _nearest_existing(out)
    if not base.is_dir():
        raise UsageError(f"--output {str(out)!r}: {str(base)!r} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"--output {str(out)!r}: {str(base)!r} is not writable")
    try:  # what access() cannot tell (a root user on /proc, a read-only mount): a folder made and removed at once
        import tempfile

        os.rmdir(tempfile.mkdtemp(prefix=".leanclip-probe-", dir=base))
    except OSError as e:
        raise UsageError(f"--output {str(out)!r}: cannot create folders under {str(base)!r} ({e.strerror})") from e
    held = [n for n in RUN_FILES if (out / n).exists()]
    if held and resume is None and not overwrite:
        raise UsageError(f"--output {str(out)!r} already holds a run ({', '.join(held)}): pass --resume "
                         f"{str(out)!r} to continue it or --overwrite to replace it")


def clear_run(output) -> None:
    """Remove a previous run's files from ``output`` (``--overwrite``), so nothing of it can be mistaken for the new
    run's if this one stops early."""
    out = Path(output)
    for n in RUN_FILES:
        (out / n).unlink(missing_ok=True)
    for n in RUN_DIRS:
        if (out / n).is_dir():
            shutil.rmtree(out / n)


# ----------------------------------------------------------------------------------------------------- model, device
def build_model(args):
    """(model, tokenizer, image_size, transform mean/std) for --model / --pretrained / --image-size: built and loaded
    by ``leanclip.weights.create_model`` (tags, hub ids, folders, files; no file may run code)."""
    import open_clip

    register_tiny_config()
    if hf.is_name(args.model):
        return build_transformers_model(args)
    schema = args.model.startswith((weights.HF_HUB_PREFIX, weights.LOCAL_DIR_PREFIX))
    if not schema and args.model not in open_clip.list_models():
        raise UsageError(f"--model: unknown open_clip config {args.model!r} (see open_clip.list_models(), or use "
                         f"hf-hub:ORG/REPO / local-dir:DIR)")
    if schema and args.pretrained is not None:
        raise UsageError(f"--pretrained: --model {args.model} carries its own weights; drop --pretrained")
    steps = resolve_pretrain_steps(args)
    # the synthetic pre-training of a random init is made once per user and loaded from the cache; on top of named
    # weights (or a model carrying its own) it runs here
    cached = bool(steps) and args.pretrained is None and not schema
    source = synthetic_pretrained_weights(None, args.model, steps, image_size=args.image_size,
                                          progress=not args.no_progress) if cached else args.pretrained
    # seeded: random-init weights (no --pretrained) are then the same in train / eval / zeroshot
    model = weights.create_model(args.model, source, seed=0, image_size=args.image_size,
                                 trust_torchscript=getattr(args, "trust_torchscript", False))
    tokenizer = open_clip.get_tokenizer(args.model)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    pp = getattr(model.visual, "preprocess_cfg", None) or {}
    if steps and not cached:
        pretrain_synthetic(model, tokenizer, steps, size, seed=0, progress=not args.no_progress)
    return model, tokenizer, size, (tuple(pp.get("mean", ())) or None, tuple(pp.get("std", ())) or None)


def build_transformers_model(args):
    """:func:`build_model` for ``--model transformers:<id>``: the id is the weights, so ``--pretrained`` is refused;
    ``--image-size`` may only restate the model's own; ``--pretrain-steps`` runs on top of the weights as for any
    model carrying its own."""
    if args.pretrained is not None:
        raise UsageError(f"--pretrained: --model {args.model} carries its own weights (the Hugging Face id is the "
                         f"weights); drop --pretrained")
    steps = resolve_pretrain_steps(args)
    model = weights.create_model(args.model, None, image_size=args.image_size)
    tokenizer = hf.get_tokenizer(model)
    size = model.visual.image_size
    if steps:
        pretrain_synthetic(model, tokenizer, steps, size, seed=0, progress=not args.no_progress)
    pp = model.visual.preprocess_cfg
    return model, tokenizer, size, (tuple(pp["mean"]), tuple(pp["std"]))


# Smoke runs (synthetic data, the default tiny model, no --pretrained) start from this many steps of synthetic
# contrastive pre-training instead of a random init, so that their accuracies are far above chance and tell a working
# pipeline from a broken one. 40 steps: the tests' weights; about 10 s on one CPU core, once per user (cached).
SMOKE_PRETRAIN_STEPS = 40


def default_pretrain_steps(model: str, pretrained, synthetic_data: bool, task: str = "classify") -> int:
    """``--pretrain-steps`` when it is not given: :data:`SMOKE_PRETRAIN_STEPS` for a classification smoke run
    (synthetic data, ``model`` the default tiny one, no weights), else 0 (``model`` as it is built)."""
    smoke = synthetic_data and pretrained is None and model == DEFAULT_MODEL and task == "classify"
    return SMOKE_PRETRAIN_STEPS if smoke else 0


def resolve_pretrain_steps(args) -> int:
    """``args.pretrain_steps``: as given (or as ``eval`` restored it from a checkpoint), else
    :func:`default_pretrain_steps` of the command's model, weights and data. Stored back in ``args``: a run records
    the number it was built with, so ``eval`` rebuilds the same model whatever the defaults are then."""
    if getattr(args, "pretrain_steps", None) is None:
        synthetic_data = not (getattr(args, "data", None) or getattr(args, "split_file", None))
        args.pretrain_steps = default_pretrain_steps(args.model, args.pretrained, synthetic_data,
                                                     getattr(args, "task", "classify"))
    return args.pretrain_steps


def pretrain_synthetic(model, tokenizer, steps: int, image_size: int, *, seed: int = 0, n_images: int = 2000,
                       batch_size: int = 64, lr: float = 3e-3, progress: bool = False) -> list[float]:
    """Contrastive pre-training on a synthetic caption corpus (leanclip.synthetic + leanclip.contrastive): gives a tiny,
    randomly initialised model above-chance zero-shot accuracy for smoke runs and tests. Returns the losses."""
    imgs, caps = make_caption_corpus(n_images, size=image_size, seed=seed)
    tf = clip_transform(image_size)
    x = torch.stack([tf(im) for im in imgs])
    return pretrain_contrastive(model, x, caps, tokenizer, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                progress=progress)


def synthetic_pretrained_weights(folder=None, model_name: str = DEFAULT_MODEL, steps: int = SMOKE_PRETRAIN_STEPS, *,
                                 seed: int = 0, image_size: int | None = None, progress: bool = False) -> str:
    """Path of a safetensors state dict of ``model_name`` as :func:`build_model` makes it without weights (seeded
    random init at ``image_size``) after :func:`pretrain_synthetic` for ``steps`` steps: made once and kept in
    ``folder`` (default: ``synthetic-weights`` in leanclip's private per-user cache, next to the synthetic data),
    keyed by the config, the versions and the code that makes it, written atomically. Made on one CPU thread, so
    the file does not depend on the caller's thread count. For smoke runs (the default weights of synthetic runs),
    tests and demos (``--pretrained PATH``)."""
    import hashlib
    import inspect
    import warnings

    import open_clip
    from safetensors.torch import save_file

    register_tiny_config()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise UsageError(f"unknown open_clip config {model_name!r}")
    key = hashlib.sha256(json.dumps([2, model_name, cfg, steps, seed, image_size, torch.__version__,
                                     open_clip.__version__, inspect.getsource(pretrain_contrastive),
                                     inspect.getsource(pretrain_synthetic)], sort_keys=True,
                                    default=str).encode()).hexdigest()[:16]
    if folder is None:
        folder = private_dir(os.path.join(cache_dir(), "synthetic-weights"), "synthetic-weights cache")
    path = Path(folder) / f"{model_name.replace('/', '-')}-synthetic{steps}-{key}.safetensors"
    if path.is_file():
        return str(path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = weights.create_model(model_name, None, seed=0, image_size=image_size)
        size = model.visual.image_size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pretrain_synthetic(model, open_clip.get_tokenizer(model_name), steps,
                               size[0] if isinstance(size, (tuple, list)) else int(size), seed=seed, progress=progress)
    finally:
        torch.set_num_threads(threads)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    utils.atomic_write(path, lambda tmp: save_file(state, tmp))
    return str(path)


def setup_device(args):
    """``--threads`` and ``--device`` applied; ``LEANCLIP_BACKEND`` checked against the device and
    ``LEANCLIP_FEATURE_CACHE`` for a private folder. Returns the device."""
    if args.threads is not None:  # its range: check_numbers
        import torch

        torch.set_num_threads(args.threads)
    device = utils.resolve_device(args.device)
    check_backend_env(device)
    active_feature_cache()  # $LEANCLIP_FEATURE_CACHE must name a private folder: refused before any work
    return device


def stop_together(info, error: BaseException) -> None:
    """Under torchrun, a user error raised before the ranks agreed on their inputs
    (``leanclip.distributed.inputs_checked``): every rank learns of it and raises one, each printing the same line.
    Nothing otherwise: the caller re-raises ``error``."""
    from leanclip import distributed
    from leanclip.cli import USER_ERRORS, one_line

    if isinstance(error, USER_ERRORS):
        distributed.inputs_checked(info, error=error, describe=one_line)


def emit(result: dict, args, name: str) -> None:
    """Print ``result`` as one JSON line and write it as ``name`` under ``--output`` when given."""
    if getattr(args, "output", None):
        utils.atomic_write_json(Path(args.output) / name, result)
    print(utils.to_json(result, indent=None))


def read_checkpoint_meta(path, *, flag: str = "--checkpoint") -> dict:
    """Metadata of a ``leanclip.checkpoint.save_trainable`` file without a model: method, options (dict), model_name,
    extra (the trainer's dict); the file's payload is checked against its recorded sha256 first."""
    from safetensors import safe_open

    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise FileNotFoundError(f"{flag}: no such file {str(p)!r}")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:
        raise UsageError(f"{flag}: {str(p)!r} is not a safetensors checkpoint ({e})") from e
    if "method" not in meta:
        raise UsageError(f"{flag}: {str(p)!r} is not a leanclip checkpoint")
    verify_checkpoint(p)  # a damaged file is refused before any work, not found once the model is built
    out = {"path": str(p), "method": meta["method"]}
    for k in ("options", "model_name", "extra"):
        try:
            out[k] = json.loads(meta.get(k, "null"))
        except json.JSONDecodeError:
            out[k] = None
    return out


def init_from_path(run) -> str | None:
    """``--init-from``: the absolute path of a leanclip checkpoint (file or run folder), checked before any work;
    ``prepare`` checks that it belongs to this architecture. Any task's run may start from any task's checkpoint
    (LN tuned on a classification task as the initialisation of a contrastive alignment, and back)."""
    if run is None:
        return None
    return os.path.abspath(read_checkpoint_meta(run, flag="--init-from")["path"])


def build_recorded_model(args, meta: dict):
    """``build_model`` for the architecture and starting weights a checkpoint records, under the rules of
    ``leanclip eval`` (:func:`restore_inputs`). ``args`` needs model, pretrained, use_recorded_weights, image_size,
    pretrain_steps, trust_torchscript and no_progress."""
    restore_inputs(args, meta)
    return build_model(args)


def checkpoint_classnames(meta: dict | None, classnames: list[str]) -> list[str] | None:
    """The class names a checkpoint's method was prepared with (None without a checkpoint); a closed-set head
    (linear probe) must cover ``classnames``, the classes the command scores. Before any work."""
    if meta is None:
        return None
    from leanclip.methods import is_closed_set

    train_names = (meta.get("options") or {}).get("classnames") or (meta.get("extra") or {}).get("classnames") \
        or classnames
    if is_closed_set(meta["method"]) and len(train_names) != len(classnames):
        raise UsageError(f"--checkpoint: a {meta['method']} run classifies its {len(train_names)} training classes; "
                         f"the split has {len(classnames)}")
    return list(train_names)


def eval_model(args, meta: dict | None, train_names: list[str] | None):
    """(model, tokenizer, image size, (mean, std)) an evaluation command scores: the checkpoint's model, rebuilt
    through ``eval``'s one restore path (:func:`prepare_from_checkpoint`: the method re-applied with the recorded
    options, the ``--init-from`` weights it started from, its trained parameters), else the plain ``--model`` /
    ``--pretrained`` model."""
    if meta is None:
        return build_model(args)
    model, tok, size, norm = build_recorded_model(args, meta)
    prepare_from_checkpoint(model, meta, tok, args.model, classnames=train_names)
    return model, tok, size, norm
