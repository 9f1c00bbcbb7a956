"""``leanclip export RUN --output model.safetensors``: a run's model as one plain state dict.

The run's method is re-applied to the weights it started from and its trained parameters are loaded (``eval``'s one
restore path), then ``leanclip.merge`` folds them into the model's own weights: open_clip's plain modules (or the
``transformers`` model) with the run's outputs, loadable with ``model.load_state_dict(safetensors.torch.load_file(...))``
by code that knows nothing of leanclip. Methods that add modules a plain model has no place for are refused before
any work.
"""
from __future__ import annotations

from pathlib import Path

from leanclip import utils
from leanclip.cli.common import UsageError, build_recorded_model, emit, prepare_from_checkpoint, read_checkpoint_meta
from leanclip.cli.episodes import add_model_arguments


def add_arguments(p) -> None:
    p.description = ("Fold a run's trained parameters into its model and write one plain state dict (safetensors): "
                     "methods that train the model's own weights (ln, bitfit, clipfit, full) or a weight delta "
                     "(lora). Prints JSON.")
    p.add_argument("run", metavar="RUN", help="a run folder or checkpoint of 'leanclip train'")
    p.add_argument("--output", metavar="FILE", required=True, help="the .safetensors file to write")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_arguments(p)
    p.set_defaults(templates=None, template_set=None, trust_torchscript=False)


def _check_output(path: str) -> Path:
    out = Path(path)
    if out.suffix != ".safetensors":
        raise UsageError(f"--output {path!r}: the file must end in .safetensors")
    if out.is_dir():
        raise UsageError(f"--output {path!r} is a folder; give a file name")
    if not out.parent.resolve().is_dir():
        raise UsageError(f"--output {path!r}: the folder {str(out.parent)!r} does not exist")
    return out


def _check_mergeable(meta: dict) -> None:
    from leanclip.registry import METHOD_TRAITS, parse_method

    kept = [p for p in parse_method(meta["method"]) if not METHOD_TRAITS[p].mergeable]
    if kept:
        raise UsageError(f"{meta['path']}: method {meta['method']!r}: {', '.join(kept)} adds modules a plain model "
                         f"has no place for; its checkpoint is the export (leanclip eval --checkpoint)")


def run(args) -> int:
    from safetensors.torch import save_model

    from leanclip.methods import merge

    if args.checkpoint is not None:
        raise UsageError("leanclip export takes the run as its argument, not --checkpoint")
    out = _check_output(args.output)
    meta = read_checkpoint_meta(args.run)
    _check_mergeable(meta)
    args.checkpoint = args.run
    model, tok, _, _ = build_recorded_model(args, meta)
    prepare_from_checkpoint(model, meta, tok, args.model)
    plain = merge(model)
    metadata = {"leanclip_method": meta["method"], "leanclip_run": str(meta["path"]),
                "model": str(args.model)}
    utils.atomic_write(out, lambda tmp: save_model(plain, tmp, metadata=metadata))
    n = sum(t.numel() for t in plain.state_dict().values())
    emit({"output": str(out), "method": meta["method"], "model": args.model, "model_class": type(plain).__name__,
          "tensors": len(plain.state_dict()), "numbers": n}, None, "export.json")
    return 0
