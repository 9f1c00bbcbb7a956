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

A run records where its inputs came from (:func:`weights_record`, :func:`data_record`) in the checkpoint, and
``leanclip eval`` restores them (:func:`restore_weights`, :func:`restore_data`) with one rule: values (dataset name,
shots, seed, subsample, image size) are reused, paths are not. A recorded weights file is read again only when the
user asks for it (``--use-recorded-weights``) and its sha256 still matches; a recorded dataset must be named again on
the command line (``--data`` / ``--split-file``) and its split file must hash to the recorded value.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from leanclip import utils, weights
from leanclip.checkpoint import load_trainable
from leanclip.checkpoint import verify as verify_checkpoint
from leanclip.budget import resolve_budget
from leanclip.configs import register_tiny_config
from leanclip.data import clip_transform
from leanclip.feature_cache import active_cache as active_feature_cache
from leanclip.models import transformers as hf
from leanclip.pretrain import pretrain_contrastive
from leanclip.options import option_fields, option_types, parse_value
from leanclip.registry import METHOD_OPTIONS, method_options, option_range
from leanclip.run_files import CHECKPOINT_NAME, RUN_DIRS, RUN_FILES
from leanclip.synthetic import cache_dir, make_caption_corpus, private_dir
from leanclip.templates import canonical_dataset_name
from leanclip.weights import HF_HUB_PREFIX, LOCAL_DIR_PREFIX, recordable_source

DEFAULT_MODEL = "leanclip-tiny"


PROG = "leanclip"
EXIT_USAGE = 2


class UsageError(ValueError):
    """Bad command-line input: one line on stderr, exit code 2."""


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


def recompute_kwargs(args, batch_size: int, text_batch_size: int | None = None) -> dict:
    """``prepare``'s recompute arguments from the flags: a policy (and chunk), or a budget to plan for."""
    if getattr(args, "memory_budget", None) is not None:
        return {"recompute": "auto", "memory_budget": args.memory_budget, "batch_size": batch_size,
                "text_batch_size": text_batch_size}
    return {"recompute": args.recompute, "recompute_chunk": args.recompute_chunk}


def check_backend_env(device) -> None:
    """``LEANCLIP_BACKEND`` must name a backend that runs on ``device`` (a torch.device)."""
    from leanclip.kernels import _backend

    wanted = os.environ.get("LEANCLIP_BACKEND") or None
    if wanted is None or wanted == "auto":
        return
    if wanted not in _backend.BACKENDS:
        raise UsageError(f"LEANCLIP_BACKEND={wanted!r}: must be one of {', '.join(_backend.BACKENDS)} or auto")
    problem = _backend.backend_problem(wanted, device)
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


# ----------------------------------------------------------------------------------------------------- provenance
def _is_local_file(source) -> bool:
    return isinstance(source, str) and os.path.isfile(source)


def weights_record(pretrained, model_name: str | None = None) -> dict | None:
    """What a checkpoint records of ``--pretrained``: a local file by absolute path and sha256, a hub folder by
    absolute path, a name (pretrained tag of ``model_name``, ``hf-hub:`` id) as given."""
    if pretrained is None:
        return None
    if _is_local_file(pretrained):
        path = os.path.abspath(pretrained)
        return {"source": path, "sha256": utils.sha256_file(path)}
    return {"source": recordable_source(pretrained, model_name), "sha256": None}


def restore_model(args, saved_model: str | None, default_model: str) -> None:
    """``eval`` rebuilds the checkpoint's architecture when ``--model`` is not given; a ``local-dir:`` model is a path,
    so it must be named again."""
    if not saved_model or args.model != default_model or saved_model == default_model:
        return
    if saved_model.startswith(LOCAL_DIR_PREFIX):
        raise UsageError(f"the checkpoint was trained on --model {saved_model!r}: pass --model explicitly (eval "
                         f"never reads a path from a checkpoint on its own)")
    args.model = saved_model


def restore_weights(args, recorded: dict | None) -> None:
    """Set ``args.pretrained`` for ``eval`` from the checkpoint's record, under the rule of the module docstring."""
    if args.pretrained is not None:
        return
    if not recorded or not recorded.get("source"):
        if getattr(args, "use_recorded_weights", False):
            raise UsageError("--use-recorded-weights: the checkpoint records no weights (it started from the "
                             "seeded initialisation of its model and the synthetic pre-training steps it records, "
                             "rebuilt without the flag)")
        return
    source = recorded["source"]
    if not getattr(args, "use_recorded_weights", False):
        raise UsageError(f"the checkpoint was trained from weights {source!r}: pass --pretrained {source!r} (or "
                         f"--use-recorded-weights to read the recorded source after a hash check)")
    if not isinstance(source, str) or not (_hashed_file(source, recorded.get("sha256"))
                                           or _named_weights(source, args.model)):
        raise UsageError(f"--use-recorded-weights: the checkpoint records {source!r}, which is neither a file with "
                         f"its sha256 nor an hf-hub: id or pretrained tag of --model {args.model}; pass --pretrained "
                         f"explicitly")
    args.pretrained = source


def run_provenance(args, weights: dict | None, **task) -> dict:
    """What a training command records of how its model was built (the config's ``extra``, so the checkpoint holds
    it at ``extra.config.extra``): ``--model``, the ``weights_record`` of ``--pretrained``, ``--pretrain-steps``,
    ``--image-size``, and the task's own inputs (``task``: the dataset record, the pair file...)."""
    return {"model_name": args.model, "weights": weights, "pretrain_steps": args.pretrain_steps,
            "image_size": args.image_size, **task}


def run_record(meta: dict) -> dict:
    """A checkpoint's :func:`run_provenance` (``{}`` for a checkpoint written by the library API without one)."""
    return (((meta.get("extra") or {}).get("config") or {}).get("extra")) or {}


def restore_inputs(args, meta: dict) -> dict:
    """What ``eval`` takes from the run a checkpoint belongs to when the flag is not given: the architecture, the
    weights (under the rule of the module docstring), the synthetic pre-training steps and the image size. Returns
    the run's record (:func:`run_record`). Weights recorded in another shape than ``weights_record``'s are refused,
    not guessed at."""
    record = run_record(meta)
    if args.pretrained is None and "pretrained" in record and "weights" not in record:
        raise UsageError(f"--checkpoint {meta.get('path')!r} records its weights as 'pretrained', a form this "
                         f"version does not read: pass --pretrained explicitly")
    restore_model(args, meta.get("model_name"), DEFAULT_MODEL)
    restore_weights(args, record.get("weights"))
    if args.pretrain_steps is None:  # the recorded number (0 for a run that records none), never the default
        args.pretrain_steps = int(record.get("pretrain_steps") or 0)
    if args.image_size is None and record.get("image_size"):
        args.image_size = int(record["image_size"])
    return record


def prepare_from_checkpoint(model, meta: dict, tokenizer, model_name: str, *, classnames=None, load: bool = True) -> None:
    """Re-apply the checkpoint's method with the options it recorded (its ``init_from`` weights too), then load its
    trainable parameters: the one restore path of ``eval`` for every task. ``load=False`` stops before the load: the
    model as the run started (what a method's loss terms take as their reference, e.g. CLIPFit's teacher)."""
    from leanclip.methods import PREPARE_OPTIONS, method_options, parse_method, prepare

    opts = dict(meta.get("options") or {})
    accepted = {k for p in parse_method(meta["method"]) for k in method_options(p)}
    method_opts = {k: v for k, v in opts.items() if k in accepted and k not in PREPARE_OPTIONS}
    init_from = opts.get("init_from")
    if init_from is not None and not os.path.isfile(init_from):
        raise UsageError(f"--checkpoint {meta['path']!r} was trained from --init-from {init_from!r}, which is gone: "
                         f"its frozen initial weights are needed to evaluate it")
    lean = None if opts.get("lean_towers") else bool(opts.get("lean", True))  # one tower lean: as prepare chose
    prepare(model, meta["method"], lean=lean, tower=opts.get("tower", "both"),
            classnames=classnames, tokenizer=tokenizer, model_name=model_name, init_from=init_from,
            frozen_dtype=recorded_frozen_dtype(opts), **method_opts)
    if load:
        load_trainable(model, meta["path"])


def _hashed_file(source: str, sha256) -> bool:
    """An absolute path recorded with its hash: True when the file still has it (UsageError when it changed)."""
    if not (isinstance(sha256, str) and os.path.isabs(source)):
        return False
    if not os.path.isfile(source):
        raise UsageError(f"--use-recorded-weights: the recorded weights {source!r} no longer exist")
    if utils.sha256_file(source) != sha256:
        raise UsageError(f"--use-recorded-weights: {source!r} changed since training (sha256 differs); pass "
                         f"--pretrained explicitly")
    return True


def _named_weights(source: str, model_name: str) -> bool:
    """An ``hf-hub:`` id or a pretrained tag of ``model_name``: resolved by open_clip, never a local path."""
    if source.startswith(HF_HUB_PREFIX):
        repo = source[len(HF_HUB_PREFIX):]
        return "/" in repo and ".." not in repo and not os.path.isabs(repo)
    if model_name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
        return False
    from leanclip.models.openclip import is_pretrained_cfg

    return bool(is_pretrained_cfg(model_name.replace("/", "-"), source))


def method_opts_from_flags(parts: list[str], pairs) -> dict:
    """``--opt KEY=VALUE`` (repeatable) -> keyword options for ``prepare``: each key must be an option one of the
    method's components declares in its options dataclass (``leanclip.registry.METHOD_OPTIONS``) and that the
    command line does not set itself (``set_by``: ``--tower``, the class names...); each value is read with that
    field's type (``leanclip.options.parse_value``: int, float, true/false, a choice, a comma-separated list,
    ``none`` where None is allowed) and must lie in the range every component declaring it gives
    (``leanclip.registry.OptionRange``): all before the model is built."""
    declared, set_elsewhere = {}, {}
    for p in parts:
        types = option_types(METHOD_OPTIONS[p])
        for key, f in option_fields(METHOD_OPTIONS[p]).items():
            if f.metadata.get("set_by"):
                set_elsewhere.setdefault(key, f.metadata["set_by"])
            else:
                declared.setdefault(key, types[key])
    out = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"--opt {pair!r}: expected KEY=VALUE")
        if key in set_elsewhere and key not in declared:
            raise UsageError(f"--opt {pair!r}: {key} is set by {set_elsewhere[key]}, not by --opt")
        if key not in declared:
            raise UsageError(f"--opt {pair!r}: method {'+'.join(parts)!r} has no option {key!r} (options: "
                             f"{', '.join(sorted(declared)) or 'none'})")
        try:
            out[key] = parse_value(declared[key], raw.strip())
        except ValueError as e:
            raise UsageError(f"--opt {pair!r}: {e} for {key}") from None
        for p in parts:
            r = option_range(p, key)
            if r is not None and not r.admits(out[key]):
                raise UsageError(f"--opt {pair!r}: {key} of method {p!r} must be {r}")
    return out


def recorded_frozen_dtype(options: dict):
    """The ``frozen_dtype`` a checkpoint's options record, as a torch dtype (None when absent); checkpoint metadata
    is untrusted, so the name is matched against the dtypes ``prepare`` accepts, never looked up in torch."""
    from leanclip.methods import FROZEN_DTYPES

    name = (options or {}).get("frozen_dtype")
    if name is None:
        return None
    by_name = {str(d).removeprefix("torch."): d for d in FROZEN_DTYPES}
    if name not in by_name:
        raise UsageError(f"--checkpoint: recorded frozen_dtype {name!r} is not one of {', '.join(by_name)}")
    return by_name[name]


def split_file_of(args) -> str | None:
    """The split JSON a classification command reads (None for synthetic data and folder-listed datasets)."""
    if getattr(args, "split_file", None):
        return args.split_file
    if getattr(args, "data", None) and getattr(args, "dataset", None):
        from leanclip.data import find_split_file

        try:
            return find_split_file(args.data, args.dataset)[0]
        except FileNotFoundError:
            return None
    return None


def data_record(args, dataset: str) -> dict:
    """What a classification checkpoint records of its data: the source kind and name, the split file's hash, the
    K-shot protocol and the synthetic settings. No path is reused by ``eval`` (see :func:`restore_data`)."""
    split = split_file_of(args)
    source = "data" if args.data else ("split-file" if args.split_file else "synthetic")
    return {"source": source, "dataset": dataset, "split_sha256": utils.sha256_file(split) if split else None,
            "shots": args.shots, "seed": args.seed, "subsample": args.subsample,
            "synthetic_classes": args.synthetic_classes if source == "synthetic" else None}


# the data flags' defaults (leanclip.cli's parser); eval's parser sets them to None so that the checkpoint's record
# fills the ones the user did not give, and these the rest
DATA_DEFAULTS = {"shots": 16, "seed": 1, "subsample": "all", "synthetic_classes": 10}


def template_override(args):
    """``--templates``: one template (or a named set) as a string, several as a list, or None."""
    return args.templates[0] if args.templates and len(args.templates) == 1 else args.templates


def restore_data(args, recorded: dict | None) -> bool:
    """Fill ``eval``'s unset data flags from the checkpoint; a real dataset must be named on the command line, and
    when it is the dataset the run was trained on, its split file must be the one the run used. Returns whether the
    evaluation is on another dataset than the training one (the cross-dataset protocol)."""
    recorded = recorded or {}
    for k, default in DATA_DEFAULTS.items():
        if getattr(args, k, None) is None:
            setattr(args, k, recorded.get(k) if recorded.get(k) is not None else default)
    given = bool(args.data or args.split_file or getattr(args, "synthetic", False))
    source = recorded.get("source")
    if source in ("data", "split-file") and not given:
        how = "--data ROOT --dataset " + str(recorded.get("dataset")) if source == "data" else "--split-file FILE"
        what = f"dataset {recorded['dataset']!r}" if recorded.get("dataset") else "a split file"
        raise UsageError(f"the checkpoint was trained on {what}: pass {how} (eval never falls back to synthetic "
                         f"data for it)")
    if args.data and not args.dataset and source == "data":
        args.dataset = recorded.get("dataset")
    other = bool(args.data and source == "data" and recorded.get("dataset")
                 and _dataset_key(args.dataset) != _dataset_key(recorded["dataset"]))
    want = recorded.get("split_sha256")
    if want and given and source in ("data", "split-file") and not other:
        split = split_file_of(args)
        if split and utils.sha256_file(split) != want:
            raise UsageError(f"split file {split!r} differs from the one the checkpoint was trained with "
                             f"(sha256 mismatch): evaluate on the same split")
    return other


def _dataset_key(name) -> str:
    """A dataset name as the data layer's aliases compare it (``oxford_pets`` == ``OxfordPets``)."""
    try:
        return canonical_dataset_name(str(name))
    except KeyError:
        return str(name)


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
    from leanclip.cli import USER_ERRORS, _one_line

    if isinstance(error, USER_ERRORS):
        distributed.inputs_checked(info, error=error, describe=_one_line)


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
