"""``leanclip analyze RUN --grad`` / ``--tsne``: CLIPFit's analyses of one classification run, on the run's own model and
data, rebuilt through ``leanclip eval``'s one restore path (``restore_inputs`` / ``restore_data`` /
``prepare_from_checkpoint``: the recorded architecture, weights, method, options and K-shot selection).

    leanclip analyze runs/clipfit --grad --batches 10 --output runs/clipfit_grad   # Fig. 4 (left)
    leanclip analyze runs/clipfit --tsne --output runs/clipfit_tsne                # Fig. 5

``--grad``: sums of squared gradients of the run's training loss (``leanclip.grad_stats``) over N training batches
(the run's batch size, its first epoch's order and augmentation under its seed, the method's extra loss terms
referenced to the weights the run started from, as in training), in fp32 whatever precision the run trained in,
at the trained weights (``--at trained``) or at the start (``--at start``); per tensor, per block, and per group (``leanclip.cli.analyze.param_group``: image /
text LayerNorm, text ``mlp.c_proj.bias``, other image / text biases, other image / text parameters, each added
module). Writes ``grad.json``, prints a table.

``--tsne``: the test images' features (``leanclip.features.image_features``: the image encoder, plus CLIP-Adapter
where the method has one) of the zero-shot model (the weights the run started from) and of the tuned one, each
embedded by scikit-learn's t-SNE (PCA init, seeded: the same PNG each time) and drawn side by side coloured by
class; ``tsne.json`` holds the silhouette score of each (cosine, in feature space). scikit-learn is the optional
``analysis`` extra.
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from leanclip import utils
from leanclip.checkpoint import load_trainable
from leanclip.cli.classify import load_data
from leanclip.features import image_features
from leanclip.grad_stats import squared_grad_sums
from leanclip.methods import method_options, method_trainer
from leanclip.step import ClassifyStep
from leanclip.trainer import saved_run_options
from leanclip.training import dataset_labels, epoch_loader
from leanclip.cli.common import (
    DATA_DEFAULTS, DEFAULT_MODEL, UsageError, build_recorded_model, check_output, emit, prepare_from_checkpoint,
    read_checkpoint_meta, restore_data, run_record,
)

__all__ = ["add_arguments", "check", "run", "GRAD_JSON", "TSNE_JSON", "TSNE_PNG"]

GRAD_JSON, TSNE_JSON, TSNE_PNG = "grad.json", "tsne.json", "tsne.png"
MAX_BATCHES = 100_000
_BLOCK = re.compile(r"(?:^|\.)(?:resblocks|blocks|layers?)\.(\d+)\.")
GROUPING = ("groups from parameter names: '<tower> LayerNorm' (LayerNorm weight / bias), 'text mlp.c_proj.bias' "
            "(CLIPFit's text biases), '<tower> bias' (other biases), '<tower> other', 'added: <module>' (modules the "
            "method added), 'other' (outside both towers); tower = image for visual.*, else text")


def add_arguments(p) -> None:
    g = p.add_argument_group("one run's training-time analyses (CLIPFit Fig. 4 / 5)")
    what = g.add_mutually_exclusive_group()
    what.add_argument("--grad", action="store_true",
                      help=f"sums of squared gradients of the run's training loss per tensor and group over "
                           f"--batches training batches; writes {GRAD_JSON} and prints a table")
    what.add_argument("--tsne", action="store_true",
                      help=f"t-SNE of the test features, zero-shot vs tuned, coloured by class ({TSNE_PNG}, "
                           f"scikit-learn's TSNE)")
    g.add_argument("--batches", type=int, default=10, metavar="N", help="--grad: training batches (default 10)")
    g.add_argument("--at", choices=("trained", "start"), default="trained",
                   help="--grad: the gradients at the trained weights or at the weights the run started from")
    g.add_argument("--tsne-samples", type=int, default=2000, metavar="N",
                   help="--tsne: at most N test images (a seeded subset; default 2000)")
    g.add_argument("--data", metavar="ROOT", default=None, help="--grad / --tsne: the run's data root")
    g.add_argument("--dataset", default=None, help="--grad / --tsne: the run's dataset under --data")
    g.add_argument("--split-file", metavar="F", default=None, help="--grad / --tsne: the run's split file")
    g.add_argument("--image-root", default=None, help="image folder for --split-file")
    g.add_argument("--synthetic-dir", default=None, help="where a synthetic run's data is (default: the cache)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="--grad / --tsne: device")


def check(args) -> None:
    """The flags of ``--grad`` / ``--tsne``, before any work (one line, exit 2)."""
    flags = {"--batches": args.batches != 10, "--at": args.at != "trained", "--tsne-samples": args.tsne_samples != 2000,
             "--data": args.data, "--dataset": args.dataset, "--split-file": args.split_file,
             "--image-root": args.image_root, "--synthetic-dir": args.synthetic_dir, "--device": args.device != "auto"}
    if not (args.grad or args.tsne):
        given = [f for f, v in flags.items() if v]
        if given:
            raise UsageError(f"{given[0]} applies to --grad / --tsne")
        return
    if len(args.runs) != 1:
        raise UsageError(f"--{'grad' if args.grad else 'tsne'} analyses one run, got {len(args.runs)}")
    if args.grad and not 1 <= args.batches <= MAX_BATCHES:
        raise UsageError(f"--batches must be in [1, {MAX_BATCHES}], got {args.batches}")
    if args.tsne and not 10 <= args.tsne_samples <= 1_000_000:
        raise UsageError(f"--tsne-samples must be in [10, 1000000], got {args.tsne_samples}")
    if args.tsne:
        if args.output is None:
            raise UsageError(f"--tsne draws {TSNE_PNG}: give --output DIR")
    if args.output is not None:
        check_output(args.output, resume=None, overwrite=True)


def run(args) -> int:
    ctx = _restore(args)
    return _grad(args, ctx) if args.grad else _tsne(args, ctx)


# --------------------------------------------------------------------------------------------------------- restore
def _restore(args) -> dict:
    """The run's checkpoint, the eval-style namespace its model and data are rebuilt from, and the data."""

    meta = read_checkpoint_meta(args.runs[0], flag="RUN")
    meta["options"] = saved_run_options(meta["method"], meta.get("options"),
                                        (meta.get("extra") or {}).get("config"))
    record = run_record(meta)
    if not record.get("data"):
        raise UsageError(f"RUN {meta['path']!r} records no classification data (a contrastive run?): --grad / --tsne "
                         f"analyse classification runs")
    if args.grad and method_trainer(meta["method"]) == "cached":
        raise UsageError(f"--grad: a {meta['method']} run trains on cached features with its own loop; its gradients "
                         f"are not a ClassifyStep's")
    ns = argparse.Namespace(
        model=args.model or DEFAULT_MODEL, pretrained=args.pretrained, use_recorded_weights=args.use_recorded_weights,
        image_size=None, pretrain_steps=None, trust_torchscript=False, no_progress=True, data=args.data,
        dataset=args.dataset, split_file=args.split_file, image_root=args.image_root, synthetic=False,
        synthetic_dir=args.synthetic_dir, eval_split="test", templates=None, template_set=None,
        allow_outside_root=False, skip_bad_images=False, output=str(Path(meta["path"]).parent),
        **{k: None for k in DATA_DEFAULTS})
    if not (record.get("weights") or {}).get("source"):
        ns.use_recorded_weights = False  # a smoke run's start is rebuilt from what it records (as analyze does)
    if restore_data(ns, record["data"]):
        raise UsageError(f"--dataset {args.dataset}: RUN {meta['path']!r} was trained on "
                         f"{record['data'].get('dataset')!r}; --grad / --tsne analyse it on its own data")
    device = utils.resolve_device(args.device)
    built = build_recorded_model(ns, meta)
    data = load_data(ns, built[2], *built[3], train_transform=True, need_train=bool(args.grad))
    extra = meta.get("extra") or {}
    names = (meta.get("options") or {}).get("classnames") or extra.get("classnames") or data["classnames"]
    return {"meta": meta, "ns": ns, "built": built, "data": data, "device": device, "classnames": list(names),
            "templates": extra.get("templates"), "config": extra.get("config") or {}}


def _tuned(ctx: dict, *, load: bool = True):
    model, tok = ctx["built"][0], ctx["built"][1]
    prepare_from_checkpoint(model, ctx["meta"], tok, ctx["ns"].model, classnames=ctx["classnames"], load=load)
    return model.to(ctx["device"])


# ------------------------------------------------------------------------------------------------------------ grad
def _batches(dataset, batch_size: int, seed: int, n: int):
    """The first ``n`` batches the run trained on: its epochs' seeded order, as many epochs as needed."""

    epoch, done = 0, 0
    while done < n:
        for batch in epoch_loader(dataset, batch_size, seed, epoch):
            yield batch
            done += 1
            if done == n:
                return
        epoch += 1


def _grad(args, ctx: dict) -> int:

    meta, cfg, data = ctx["meta"], ctx["config"], ctx["data"]
    if data["train"] is None:
        raise UsageError(f"RUN {meta['path']!r}: the train split of {data['dataset']!r} is empty")
    seed, batch = int(ctx["ns"].seed), int(cfg.get("batch_size") or 32)
    model = _tuned(ctx, load=False)
    model.train()
    utils.seed_everything(seed)
    step_cfg = SimpleNamespace(**cfg)
    kw = dict(cfg=step_cfg, device=ctx["device"], precision="fp32")
    step = ClassifyStep(model, ctx["classnames"], ctx["templates"] or [], ctx["built"][1], **kw)
    if args.at == "trained":  # the loss terms keep their reference to the start, as in the run
        load_trainable(model, meta["path"])
        terms = step.terms
        step = ClassifyStep(model, ctx["classnames"], ctx["templates"] or [], ctx["built"][1], **kw)
        step.terms = terms
    utils.seed_everything(seed)
    sums, n = squared_grad_sums(model, step, _batches(data["train"], batch, seed, args.batches))
    result = _grad_result(meta, sums, dict(model.named_parameters()), set(model.leanclip_info.get("modules") or ()))
    result.update(at=args.at, batches=n, batch_size=batch, seed=seed, dataset=data["dataset"],
                  extra_loss_terms=len(step.terms), kd_lambda=_kd_lambda(meta))
    print(_grad_table(result))
    emit(result, args, GRAD_JSON)
    return 0


def _kd_lambda(meta: dict) -> float | None:
    """The distillation weight the run trained with (None: its method has no such term)."""
    declared = [method_options(p) for p in meta["method"].split("+")]
    default = next((d["kd_lambda"] for d in declared if "kd_lambda" in d), None)
    return None if default is None else meta["options"].get("kd_lambda", default)


def _grad_result(meta: dict, sums: dict, params: dict, added: set) -> dict:
    from leanclip.cli.analyze import param_group

    rows = []
    for name, s in sums.items():
        m = _BLOCK.search(name)
        rows.append({"name": name, "group": param_group(name, added), "block": int(m.group(1)) if m else None,
                     "numel": params[name].numel(), "sum_sq": s, "mean_sq": s / max(params[name].numel(), 1)})
    groups: dict[str, dict] = {}
    for r in rows:
        g = groups.setdefault(r["group"], {"tensors": 0, "numel": 0, "sum_sq": 0.0})
        g["tensors"] += 1
        g["numel"] += r["numel"]
        g["sum_sq"] += r["sum_sq"]
    for g in groups.values():
        g["mean_sq"] = g["sum_sq"] / max(g["numel"], 1)
    return {"command": "analyze", "analysis": "grad", "run": meta["path"], "method": meta["method"],
            "grouping": GROUPING, "groups": dict(sorted(groups.items())), "parameters": rows}


def _grad_table(result: dict) -> str:
    lines = [f"sum of squared gradients over {result['batches']} batches of {result['batch_size']} "
             f"({result['method']}, {result['at']} weights)", "",
             "| group | tensors | numel | sum g^2 | mean g^2 |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {g} | {v['tensors']} | {v['numel']} | {v['sum_sq']:.4e} | {v['mean_sq']:.4e} |"
              for g, v in result["groups"].items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------ t-SNE
def _tsne(args, ctx: dict) -> int:


    data, seed = ctx["data"], int(ctx["ns"].seed)
    dataset = data["eval"]
    rng = np.random.default_rng(seed)
    n = min(len(dataset), args.tsne_samples)
    idx = np.sort(rng.choice(len(dataset), size=n, replace=False)) if n < len(dataset) else np.arange(n)
    zs = _features(ctx["built"][0].to(ctx["device"]), dataset, idx, ctx["device"])  # before the method is applied
    tuned = _features(_tuned(ctx), dataset, idx, ctx["device"])
    labels = dataset_labels(dataset).numpy()[idx]
    panels = {name: _embed(feats, labels, seed) for name, feats in (("zero-shot", zs), ("tuned", tuned))}
    out = Path(args.output)
    _tsne_plot(panels, labels, data["classnames"], out / TSNE_PNG, f"{ctx['meta']['path']}: {data['dataset']} test")
    result = {"command": "analyze", "analysis": "tsne", "run": ctx["meta"]["path"], "method": ctx["meta"]["method"],
              "dataset": data["dataset"], "images": int(n), "classes": len(data["classnames"]), "seed": seed,
              "silhouette_cosine": {k: v["silhouette"] for k, v in panels.items()}, "plot": str(out / TSNE_PNG)}
    emit(result, args, TSNE_JSON)
    return 0


def _features(model, dataset, idx, device):

    model.eval()
    subset = torch.utils.data.Subset(dataset, [int(i) for i in idx])
    loader = torch.utils.data.DataLoader(subset, batch_size=64, shuffle=False)
    with torch.no_grad():
        return torch.cat([image_features(model, x.to(device)).cpu() for x, _ in loader]).double().numpy()


def _embed(feats, labels, seed: int) -> dict:
    """2-D t-SNE of ``feats`` (seeded, PCA init) and the cosine silhouette of the classes in feature space."""
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score

    n = len(feats)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(feats)
    k = len(set(labels.tolist()))
    sil = float(silhouette_score(feats, labels, metric="cosine")) if 2 <= k < n else None
    return {"xy": xy, "silhouette": None if sil is None or not math.isfinite(sil) else sil}


def _tsne_plot(panels: dict, labels, classnames: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from leanclip.cli.analyze import save_figure

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    cmap = plt.get_cmap("tab20" if len(classnames) > 10 else "tab10")
    for ax, (name, p) in zip(axes[0], panels.items()):
        for c in sorted(set(labels.tolist())):
            pts = p["xy"][labels == c]
            ax.scatter(pts[:, 0], pts[:, 1], s=8, color=cmap(c % cmap.N), label=classnames[c])
        sil = f" (silhouette {p['silhouette']:.3f})" if p["silhouette"] is not None else ""
        ax.set_title(name + sil, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(classnames) <= 20:
        axes[0][-1].legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    save_figure(fig, path, title)
