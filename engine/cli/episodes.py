"""N-way K-shot episodic evaluation (Mini-ImageNet style), on any split the data layer reads.

    leanclip episodes --model ViT-B-16 --pretrained openai --data ROOT --dataset imagenet --ways 5 --shots 1 \\
        --queries 15 --episodes 600 --seed 1
    leanclip episodes --checkpoint runs/ln_pets --pretrained openai --data ROOT --dataset oxford_pets --shots 5

An episode draws ``ways`` classes among those with at least ``shots + queries`` images in the split, then for each
class ``shots`` support and ``queries`` query images (disjoint), all with one ``torch.Generator`` seeded by
``--seed``: the same seed gives the same episodes and the same numbers. Two classifiers score the queries of each
episode, both reported:

- ``text``: zero-shot CLIP over the episode's class names (the model's ``class_logits`` against the class text
  features, i.e. the method's own head where it has one: LLU heads, a linear probe, CoOp prompts); the support
  images are not used;
- ``prototype``: nearest class prototype by cosine, prototype = normalized mean of the class's L2-normalized support
  image features (``leanclip.features.image_features``: the fine-tuned image tower, CLIP-Adapter applied).

Accuracy is in percent per episode; the result is the mean over episodes with the 95% confidence half-width
``1.96 * s / sqrt(E)`` (s: sample standard deviation, ddof 1; null for one episode), the convention of the few-shot
literature. The episodes are drawn first (from the labels alone); then every image they use is encoded once, in
one pass (image features and text logits against all the split's classes), and each episode indexes those.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from leanclip import data as D
from leanclip import utils
from leanclip.cli.common import (
    DEFAULT_MODEL, UsageError, check_output, checkpoint_classnames, emit, eval_model, read_checkpoint_meta,
    setup_device, template_override,
)
from leanclip.templates import get_templates
from leanclip.select import model_device
from leanclip.training import eval_loader

__all__ = ["Episode", "sample_episodes", "eligible_classes", "prototype_logits", "mean_ci95", "episode_accuracies",
           "split_features", "add_model_arguments", "add_run_arguments", "check_model_arguments",
           "add_arguments", "run"]

Z95 = 1.96  # two-sided 95% quantile of the normal distribution


@dataclass(frozen=True)
class Episode:
    classes: torch.Tensor   # (N,) dataset labels; position i is the episode label i
    support: torch.Tensor   # (N*K,) sample indices, class-major (K of class 0, then K of class 1, ...)
    query: torch.Tensor     # (N*Q,) sample indices, class-major


def _positive(name: str, v, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


def eligible_classes(labels: torch.Tensor, need: int) -> list[int]:
    """Labels with at least ``need`` samples, sorted."""
    counts = torch.bincount(torch.as_tensor(labels).long())
    return [c for c in range(counts.numel()) if int(counts[c]) >= need]


def sample_episodes(labels, ways: int, shots: int, queries: int, episodes: int, seed: int) -> list[Episode]:
    """``episodes`` episodes over the samples with ``labels`` (int, (M,)); deterministic given ``seed``. ValueError
    (naming the flag) when fewer than ``ways`` classes have ``shots + queries`` samples."""
    labels = torch.as_tensor(labels).long()
    _positive("--ways", ways, 2)
    _positive("--shots", shots)
    _positive("--queries", queries)
    _positive("--episodes", episodes)
    need = shots + queries
    pool = eligible_classes(labels, need)
    if len(pool) < ways:
        raise ValueError(f"--ways {ways}: only {len(pool)} class(es) of the split have --shots + --queries = {need} "
                         f"images")
    members = {c: torch.nonzero(labels == c).flatten() for c in pool}
    pool_t = torch.tensor(pool)
    g = torch.Generator().manual_seed(int(seed))
    out = []
    for _ in range(episodes):
        classes = pool_t[torch.randperm(len(pool), generator=g)[:ways]]
        sup, qry = [], []
        for c in classes.tolist():
            idx = members[c][torch.randperm(members[c].numel(), generator=g)[:need]]
            sup.append(idx[:shots])
            qry.append(idx[shots:])
        out.append(Episode(classes, torch.cat(sup), torch.cat(qry)))
    return out


def prototype_logits(support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, ways: int):
    """(Q, ways) cosine of each query to each class prototype (normalized mean of the normalized support features
    of that class; ``support_labels`` in [0, ways))."""
    s = F.normalize(support.double(), dim=-1)
    sums = torch.zeros(ways, s.shape[1], dtype=torch.float64).index_add_(0, support_labels.long(), s)
    return F.normalize(query.double(), dim=-1) @ F.normalize(sums, dim=-1).t()


def mean_ci95(values) -> dict:
    """``{"mean", "ci95", "std", "n"}`` of per-episode accuracies: ci95 = 1.96 * std(ddof=1) / sqrt(n) (None for
    n = 1)."""
    v = torch.as_tensor(list(values), dtype=torch.float64)
    n = v.numel()
    if n == 0:
        raise ValueError("mean_ci95: no values")
    std = float(v.std(unbiased=True)) if n > 1 else None
    return {"mean": float(v.mean()), "ci95": Z95 * std / math.sqrt(n) if std is not None else None, "std": std, "n": n}


def episode_accuracies(eps: list[Episode], feats: torch.Tensor, text_logits: torch.Tensor | None) -> dict:
    """Per-episode accuracy (%) of the prototype and (when ``text_logits`` (M, C) is given) text classifiers."""
    acc = {"prototype": [], "text": []}
    for ep in eps:
        ways = ep.classes.numel()
        k = ep.support.numel() // ways
        q = ep.query.numel() // ways
        y_sup = torch.arange(ways).repeat_interleave(k)
        y_q = torch.arange(ways).repeat_interleave(q)
        pred = prototype_logits(feats[ep.support], y_sup, feats[ep.query], ways).argmax(1)
        acc["prototype"].append(100.0 * float((pred == y_q).double().mean()))
        if text_logits is not None:
            pred = text_logits[ep.query][:, ep.classes].argmax(1)
            acc["text"].append(100.0 * float((pred == y_q).double().mean()))
    return {k: v for k, v in acc.items() if v}


@torch.no_grad()
def split_features(model, dataset, classnames, templates, tokenizer, *, batch_size: int = 256, device=None,
                   precision: str = "auto", num_workers: int = 0, progress: bool = False):
    """(image features (M, E) fp32 normalized, text logits (M, C), labels (M,)) of a whole split, on CPU, in one
    pass: the class text features are computed once, each image once."""
    from leanclip import features as feats
    device = utils.resolve_device(device if device is not None else model_device(model))
    precision = utils.resolve_precision(precision, device)
    was = model.training
    model.eval()
    out_f, out_l, out_y = [], [], []
    try:
        with utils.autocast(device, precision):
            txt = feats.text_features(model, list(classnames), list(templates), tokenizer)
        for images, y in utils.track(eval_loader(dataset, batch_size, num_workers), "features", progress):
            with utils.autocast(device, precision):
                img = feats.image_features(model, images.to(device, non_blocking=True))
                logits = feats.class_logits(model, img, txt)
            out_f.append(img.float().cpu())
            out_l.append(logits.float().cpu())
            out_y.append(torch.as_tensor(y).long().cpu())
    finally:
        model.train(was)
    if not out_f:
        raise ValueError("the split is empty")
    return torch.cat(out_f), torch.cat(out_l), torch.cat(out_y)


# ---------------------------------------------------------------------------------------------------- command
def add_model_arguments(p) -> None:
    """--checkpoint / --model / --pretrained / --use-recorded-weights / --image-size / --pretrain-steps (the model
    an evaluation command scores: a run's, or a plain CLIP)."""
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", metavar="RUN", default=None,
                   help="a run folder or checkpoint of 'leanclip train': its method and trained parameters are "
                        "re-applied (without it: the plain --model / --pretrained CLIP)")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"open_clip config (default {DEFAULT_MODEL}, or the "
                                                          f"checkpoint's)")
    g.add_argument("--pretrained", metavar="SOURCE", default=None, help="weights (as for 'leanclip train')")
    g.add_argument("--use-recorded-weights", action="store_true",
                   help="with --checkpoint: read the weights it records (a file only if its sha256 still matches)")
    g.add_argument("--image-size", type=int, default=None, help="input resolution (default: the model's own)")
    g.add_argument("--pretrain-steps", type=int, default=None, metavar="N",
                   help="synthetic contrastive pre-training steps (as for 'leanclip train'; default 40 on synthetic "
                        "data with the default model and no --pretrained, else 0; with --checkpoint: the recorded "
                        "number)")
    g.add_argument("--templates", nargs="+", default=None, metavar="T",
                   help="prompt template(s) with '{}' for the text classifier, or 'ensemble'")


def add_run_arguments(p, result_name: str) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    g.add_argument("--batch-size", type=int, default=None, help="images per feature batch (default 256)")
    g.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes (default 0)")
    g.add_argument("--threads", type=int, default=None, help="torch intra-op CPU threads")
    g.add_argument("--output", metavar="DIR", default=None, help=f"also write {result_name} here")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_model_arguments(args) -> None:
    """The model flags' combinations and templates, before any work."""
    if args.use_recorded_weights and not args.checkpoint:
        raise UsageError("--use-recorded-weights needs --checkpoint")
    if args.templates is not None:
        from leanclip.templates import get_templates

        get_templates(None, template_override(args))


def add_arguments(p) -> None:
    p.description = ("N-way K-shot episodic evaluation: mean accuracy and 95 percent confidence interval over "
                     "episodes of a text (zero-shot) and a prototype (support-mean) classifier. Prints JSON (also episodes.json "
                     "under --output).")
    add_model_arguments(p)
    g = p.add_argument_group("data")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--data", metavar="ROOT", default=None, help="data root holding --dataset")
    src.add_argument("--split-file", metavar="F", default=None, help="a CoOp split JSON")
    src.add_argument("--synthetic", action="store_true", help="the synthetic dataset (the default)")
    g.add_argument("--dataset", default=None, help="dataset name under --data (also picks the prompt template)")
    g.add_argument("--image-root", default=None, help="image folder for --split-file (default: next to the file)")
    g.add_argument("--split", choices=("test", "val", "train"), default="test",
                   help="the split episodes are drawn from (default test)")
    g.add_argument("--synthetic-classes", type=int, default=10, help="classes of the synthetic dataset (default 10)")
    g.add_argument("--synthetic-dir", default=None, help="where the synthetic dataset lives (default: the cache)")
    g.add_argument("--allow-outside-root", action="store_true",
                   help="let a split file name images outside the image root")
    g = p.add_argument_group("episodes")
    g.add_argument("--ways", type=int, default=5, help="N classes per episode (default 5)")
    g.add_argument("--shots", type=int, default=1, help="K support images per class (default 1)")
    g.add_argument("--queries", type=int, default=15, help="Q query images per class (default 15)")
    g.add_argument("--episodes", type=int, default=600, help="number of episodes E (default 600)")
    g.add_argument("--seed", type=int, default=1, help="episode sampling seed (default 1)")
    add_run_arguments(p, "episodes.json")


def _check_args(args) -> None:
    """Every flag of this command that ``leanclip.cli.common.check_numbers`` does not cover, before any work."""
    for flag, v, lo in (("--ways", args.ways, 2), ("--shots", args.shots, 1), ("--queries", args.queries, 1),
                        ("--episodes", args.episodes, 1)):
        if v < lo:
            raise UsageError(f"{flag} must be >= {lo}, got {v}")
    if args.episodes > 1_000_000:
        raise UsageError(f"--episodes must be <= 1000000, got {args.episodes}")
    if args.data and not args.dataset:
        raise UsageError("--data needs --dataset NAME")
    if args.dataset and not (args.data or args.split_file):
        raise UsageError("--dataset needs --data ROOT")
    check_model_arguments(args)


def _split_samples(args) -> tuple[list, list[str], str]:
    """(samples of --split, class names by label, dataset name) from --data / --split-file / synthetic data."""
    outside = bool(args.allow_outside_root)
    if args.data:
        splits, classnames = D.load_dataset(args.data, args.dataset, allow_outside_root=outside)
        name = args.dataset
    elif args.split_file:
        splits = D.read_split_file(args.split_file, args.image_root, allow_outside_root=outside)
        classnames = D.classnames_from_samples(splits)
        stem = os.path.splitext(os.path.basename(args.split_file))[0]
        name = args.dataset or (stem[len("split_zhou_"):] if stem.startswith("split_zhou_") else None)
    else:
        from leanclip import synthetic

        base = synthetic.private_dir(args.synthetic_dir or os.path.join(synthetic.cache_dir(), "synthetic"),
                                     "--synthetic-dir" if args.synthetic_dir else "synthetic-data cache")
        size = args.image_size or 32  # the synthetic images' own size; the transform resizes them for the model
        root = synthetic.cached_split_dataset(base, args.synthetic_classes, size, 16, 4, 20, seed=0)
        splits, classnames = D.load_dataset(root, "Synthetic")
        name = "Synthetic"
    samples = list(splits.get(args.split) or [])
    if not samples:
        raise UsageError(f"the {args.split} split of {name or 'the data'!r} is empty")
    return samples, classnames, name


def run(args) -> int:
    t0 = time.perf_counter()
    _check_args(args)
    if args.output is not None:
        check_output(args.output, resume=None, overwrite=True)
    meta = read_checkpoint_meta(args.checkpoint) if args.checkpoint else None
    device = setup_device(args)
    samples, classnames, name = _split_samples(args)
    train_names = checkpoint_classnames(meta, classnames)
    eps = sample_episodes([s.label for s in samples], args.ways, args.shots, args.queries, args.episodes, args.seed)
    used = sorted(set(torch.cat([torch.cat([e.support, e.query]) for e in eps]).tolist()))
    _, bad = D.check_images([samples[i] for i in used], decode=False)
    if bad:
        raise bad[0]
    templates = get_templates(name, template_override(args))
    model, tok, size, (mean, std) = eval_model(args, meta, train_names)
    model.to(device)
    tf = D.clip_transform(size, train=False, **{k: v for k, v in (("mean", mean), ("std", std)) if v})
    feats, logits, _ = split_features(model, D.ImageDataset([samples[i] for i in used], tf), classnames, templates,
                                      tok, batch_size=args.batch_size or 256, device=device,
                                      precision=args.precision, num_workers=args.num_workers,
                                      progress=not args.no_progress)
    where = torch.full((len(samples),), -1, dtype=torch.long)
    where[torch.tensor(used)] = torch.arange(len(used))
    local = [Episode(e.classes, where[e.support], where[e.query]) for e in eps]
    acc = episode_accuracies(local, feats, logits)
    result = {"command": "episodes", "model": args.model, "checkpoint": meta["path"] if meta else None,
              "method": meta["method"] if meta else None,
              "dataset": name, "split": args.split, "ways": args.ways, "shots": args.shots, "queries": args.queries,
              "episodes": args.episodes, "seed": args.seed, "classes": len(classnames),
              "eligible_classes": len(eligible_classes(torch.tensor([s.label for s in samples]),
                                                       args.shots + args.queries)),
              "images_encoded": len(used), "templates": templates,
              "classifiers": {k: mean_ci95(v) for k, v in acc.items()},
              "per_episode": acc, "seconds": round(time.perf_counter() - t0, 3)}
    emit(result, args, "episodes.json")
    return 0
