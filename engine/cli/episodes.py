"""N-way K-shot episodic evaluation (Mini-ImageNet style), on any split the data layer reads.

    leanclip episodes --model ViT-B-16 --pretrained openai --data ROOT --dataset imagenet --ways 5 --shots 1 \\
        --queries 15 --episodes 600 --seed 1
    leanclip episodes --checkpoint runs/ln_pets --pretrained openai --data ROOT --dataset oxford_pets --shots 5
    leanclip episodes --checkpoint runs/ln_mini --pretrained openai --mini-imagenet IMAGENET --adapt coop

An episode draws ``ways`` classes among those with at least ``shots + queries`` images in the split, then for each
class ``shots`` support and ``queries`` query images (disjoint), all with one ``torch.Generator`` seeded by
``--seed``: the same seed gives the same episodes and the same numbers. Two classifiers score the queries of each
episode, both reported:

- ``text``: zero-shot CLIP over the episode's class names (the model's ``class_logits`` against the class text
  features, i.e. the method's own head where it has one: LLU heads, a linear probe, CoOp prompts); the support
  images are not used;
- ``prototype``: nearest class prototype by cosine, prototype = normalized mean of the class's L2-normalized support
  image features (``leanclip.features.image_features``: the fine-tuned image tower, CLIP-Adapter applied).

With ``--adapt METHOD`` (``coop``, ``adapter``, ``linear-probe``: ``leanclip.episode_adapt``) a third classifier,
``adapt``, prepares a fresh METHOD on the scored model's weights (the checkpoint's tuned LayerNorms kept frozen) for
each episode, trains it on the episode's support set (``--adapt-steps`` full-batch steps, default CoOp's epoch count
for the shot count; ``--adapt-lr``, default the method's own) and scores its queries; each episode is seeded from
``(--seed, episode index)``, so the numbers do not depend on the data-loader worker count. ``--mini-imagenet ROOT``
draws the episodes from a Mini-ImageNet split (Ravi & Larochelle's classes, ``leanclip.mini_imagenet``) of an
ImageNet folder.

Accuracy is in percent per episode; the result is the mean over episodes with the 95% confidence half-width
``1.96 * s / sqrt(E)`` (s: sample standard deviation, ddof 1; null for one episode), the convention of the few-shot
literature. The episodes are drawn first (from the labels alone); then every image they use is encoded once, in
one pass (the bare encoder output, read from the shared feature cache when ``$LEANCLIP_FEATURE_CACHE`` is set), and
each classifier and each episode's adaptation indexes those rows.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from leanclip import data as D
from leanclip import feature_cache
from leanclip import features as feats
from leanclip import synthetic
from leanclip import utils
from leanclip.cli.classify import coop_epochs
from leanclip.cli.common import (
    DEFAULT_MODEL, UsageError, check_output, checkpoint_classnames, emit, eval_model, read_checkpoint_meta,
    setup_device, template_override,
)
from leanclip.episode_adapt import adapt_config, adapt_episode, check_adapt_method, check_adapt_model
from leanclip.mini_imagenet import export_split_file, find_train_dir, mini_imagenet_split
from leanclip.templates import get_templates
from leanclip.select import model_device

__all__ = ["Episode", "sample_episodes", "eligible_classes", "prototype_logits", "mean_ci95", "episode_accuracies",
           "encode_split", "score_split", "split_features", "adapted_accuracies", "add_model_arguments", "add_run_arguments", "check_model_arguments",
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
def encode_split(model, dataset, *, batch_size: int = 256, device, precision: str, num_workers: int = 0,
                 progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(bare image-encoder output (M, E) fp32, labels (M,)) of ``dataset`` on CPU: one pass, each image once, or the
    shared feature cache's entry for these weights and images (``leanclip.feature_cache.encoder_features``).
    ``device`` / ``precision``: resolved values."""

    kw = dict(device=device, precision=precision, num_workers=num_workers, progress=progress)
    got = feature_cache.encoder_features(model, dataset, batch_size, encoder_only=True, **kw)
    return got if got is not None else feature_cache.encoder_pass(model, dataset, batch_size, **kw)


@torch.no_grad()
def score_split(model, encoded: torch.Tensor, classnames, templates, tokenizer, *, batch_size: int = 256, device,
                precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(image features (M, E) fp32 normalized, text logits (M, C)) on CPU of the encoder rows ``encoded``: the
    model's feature hook, and its ``class_logits`` against the class text features (computed once)."""

    was = model.training
    model.eval()
    out_f, out_l = [], []
    try:
        with utils.autocast(device, precision):
            txt = feats.text_features(model, list(classnames), list(templates), tokenizer)
            for rows in encoded.split(batch_size):
                img = feats.features_from_encoded(model, rows.to(device))
                out_f.append(img.float().cpu())
                out_l.append(feats.class_logits(model, img, txt).float().cpu())
    finally:
        model.train(was)
    return torch.cat(out_f), torch.cat(out_l)


def split_features(model, dataset, classnames, templates, tokenizer, *, batch_size: int = 256, device=None,
                   precision: str = "auto", num_workers: int = 0, progress: bool = False):
    """(image features (M, E) fp32 normalized, text logits (M, C), labels (M,)) of a whole split, on CPU, in one
    pass: the class text features are computed once, each image once (:func:`encode_split`, :func:`score_split`)."""
    device = utils.resolve_device(device if device is not None else model_device(model))
    precision = utils.resolve_precision(precision, device)
    encoded, labels = encode_split(model, dataset, batch_size=batch_size, device=device, precision=precision,
                                   num_workers=num_workers, progress=progress)
    f, logits = score_split(model, encoded, classnames, templates, tokenizer, batch_size=batch_size, device=device,
                            precision=precision)
    return f, logits, labels


def adapted_accuracies(model, method: str, eps: list[Episode], encoded: torch.Tensor, classnames, templates,
                       tokenizer, cfg, *, seed: int, device, precision: str, progress: bool = False) -> list[float]:
    """Per-episode query accuracy (%) of a fresh ``method`` trained on each episode's support rows of ``encoded``
    (``leanclip.episode_adapt.adapt_episode``; episode ``i`` seeded with ``derive_seed(seed, i)``)."""

    out = []
    for i, ep in enumerate(utils.track(eps, f"adapt {method}", progress)):
        ways = ep.classes.numel()
        y_sup = torch.arange(ways).repeat_interleave(ep.support.numel() // ways)
        y_q = torch.arange(ways).repeat_interleave(ep.query.numel() // ways)
        names = [classnames[c] for c in ep.classes.tolist()]
        logits = adapt_episode(model, method, encoded[ep.support], y_sup, encoded[ep.query], names, templates,
                               tokenizer, cfg, seed=utils.derive_seed(seed, i), device=device, precision=precision)
        out.append(100.0 * float((logits.argmax(1).cpu() == y_q).double().mean()))
    return out


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
    src.add_argument("--mini-imagenet", metavar="ROOT", default=None,
                     help="an ImageNet folder (ROOT/train/<wnid>/): episodes from the Mini-ImageNet --split (Ravi & "
                          "Larochelle's 64 / 16 / 20 classes)")
    g.add_argument("--dataset", default=None, help="dataset name under --data (also picks the prompt template)")
    g.add_argument("--image-root", default=None, help="image folder for --split-file (default: next to the file)")
    g.add_argument("--split", choices=("test", "val", "train"), default="test",
                   help="the split episodes are drawn from (default test)")
    g.add_argument("--export-split", metavar="FILE", default=None,
                   help="with --mini-imagenet: write the --split classes as a CoOp split file (every 10th image of a "
                        "class held out as val = test) and stop; train on it with --split-file FILE --image-root "
                        "ROOT/train (--split train: the 64 training classes, for the LN-tuned checkpoint)")
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
    add_adapt_arguments(p)
    add_run_arguments(p, "episodes.json")


def add_adapt_arguments(p) -> None:
    g = p.add_argument_group("per-episode adaptation")
    g.add_argument("--adapt", metavar="METHOD", default=None,
                   help="also train a fresh METHOD (coop, adapter, linear-probe) on each episode's support set, on "
                        "the scored model's weights, and report its query accuracy as 'adapt'")
    g.add_argument("--adapt-steps", type=int, default=None, metavar="N",
                   help="full-batch optimizer steps per episode (default: CoOp's epochs for --shots: 50 for 1, 100 "
                        "for 2-4, 200 beyond)")
    g.add_argument("--adapt-lr", type=float, default=None, metavar="LR",
                   help="learning rate (default: the method's own: 2e-3 SGD for coop and adapter, 1e-3 AdamW for "
                        "linear-probe)")


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
    if args.mini_imagenet and args.dataset:
        raise UsageError("--mini-imagenet names its own classes: drop --dataset")
    if args.export_split and not args.mini_imagenet:
        raise UsageError("--export-split needs --mini-imagenet ROOT")
    if args.export_split and (args.checkpoint or args.pretrained or args.adapt):
        raise UsageError("--export-split writes a split file only: drop --checkpoint / --pretrained / --adapt")
    _check_adapt_args(args)
    if args.dataset and not (args.data or args.split_file):
        raise UsageError("--dataset needs --data ROOT")
    check_model_arguments(args)


def _check_adapt_args(args) -> None:

    if args.adapt is None:
        given = [f for f, v in (("--adapt-steps", args.adapt_steps), ("--adapt-lr", args.adapt_lr)) if v is not None]
        if given:
            raise UsageError(f"{given[0]} needs --adapt METHOD")
        return
    try:
        check_adapt_method(args.adapt, "--adapt")
        if args.adapt_steps is not None:
            utils.check_number("epochs", args.adapt_steps, label="--adapt-steps")
        if args.adapt_lr is not None:
            utils.check_number("lr", args.adapt_lr, label="--adapt-lr")
    except ValueError as e:
        raise UsageError(str(e)) from None


def _adapt_config(args):
    """The per-episode training config of --adapt (None without it)."""
    if args.adapt is None:
        return None

    steps = args.adapt_steps if args.adapt_steps is not None else coop_epochs(args.shots, None)
    return adapt_config(args.adapt, steps, args.adapt_lr)


def _split_samples(args) -> tuple[list, list[str], str]:
    """(samples of --split, class names by label, dataset name) from --data / --split-file / synthetic data."""
    outside = bool(args.allow_outside_root)
    if args.mini_imagenet:

        samples, classnames = mini_imagenet_split(args.mini_imagenet, args.split, allow_outside_root=outside)
        return samples, classnames, "MiniImageNet"
    if args.data:
        splits, classnames = D.load_dataset(args.data, args.dataset, allow_outside_root=outside)
        name = args.dataset
    elif args.split_file:
        splits = D.read_split_file(args.split_file, args.image_root, allow_outside_root=outside)
        classnames = D.classnames_from_samples(splits)
        stem = os.path.splitext(os.path.basename(args.split_file))[0]
        name = args.dataset or (stem[len("split_zhou_"):] if stem.startswith("split_zhou_") else None)
    else:

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
    adapt_cfg = _adapt_config(args)
    if args.output is not None:
        check_output(args.output, resume=None, overwrite=True)
    if args.export_split:
        return _export_mini_imagenet(args)
    meta = read_checkpoint_meta(args.checkpoint) if args.checkpoint else None
    device = setup_device(args)
    precision = utils.resolve_precision(args.precision, device)
    samples, classnames, name = _split_samples(args)
    train_names = checkpoint_classnames(meta, classnames)
    eps = sample_episodes([s.label for s in samples], args.ways, args.shots, args.queries, args.episodes, args.seed)
    used = sorted(set(torch.cat([torch.cat([e.support, e.query]) for e in eps]).tolist()))
    _, bad = D.check_images([samples[i] for i in used], decode=False)
    if bad:
        raise bad[0]
    templates = get_templates("ImageNet" if name == "MiniImageNet" else name, template_override(args))
    model, tok, size, (mean, std) = eval_model(args, meta, train_names)
    model.to(device)
    if adapt_cfg is not None:

        check_adapt_model(model, args.adapt, [classnames[c] for c in eps[0].classes.tolist()], templates, tok)
    tf = D.clip_transform(size, train=False, **{k: v for k, v in (("mean", mean), ("std", std)) if v})
    bs, progress = args.batch_size or 256, not args.no_progress
    encoded, _ = encode_split(model, D.ImageDataset([samples[i] for i in used], tf), batch_size=bs, device=device,
                              precision=precision, num_workers=args.num_workers, progress=progress)
    feats, logits = score_split(model, encoded, classnames, templates, tok, batch_size=bs, device=device,
                                precision=precision)
    where = torch.full((len(samples),), -1, dtype=torch.long)
    where[torch.tensor(used)] = torch.arange(len(used))
    local = [Episode(e.classes, where[e.support], where[e.query]) for e in eps]
    acc = episode_accuracies(local, feats, logits)
    if adapt_cfg is not None:
        acc["adapt"] = adapted_accuracies(model, args.adapt, local, encoded, classnames, templates, tok, adapt_cfg,
                                          seed=args.seed, device=device, precision=precision, progress=progress)
    result = {"command": "episodes", "model": args.model, "checkpoint": meta["path"] if meta else None,
              "method": meta["method"] if meta else None,
              "dataset": name, "split": args.split, "ways": args.ways, "shots": args.shots, "queries": args.queries,
              "episodes": args.episodes, "seed": args.seed, "classes": len(classnames),
              "eligible_classes": len(eligible_classes(torch.tensor([s.label for s in samples]),
                                                       args.shots + args.queries)),
              "images_encoded": len(used), "templates": templates, "adapt": _adapt_record(args, adapt_cfg),
              "classifiers": {k: mean_ci95(v) for k, v in acc.items()},
              "per_episode": acc, "seconds": round(time.perf_counter() - t0, 3)}
    emit(result, args, "episodes.json")
    return 0


def _export_mini_imagenet(args) -> int:

    path = export_split_file(args.mini_imagenet, args.export_split, args.split,
                             allow_outside_root=bool(args.allow_outside_root))
    splits = D.read_split_file(path, find_train_dir(args.mini_imagenet), allow_outside_root=args.allow_outside_root)
    emit({"command": "episodes", "dataset": "MiniImageNet", "split": args.split, "export": path,
          "image_root": find_train_dir(args.mini_imagenet), "splits": {k: len(v) for k, v in splits.items()}},
         args, "episodes.json")
    return 0


def _adapt_record(args, cfg) -> dict | None:
    """What --adapt trained per episode, with the values used (null without --adapt)."""
    if cfg is None:
        return None
    return {"method": args.adapt, "steps": cfg.epochs, "lr": cfg.lr, "optimizer": cfg.optimizer,
            "momentum": cfg.momentum if cfg.optimizer == "sgd" else None, "weight_decay": cfg.weight_decay,
            "warmup_steps": cfg.warmup_epochs if cfg.warmup_epochs < cfg.epochs else 0, "warmup_lr": cfg.warmup_lr,
            "scheduler": cfg.scheduler, "batch": "the whole support set"}
