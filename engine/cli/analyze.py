"""``leanclip analyze RUN_A [RUN_B]``: how far fine-tuning moved each parameter (LilT's LayerNorm-shift analysis,
CLIPFit's parameter-change analysis).

    leanclip analyze runs/ln_pets                      # the run against the weights it started from
    leanclip analyze runs/ln_pets runs/ln_dtd          # two runs of the same architecture, parameters in common
    leanclip analyze runs/a runs/b --output runs/a_vs_b   # also analysis.json and ln_change.png there
    leanclip analyze runs/clipfit --grad --output DIR     # squared gradients per group (leanclip.cli.analyze_runs)
    leanclip analyze runs/clipfit --tsne --output DIR     # t-SNE of test features, zero-shot vs tuned

A run is a run folder or its ``checkpoint.safetensors`` (trainable parameters only, ``leanclip.checkpoint``). With one
run the reference is its initial weights: the model and weights the run records, rebuilt as ``leanclip eval`` rebuilds
them (``--pretrained`` or ``--use-recorded-weights``, the recorded ``--pretrain-steps`` and ``--image-size``). A run
trained without ``--pretrained`` (a smoke run) records no weights: its start, the seeded init plus the synthetic
pre-training it records, is rebuilt with or without ``--use-recorded-weights``. LLU's maps are measured against
(I, 0), the identity their regulariser pulls them to (``leanclip.llu.identity_reference``); other modules a method
added (adapters, prompts, ...) have no pretrained value and are listed as not compared. A run initialised
from another run (``init_from``) is compared with that run by naming both.

What is measured, for every parameter both sides hold (``delta = after - before``, float64):

- per parameter: ``l1 = sum |delta|``, ``mean_abs = l1 / numel``, ``l2 = ||delta||``, ``rel_l2 = l2 / ||before||``;
- per group (CLIPFit's view): image / text LayerNorm, text ``mlp.c_proj.bias`` (CLIPFit's text side), other image /
  text biases, other image / text parameters, each module a method added, the rest;
- per tower, every LayerNorm (gamma = weight, beta = bias) with its position: ``pre`` (before block 0), the block
  index, ``post`` (after the last block); per block the mean |delta| of gamma and of beta over the block's
  LayerNorms, and the depth correlation of that change with the block index (Spearman: average ranks for ties;
  Pearson), over blocks only, null with fewer than 3 blocks or a constant series.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from leanclip import utils
from leanclip.checkpoint import read_trainable
from leanclip.cli import analyze_runs
from leanclip.cli.common import (
    DEFAULT_MODEL, UsageError, build_recorded_model, check_output, emit, read_checkpoint_meta, run_record,
)

__all__ = ["analyze_params", "pearson", "spearman", "layernorm_position", "param_group", "save_figure", "add_arguments",
           "run"]

JSON_NAME = "analysis.json"
PLOT_NAME = "ln_change.png"

# the leaf module name of a LayerNorm: open_clip's ln_pre / ln_1 / ln_2 / ln_post / ln_final (ln_attn, ln_inner),
# timm's norm / norm1 / fc_norm, Hugging Face's LayerNorm
_LN_LEAF = re.compile(r"^(?:ln(?:_\w+)?|norm\d*|fc_norm|\w*layer_?norm\w*)$", re.IGNORECASE)
_BLOCK = re.compile(r"(?:^|\.)(?:resblocks|blocks|layers?)\.(\d+)\.")
_PRE = re.compile(r"(?:^|_)pre$")


# ---------------------------------------------------------------------------------------------------- statistics
def pearson(x, y) -> float | None:
    """Pearson correlation in float64; None for fewer than 3 points or a constant series."""
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    if x.numel() != y.numel():
        raise ValueError(f"pearson: x and y differ in length ({x.numel()} vs {y.numel()})")
    if x.numel() < 3:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    return float((dx * dy).sum()) / den if den > 0 else None


def _ranks(v: torch.Tensor) -> torch.Tensor:
    """1-based ranks, ties given the mean of the ranks they span."""
    order = torch.argsort(v, stable=True)
    sv = v[order]
    ranks = torch.empty_like(v, dtype=torch.float64)
    i = 0
    while i < len(sv):
        j = i
        while j + 1 < len(sv) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y) -> float | None:
    """Spearman rank correlation (Pearson of the average ranks); None where :func:`pearson` is."""
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    if x.numel() != y.numel():
        raise ValueError(f"spearman: x and y differ in length ({x.numel()} vs {y.numel()})")
    return pearson(_ranks(x), _ranks(y)) if x.numel() >= 3 else None


# ---------------------------------------------------------------------------------------------------- naming
def layernorm_position(name: str) -> tuple[str, str] | None:
    """For a LayerNorm parameter name: ``(module name, "weight"|"bias")``; None for any other parameter."""
    module, _, leaf = name.rpartition(".")
    if leaf not in ("weight", "bias") or not module:
        return None
    return (module, leaf) if _LN_LEAF.match(module.rpartition(".")[2]) else None


def _depth(module: str) -> int | str:
    """Block index of a LayerNorm module, or "pre" / "post" for those outside the blocks."""
    m = _BLOCK.search(module + ".")
    if m:
        return int(m.group(1))
    return "pre" if _PRE.search(module.rpartition(".")[2]) else "post"


def param_group(name: str, added: set[str] = frozenset()) -> str:
    """The group of a parameter for the per-group summary (module docstring)."""
    from leanclip.select import BIAS_RE, CLIPFIT_TEXT_RE, tower_of

    top = name.split(".")[0]
    if top in added:
        return f"added: {top}"
    tower = tower_of(name)
    if tower is None:
        return "other"
    if layernorm_position(name):
        return f"{tower} LayerNorm"
    if CLIPFIT_TEXT_RE.match(name):
        return "text mlp.c_proj.bias"
    return f"{tower} bias" if BIAS_RE.search(name) else f"{tower} other"


# ---------------------------------------------------------------------------------------------------- analysis
def _param_stats(before: torch.Tensor, after: torch.Tensor) -> dict:
    a, b = before.detach().double().cpu(), after.detach().double().cpu()
    d = b - a
    l1 = float(d.abs().sum())
    norm_a = float(a.norm())
    l2 = float(d.norm())
    return {"numel": d.numel(), "l1": l1, "mean_abs": l1 / max(d.numel(), 1), "l2": l2,
            "rel_l2": l2 / norm_a if norm_a > 0 else None}


def _groups(stats: dict[str, dict], added: set[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name, s in stats.items():
        g = out.setdefault(param_group(name, added), {"tensors": 0, "numel": 0, "l1": 0.0, "l2_sq": 0.0})
        g["tensors"] += 1
        g["numel"] += s["numel"]
        g["l1"] += s["l1"]
        g["l2_sq"] += s["l2"] ** 2
    for g in out.values():
        g["mean_abs"] = g["l1"] / max(g["numel"], 1)
        g["l2"] = math.sqrt(g.pop("l2_sq"))
    return dict(sorted(out.items()))


def _layernorm_profile(stats: dict[str, dict], added: set[str]) -> dict[str, dict]:
    """Per tower: every LayerNorm (gamma / beta change), per-block means and the depth correlations."""
    from leanclip.select import tower_of

    towers: dict[str, dict] = {}
    for name, s in stats.items():
        pos = layernorm_position(name)
        tower = tower_of(name)
        if pos is None or tower is None or name.split(".")[0] in added:
            continue
        module, leaf = pos
        layers = towers.setdefault(tower, {})
        entry = layers.setdefault(module, {"module": module, "depth": _depth(module)})
        key = "gamma" if leaf == "weight" else "beta"
        entry.update({f"{key}_l1": s["l1"], f"{key}_mean_abs": s["mean_abs"], f"{key}_numel": s["numel"]})
    return {t: _tower_profile(list(layers.values())) for t, layers in sorted(towers.items())}


def _tower_profile(layers: list[dict]) -> dict:
    order = {"pre": -1, "post": 1 << 30}
    layers.sort(key=lambda e: (order.get(e["depth"], e["depth"]) if isinstance(e["depth"], str) else e["depth"],
                               e["module"]))
    blocks: dict[int, dict] = {}
    for e in layers:
        if isinstance(e["depth"], int):
            b = blocks.setdefault(e["depth"], {"depth": e["depth"]})
            for key in ("gamma", "beta"):
                if f"{key}_l1" in e:
                    b[f"{key}_l1"] = b.get(f"{key}_l1", 0.0) + e[f"{key}_l1"]
                    b[f"{key}_numel"] = b.get(f"{key}_numel", 0) + e[f"{key}_numel"]
    per_block = []
    for d in sorted(blocks):
        b = blocks[d]
        row = {"depth": d}
        for key in ("gamma", "beta"):
            if f"{key}_l1" in b:
                row[f"{key}_mean_abs"] = b[f"{key}_l1"] / max(b[f"{key}_numel"], 1)
        per_block.append(row)
    corr = {}
    for key in ("gamma", "beta"):
        pts = [(r["depth"], r[f"{key}_mean_abs"]) for r in per_block if f"{key}_mean_abs" in r]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        corr[key] = {"n": len(pts), "spearman": spearman(xs, ys), "pearson": pearson(xs, ys)}
    return {"layers": layers, "per_block": per_block, "depth_correlation": corr}


def analyze_params(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], *,
                   added: set[str] = frozenset()) -> dict:
    """The analysis of the parameters both dicts hold (shapes must match; ValueError naming the first that does
    not). ``added``: top-level names of modules a method added (grouped apart, left out of the LayerNorm profile)."""
    common = sorted(set(before) & set(after))
    for n in common:
        if tuple(before[n].shape) != tuple(after[n].shape):
            raise ValueError(f"parameter {n} has shape {tuple(before[n].shape)} in one run and "
                             f"{tuple(after[n].shape)} in the other: the runs are of different architectures")
    stats = {n: _param_stats(before[n], after[n]) for n in common}
    return {
        "compared": len(common),
        "groups": _groups(stats, set(added)),
        "layernorm": _layernorm_profile(stats, set(added)),
        "parameters": [{"name": n, "group": param_group(n, set(added)), **s} for n, s in stats.items()],
    }


# ---------------------------------------------------------------------------------------------------- runs
def _json(meta: dict, key: str, default=None):
    try:
        v = json.loads(meta.get(key) or "null")
    except ValueError:
        return default
    return default if v is None else v


def _load_run(spec: str, flag: str) -> dict:
    """A run folder or checkpoint file -> its parameters and what it records (UsageError / FileNotFoundError naming
    ``flag`` when it is missing or not a leanclip checkpoint)."""
    head = read_checkpoint_meta(spec, flag=flag)
    try:
        meta, params = read_trainable(head["path"])
    except ValueError as e:
        raise UsageError(f"{flag}: {e}") from e
    extra = _json(meta, "extra", {})
    arch = _json(meta, "architecture", {})
    shapes = {n: list(s) for n, s in (arch.get("frozen_shapes") or {}).items()}
    shapes.update({n: list(t.shape) for n, t in params.items()})
    return {"flag": flag, "path": head["path"], "method": meta.get("method"), "model_name": head.get("model_name"),
            "options": head.get("options") or {}, "added": set(_json(meta, "modules", [])), "params": params,
            "shapes": shapes, "extra": extra}


def _check_same_architecture(a: dict, b_shapes: dict, b_name, b_what: str) -> None:
    """One line naming the difference when ``a`` and the other side are not the same architecture."""
    if a["model_name"] and b_name and a["model_name"] != b_name:
        raise UsageError(f"{a['flag']} {a['path']!r} is a {a['model_name']} run and {b_what} is {b_name}: runs of "
                         f"different architectures cannot be compared")
    diff = sorted(n for n in set(a["shapes"]) & set(b_shapes) if list(a["shapes"][n]) != list(b_shapes[n]))
    if diff:
        n = diff[0]
        raise UsageError(f"{a['flag']} {a['path']!r} and {b_what} are different architectures: {n} has shape "
                         f"{tuple(a['shapes'][n])} vs {tuple(b_shapes[n])}"
                         + (f" (+{len(diff) - 1} more)" if len(diff) > 1 else ""))


def _initial_params(run_: dict, args) -> dict[str, torch.Tensor]:
    """The run's base-model parameters as they were before training: the recorded model and weights, rebuilt."""
    import argparse

    init_from = run_["options"].get("init_from")
    if init_from:
        raise UsageError(f"RUN_A {run_['path']!r} was initialised from another checkpoint ({init_from!r}): compare "
                         f"against it by naming both runs (leanclip analyze INIT_RUN RUN)")
    model_name = run_["model_name"]
    if model_name and args.model and args.model != model_name:
        raise UsageError(f"--model {args.model}: RUN_A {run_['path']!r} is a {model_name} run: runs of "
                         f"different architectures cannot be compared")
    meta = {"model_name": model_name, "extra": run_["extra"]}
    rec = run_record(meta)
    # a run that records no weights started from its model's seeded init plus the synthetic pre-training steps it
    # records: that start is what --use-recorded-weights asks for, and it is rebuilt without reading any file
    recorded = bool((rec.get("weights") or {}).get("source"))
    ns = argparse.Namespace(model=args.model or DEFAULT_MODEL, pretrained=args.pretrained,
                            use_recorded_weights=args.use_recorded_weights and recorded, image_size=None,
                            pretrain_steps=None, trust_torchscript=False, no_progress=True)
    model = build_recorded_model(ns, meta)[0]
    current = dict(model.named_parameters())
    _check_same_architecture(run_, {n: list(p.shape) for n, p in current.items()}, ns.model, f"--model {ns.model}")
    base = [n for n in run_["params"] if n.split(".")[0] not in run_["added"]]
    unknown = [n for n in base if n not in current]
    if unknown:
        raise UsageError(f"RUN_A {run_['path']!r} holds {unknown[0]}, which --model {ns.model} does not have: runs "
                         f"of different architectures cannot be compared")
    from leanclip.llu import identity_reference

    return {**{n: current[n].detach() for n in base}, **identity_reference(run_["method"], run_["params"])}


# ---------------------------------------------------------------------------------------------------- plot
def _plot(profile: dict, path: Path, title: str) -> Path | None:
    """Per tower, mean |delta| of LayerNorm gamma and beta per block (PNG, written atomically); None when no
    LayerNorm was compared."""
    towers = [t for t in ("image", "text") if profile.get(t, {}).get("per_block")]
    if not towers:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(towers), figsize=(5.5 * len(towers), 3.8), squeeze=False)
    for ax, tower in zip(axes[0], towers):
        prof = profile[tower]
        for key, marker in (("gamma", "o"), ("beta", "s")):
            pts = [(r["depth"], r[f"{key}_mean_abs"]) for r in prof["per_block"] if f"{key}_mean_abs" in r]
            if pts:
                rho = prof["depth_correlation"][key]["spearman"]
                label = f"{key} (Spearman {rho:+.2f})" if rho is not None else key
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
        ax.set_title(f"{tower} tower")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("block")
        ax.set_ylabel("mean |change| of LayerNorm")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path, title)
    return path


def save_figure(fig, path: Path, title: str) -> None:
    """Title, layout, and the PNG written atomically (a reader never sees half a file); the figure is closed."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        utils.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------------- command
def add_arguments(p) -> None:
    p.description = ("Per-parameter change between two runs, or between one run and the weights it started from: "
                     "per-layer L1 change of LayerNorm gamma/beta per tower with its depth correlation, and the "
                     "change per parameter group. Prints JSON; --output also writes analysis.json and a PNG.")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="RUN_A [RUN_B]: run folders or checkpoint.safetensors files; with one run the reference is "
                        "its initial weights")
    p.add_argument("--model", default=None,
                   help="one run: the architecture to rebuild (default: the one the checkpoint records)")
    p.add_argument("--pretrained", metavar="SOURCE", default=None,
                   help="one run: the weights it started from (as for 'leanclip eval')")
    p.add_argument("--use-recorded-weights", action="store_true",
                   help="one run: read the weights the checkpoint records (a file only if its sha256 still matches)")
    p.add_argument("--output", metavar="DIR", default=None, help=f"write {JSON_NAME} and {PLOT_NAME} here")
    analyze_runs.add_arguments(p)


def run(args) -> int:
    analyze_runs.check(args)
    if args.grad or args.tsne:
        return analyze_runs.run(args)
    if len(args.runs) > 2:
        raise UsageError(f"analyze takes one or two runs, got {len(args.runs)}")
    two = len(args.runs) == 2
    if two and (args.model or args.pretrained or args.use_recorded_weights):
        raise UsageError("--model / --pretrained / --use-recorded-weights apply to one run (compared with its "
                         "initial weights), not to two")
    if args.output is not None:
        check_output(args.output, resume=None, overwrite=True)
    a = _load_run(args.runs[0], "RUN_A")
    if two:
        b = _load_run(args.runs[1], "RUN_B")
        _check_same_architecture(a, b["shapes"], b["model_name"], f"RUN_B {b['path']!r}")
        before, after, added = a["params"], b["params"], a["added"] | b["added"]
        if not set(before) & set(after):
            raise UsageError(f"RUN_A ({a['method']}) and RUN_B ({b['method']}) have no trained parameter in common")
    else:
        before, after, added = _initial_params(a, args), a["params"], a["added"]
    res = analyze_params(before, after, added=added)
    only_a, only_b = (sorted(set(before) - set(after)), sorted(set(after) - set(before))) if two else ([], [])
    not_compared = [] if two else sorted(set(after) - set(before))  # added modules: no pretrained value
    out = Path(args.output) if args.output else None
    title = f"{a['path']} vs {b['path']}" if two else f"{a['path']} vs its initial weights"
    plot = _plot(res["layernorm"], out / PLOT_NAME, title) if out is not None else None
    result = {"command": "analyze", "run_a": a["path"], "run_b": b["path"] if two else None,
              "reference": "RUN_A" if two else "initial weights", "model": a["model_name"],
              "methods": [a["method"]] + ([b["method"]] if two else []),
              "only_in_a": only_a, "only_in_b": only_b, "not_compared": not_compared,
              "plot": str(plot) if plot else None, **res}
    emit(result, args, JSON_NAME)
    return 0
