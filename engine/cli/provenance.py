"""Run records and the one restore path of ``leanclip eval``.

A run records where its inputs came from (:func:`weights_record`, :func:`data_record`) in the checkpoint, and
``leanclip eval`` restores them (:func:`restore_weights`, :func:`restore_data`) with one rule: values (dataset name,
shots, seed, subsample, image size) are reused, paths are not. A recorded weights file is read again only when the
user asks for it (``--use-recorded-weights``) and its sha256 still matches; a recorded dataset must be named again on
the command line (``--data`` / ``--split-file``) and its split file must hash to the recorded value.
:func:`restore_inputs` + :func:`prepare_from_checkpoint` rebuild a run's model as it was trained."""
from __future__ import annotations

import os

from leanclip import utils
from leanclip.checkpoint import load_trainable
from leanclip.cli.usage import DEFAULT_MODEL, UsageError
from leanclip.options import option_fields, option_types, parse_value
from leanclip.registry import METHOD_OPTIONS, option_range
from leanclip.templates import canonical_dataset_name
from leanclip.weights import HF_HUB_PREFIX, LOCAL_DIR_PREFIX, recordable_source


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
