"""LLU: identity-initialised affine maps on frozen CLIP embeddings, trained on cached features.

Per tower, ``g(x) = W x + b`` (W = I, b = 0 at start) and a per-sample gate
``alpha(x) = beta * exp(-gamma * (1 - max_{d in D} <x, d>))``;
``out = normalize(alpha * normalize(g(x)) + (1 - alpha) x)``
(``leanclip.heads.LLUHead``; the max over the bank D is ``kernels.max_sim``: no N x M matrix). Loss::

    CE(logit_scale * out_img @ out_txt.T, y) + lam * (reg(W_img, b_img) + reg(W_txt, b_txt))

with ``reg = mean((W-I)^2) + mean(b^2)`` (the authors' code; the default) or, with the method option ``reg=norm``,
``||W-I||_F + ||b||_2`` (the paper's formula). The ablations of the paper are method options of ``llu`` (see
``leanclip.heads.LLUHead``): ``gate=dirac`` / ``gate=none``, ``init=random``, ``shared=true`` (one map, one
regulariser term).

The encoders never back-propagate: image features of every dataset are computed once (``leanclip.feature_cache``),
class text features once per class set. Banks: image head D = the training image features, or (``clusters=k``) the
normalized means of ``min(k, n)`` agglomerative clusters (complete linkage, cosine); text head D = the training
classes' text features. At test time new classes / far-away images get a small alpha, i.e. stay close to zero-shot CLIP.

    cache = leanclip.feature_cache.FeatureCache("runs/features")
    feats, labels = cached_image_features(model, train_set, cache)               # (N, E) fp32 normalized, (N,)
    txt = class_text_features(model, classnames, templates, tokenizer)           # (C, E) frozen, normalized
    summary = train_llu(model, feats, labels, txt, cfg)                          # heads trained in place
    logits = llu_logits(model, test_feats, txt)                                  # chunked over test rows
    run_llu(model, train_set, classnames, templates, tokenizer, cfg, eval_sets)  # all of the above (used by train())
    identity_distances(model)   # each map's ||W - I||_F, ||b|| and both regulariser forms (logged at each epoch's
                                # end; the run's result holds them as identity_distance: final and per_epoch)
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from leanclip import utils
from leanclip.feature_cache import FeatureCache, active_cache, encoder_features, encoder_pass
from leanclip.metrics import AccuracyMeter
from leanclip.options import recorded_option
from leanclip.registry import METHOD_OPTIONS
from leanclip.run_files import CHECKPOINT_NAME, FEATURES_DIR, LOG_NAME
from leanclip.select import model_device
from leanclip.training import (
    build_optimizer, lr_at, resume_state, run_summary, save_state, set_lr,
)

__all__ = [
    "extract_image_features",
    "cached_image_features",
    "class_text_features",
    "cluster_bank",
    "llu_heads",
    "llu_reg",
    "llu_option",
    "identity_distances",
    "identity_reference",
    "train_llu",
    "head_loss_fn",
    "llu_logits",
    "evaluate_llu",
    "run_llu",
]



# ------------------------------------------------------------------------------------------------------ feature cache
@torch.no_grad()
def extract_image_features(model, dataset, batch_size: int = 256, *, device=None, precision: str = "auto",
                           num_workers: int = 0, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, E) fp32 L2-normalized on CPU, labels (N,) int64) of the frozen image encoder, in dataset order.
    For an ``llu`` model this is ``leanclip.features.image_features`` (the LLU heads act in ``class_logits``)."""
    return cached_image_features(model, dataset, None, batch_size, device=device, precision=precision,
                                 num_workers=num_workers, progress=progress)


def cached_image_features(model, dataset, cache: FeatureCache | None, batch_size: int = 256, *, device=None,
                          precision: str = "auto", num_workers: int = 0,
                          progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`extract_image_features` from the encoder features of ``leanclip.feature_cache`` (the shared
    ``$LEANCLIP_FEATURE_CACHE`` one when set: one pass per image tower and split across a sweep's runs; else
    ``cache``), computed there on a miss, or computed directly when there is no cache."""
    dev = utils.resolve_device(device if device is not None else model_device(model))
    prec = utils.resolve_precision(precision, dev)
    kw = dict(device=dev, precision=prec, num_workers=num_workers, progress=progress)
    shared = active_cache()
    got = encoder_features(model, dataset, batch_size, cache=shared if shared is not None else cache, **kw)
    raw, labels = got if got is not None else encoder_pass(model, dataset, batch_size, **kw)
    return F.normalize(raw.to(dev), dim=-1).float().cpu(), labels


@torch.no_grad()
def class_text_features(model, classnames: Sequence[str], templates: Sequence[str], tokenizer, *, device=None,
                        precision: str = "auto") -> torch.Tensor:
    """Frozen zero-shot class text features (C, E), fp32, L2-normalized (template-averaged as E1 defines it)."""
    from leanclip.features import frozen_text_features
    device = utils.resolve_device(device if device is not None else model_device(model))
    precision = utils.resolve_precision(precision, device)
    with utils.autocast(device, precision):
        t = frozen_text_features(model, list(classnames), list(templates), tokenizer)
    return F.normalize(t.float(), dim=-1)


# -------------------------------------------------------------------------------------------------------------- banks
def cluster_bank(feats: torch.Tensor, n_clusters: int | None = 512) -> torch.Tensor:
    """The bank D: all (normalized) ``feats`` when ``n_clusters`` is None/0 or >= N, else the normalized means of
    ``n_clusters`` agglomerative clusters (complete linkage, cosine distance). Note: sklearn holds an N x N distance
    matrix (float64), so N is practical up to ~20k."""
    feats = F.normalize(feats.detach().float().cpu(), dim=-1)
    n = feats.shape[0]
    if n == 0:
        raise ValueError("cluster_bank: no features")
    if not n_clusters or n_clusters >= n:
        return feats
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1 or None, got {n_clusters}")
    from sklearn.cluster import AgglomerativeClustering

    lab = AgglomerativeClustering(n_clusters=int(n_clusters), metric="cosine", linkage="complete").fit_predict(
        feats.double().numpy())
    lab = torch.as_tensor(lab, dtype=torch.long)
    sums = torch.zeros(int(n_clusters), feats.shape[1], dtype=torch.float64).index_add_(0, lab, feats.double())
    return F.normalize(sums, dim=-1).float()


# --------------------------------------------------------------------------------------------------------------- heads
def llu_heads(model):
    img, txt = getattr(model, "llu_image", None), getattr(model, "llu_text", None)
    if img is None or txt is None:
        raise ValueError("model has no LLU heads: call leanclip.prepare(model, 'llu') first")
    return img, txt


def _head_params(model) -> list[torch.nn.Parameter]:
    """The heads' trainable parameters, each once (a shared map's W and b belong to both heads)."""
    img, txt = llu_heads(model)
    out, seen = [], set()
    for p in list(img.parameters()) + list(txt.parameters()):
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def llu_reg(model) -> torch.Tensor:
    """The regulariser of both heads; a shared map (``shared=True``: the text head is tied to the image head) is
    one map and counts once."""
    img, txt = llu_heads(model)
    return img.reg() if txt.tied else img.reg() + txt.reg()


@torch.no_grad()
def identity_distances(model) -> dict:
    """How far each map is from the identity (I, 0), in float64 (the paper's Table 4 column): per head
    ``{"w_minus_i_fro": ||W - I||_F, "b_norm": ||b||_2, "reg_mse": mean((W - I)^2) + mean(b^2),
    "reg_norm": ||W - I||_F + ||b||_2}`` (both regulariser forms, whichever the run trains with), under ``image`` and
    ``text``; a shared map (``shared=True``) is one map, reported once as ``shared``."""
    img, txt = llu_heads(model)
    heads = {"shared": img} if txt.tied else {"image": img, "text": txt}
    out = {}
    for name, head in heads.items():
        w, b = head.weight.detach().double(), head.bias.detach().double()
        d = w - torch.eye(head.dim, dtype=torch.float64, device=w.device)
        fro, bn = float(torch.linalg.matrix_norm(d)), float(torch.linalg.vector_norm(b))
        out[name] = {"w_minus_i_fro": fro, "b_norm": bn, "reg_mse": float(d.square().mean() + b.square().mean()),
                     "reg_norm": fro + bn}
    return out


def identity_reference(method: str, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """(I, 0) for the maps among ``params`` (a checkpoint's trainable tensors of a ``method`` run): the ``weight`` /
    ``bias`` of each module the method adds in an ``image_logit`` / ``text_logit`` role (LLU's heads; a shared map is
    saved once, under the image head). What ``leanclip analyze`` measures them against: the regulariser's origin, also
    for ``init=random``."""
    from leanclip.registry import METHOD_TRAITS, parse_method

    if not method:
        return {}
    heads = {name for p in parse_method(method) for role, name in METHOD_TRAITS[p].hooks.items()
             if role in ("image_logit", "text_logit")}
    out = {}
    for name, t in params.items():
        head, _, leaf = name.partition(".")
        if head in heads and leaf == "weight" and t.dim() == 2 and t.shape[0] == t.shape[1]:
            out[name] = torch.eye(t.shape[0], dtype=t.dtype)
        elif head in heads and leaf == "bias":
            out[name] = torch.zeros_like(t)
    return out


def _logit_scale(model) -> torch.Tensor:
    return model.logit_scale.detach().float().exp()


def llu_forward(model, x: torch.Tensor, class_txt: torch.Tensor) -> torch.Tensor:
    """logits (N, C) = logit_scale * llu_image(x) @ llu_text(class_txt).T (banks from the heads' ``set_bank``)."""
    img, txt = llu_heads(model)
    out_i = img(x)
    out_t = txt(class_txt)
    return _logit_scale(model).to(out_i.device) * out_i.float() @ out_t.float().t()


def llu_option(model, name: str):
    """``llu_lambda`` or ``llu_clusters`` of a model prepared with ``llu``: the method's options, given to
    ``prepare`` (``leanclip.methods.llu.LluOptions``), set the trainer's regulariser weight and image bank."""
    return recorded_option(model, METHOD_OPTIONS["llu"], name)


def llu_loss(model, x, y, class_txt, lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = llu_forward(model, x, class_txt)
    ce = F.cross_entropy(logits, y)
    return ce + lam * llu_reg(model), ce, logits


def head_loss_fn(model, images: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str],
                 templates: Sequence[str], tokenizer):
    """The loss closure of one LLU training step on a batch of images, for timing it (``leanclip demo``,
    ``leanclip bench step``): the frozen towers encode the batch and the class prompts once, here, as a run encodes
    every image once before training; the closure is what each of :func:`train_llu`'s steps computes on those cached
    features (the heads' forward and regulariser, weighted by the model's ``llu_lambda``; the encoders never run in
    it). Banks: the batch's image features, the class text features."""
    from leanclip.features import image_features

    with torch.no_grad():
        feats = image_features(model, images)
        txt = class_text_features(model, classnames, templates, tokenizer)
    image_head, text_head = llu_heads(model)
    image_head.set_bank(feats)
    text_head.set_bank(txt)
    labels = torch.as_tensor(labels).to(feats.device)
    lam = llu_option(model, "llu_lambda")
    return lambda: llu_loss(model, feats, labels, txt, lam)[0]


# -------------------------------------------------------------------------------------------------------------- train
def train_llu(model, train_feats: torch.Tensor, train_labels: torch.Tensor, class_text_feats: torch.Tensor, cfg,
              *, bank: torch.Tensor | None = None, resume=None) -> dict:
    """Train ``model.llu_image`` / ``model.llu_text`` on cached features (cfg: ``leanclip.trainer.TrainConfig``; uses
    epochs, batch_size, lr, optimizer, momentum, weight_decay, warmup_*, scheduler, seed, device, output, log_every,
    clip_grad_norm; the regulariser weight and the bank size are the model's ``llu`` options ``llu_lambda`` and
    ``llu_clusters``). Banks are set on the heads (image: ``bank`` or ``cluster_bank(train_feats, llu_clusters)``;
    text: ``class_text_feats``). Returns the per-step history."""
    cfg.validate()
    device = utils.resolve_device(cfg.device)
    x_all, y_all, t_all = _checked_features(train_feats, train_labels, class_text_feats, device)
    utils.seed_everything(cfg.seed)
    model.to(device)
    img_head, txt_head = llu_heads(model)
    if bank is None:
        bank = cluster_bank(x_all, llu_option(model, "llu_clusters"))
    img_head.set_bank(bank.to(device))
    txt_head.set_bank(t_all)
    params = _head_params(model)
    if not params:
        raise ValueError("LLU heads have no trainable parameters")
    opt = build_optimizer(params, cfg)
    n = x_all.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    out_dir = Path(cfg.output) if cfg.output else None
    ckpt = out_dir / CHECKPOINT_NAME if out_dir is not None else None
    start_epoch, step, history = 0, 0, []
    if resume is not None:
        start_epoch, step, history = resume_state(model, opt, resume, cfg, steps_per_epoch)
    elif out_dir is not None and (out_dir / LOG_NAME).exists():
        (out_dir / LOG_NAME).unlink()
    img_head.train()
    txt_head.train()
    images_seen, t_run = 0, time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        g = torch.Generator().manual_seed(utils.derive_seed(cfg.seed, epoch))
        order = torch.randperm(n, generator=g).to(device)
        for b0 in range(0, n, cfg.batch_size):
            idx = order[b0:b0 + cfg.batch_size]
            rec = _llu_step(model, opt, params, x_all[idx], y_all[idx], t_all, cfg,
                            lr_at(step, cfg, steps_per_epoch), step, epoch, ckpt)
            step, images_seen = step + 1, images_seen + idx.numel()
            if b0 + cfg.batch_size >= n:  # the epoch's last step: where the maps stand after it
                rec["identity_distance"] = identity_distances(model)
            history.append(rec)
            if out_dir is not None and (step % cfg.log_every == 0 or b0 + cfg.batch_size >= n):
                utils.append_jsonl(out_dir / LOG_NAME, rec)
        _log_epoch(history, epoch, cfg.epochs)
        if out_dir is not None:
            utils.check_finite_params(params, step=step, epoch=epoch + 1, lr=history[-1]["lr"], checkpoint=ckpt)
            save_state(model, opt, ckpt, cfg, epoch + 1, step, steps_per_epoch,
                       cfg.extra.get("classnames", []), cfg.extra.get("templates", []))
        if cfg.stop_after_epoch is not None and epoch + 1 >= cfg.stop_after_epoch and epoch + 1 < cfg.epochs:
            break
    img_head.eval()
    txt_head.eval()
    return {"history": history, "steps": step, "bank_size": int(bank.shape[0]), "images_seen": images_seen,
            "seconds": time.perf_counter() - t_run, "identity_distance": identity_record(history, model)}


def identity_record(history: list, model) -> dict:
    """The run's identity distances: ``final`` (the maps now) and ``per_epoch`` (``[{"epoch", **distances}]`` from
    the epoch-end records of ``history``, a resumed run's earlier epochs included)."""
    per_epoch = [{"epoch": r["epoch"], **r["identity_distance"]} for r in history if "identity_distance" in r]
    return {"final": identity_distances(model), "per_epoch": per_epoch}


def _checked_features(train_feats, train_labels, class_text_feats, device):
    """Normalized image features, labels and class text features on ``device``; ValueError when they disagree."""
    x_all = F.normalize(train_feats.detach().float(), dim=-1).to(device)
    y_all = torch.as_tensor(train_labels).long().to(device)
    t_all = F.normalize(class_text_feats.detach().float(), dim=-1).to(device)
    if x_all.dim() != 2 or x_all.shape[0] != y_all.shape[0] or x_all.shape[0] == 0:
        raise ValueError(f"train_feats (N, E) and train_labels (N,) must match; got {tuple(x_all.shape)} and "
                         f"{tuple(y_all.shape)}")
    if int(y_all.max()) >= t_all.shape[0] or int(y_all.min()) < 0:
        raise ValueError(f"train_labels must lie in [0, {t_all.shape[0]}) (one text feature per class)")
    return x_all, y_all, t_all


def _llu_step(model, opt, params, x, y, t_all, cfg, lr: float, step: int, epoch: int, ckpt) -> dict:
    """One optimizer step of the heads on a batch of cached features; its log record. The one host sync comes
    before the update: a non-finite step never reaches the heads."""
    t0 = time.perf_counter()
    set_lr(opt, lr)
    loss, ce, logits = llu_loss(model, x, y, t_all, llu_option(model, "llu_lambda"))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.clip_grad_norm is not None:  # the norm before clipping: non-finite iff a gradient is
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
    else:
        gnorm = utils.grad_norm(params)
    acc = (logits.argmax(1) == y).float().mean()
    loss_v, ce_v, acc_v, gn = torch.stack([loss.detach().float(), ce.detach().float(), acc,
                                           gnorm.detach().float().to(x.device)]).tolist()
    utils.check_finite_step(loss_v, gn, step=step + 1, epoch=epoch + 1, lr=lr, checkpoint=ckpt)
    opt.step()
    dt = time.perf_counter() - t0
    rec = {"step": step + 1, "epoch": epoch + 1, "loss": loss_v, "ce": ce_v, "acc": acc_v, "lr": lr,
           "img_per_s": y.numel() / dt if dt > 0 else None}
    mem = utils.peak_memory_bytes(x.device)
    if mem is not None:
        rec["peak_mem_bytes"] = mem
    return rec


def _log_epoch(history: list, epoch: int, epochs: int) -> None:
    """About ten progress lines per run."""
    ep = [r for r in history if r["epoch"] == epoch + 1]
    if ep and (epoch + 1 == epochs or (epoch + 1) % max(1, epochs // 10) == 0):
        dist = ep[-1].get("identity_distance", {})
        far = ", ".join(f"{k} |W-I| {v['w_minus_i_fro']:.4g} |b| {v['b_norm']:.4g}" for k, v in dist.items())
        utils.get_logger().info("llu epoch %d/%d: loss %.4f ce %.4f acc %.3f%s", epoch + 1, epochs,
                                sum(r["loss"] for r in ep) / len(ep), sum(r["ce"] for r in ep) / len(ep),
                                sum(r["acc"] for r in ep) / len(ep), f"; {far}" if far else "")


# --------------------------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def llu_logits(model, feats: torch.Tensor, class_text_feats: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """(N, C) logits of cached image features against class text features, ``batch_size`` rows at a time: the gate
    goes through ``kernels.max_sim`` per chunk, so nothing N x M (M = bank size) is built."""
    img, txt = llu_heads(model)
    device = img.weight.device
    out_t = txt(F.normalize(class_text_feats.float(), dim=-1).to(device)).float()
    scale = _logit_scale(model).to(device)
    chunks = []
    for x in feats.split(batch_size):
        out_i = img(F.normalize(x.float(), dim=-1).to(device)).float()
        chunks.append((scale * out_i @ out_t.t()).cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, out_t.shape[0])


@torch.no_grad()
def evaluate_llu(model, feats: torch.Tensor, labels: torch.Tensor, class_text_feats: torch.Tensor,
                 batch_size: int = 8192) -> dict:
    """top1/top5 (%) of LLU on cached features, streamed in ``batch_size`` chunks."""
    meter = AccuracyMeter(topk=(1, 5))
    labels = torch.as_tensor(labels).long()
    for x, y in zip(feats.split(batch_size), labels.split(batch_size)):
        meter.update(llu_logits(model, x, class_text_feats, batch_size), y)
    return {**meter.compute(), "n": meter.n}


# ------------------------------------------------------------------------------------------------------------ pipeline
def run_llu(model, train_set, classnames, templates, tokenizer, cfg, eval_sets=None, resume=None) -> dict:
    """The LLU pipeline used by ``leanclip.trainer.train(method="llu")``: cached features -> ``train_llu`` -> evaluation
    of ``eval_sets`` (``{name: dataset}`` or ``{name: (dataset, classnames)}``; "base" + "new" also give H)."""
    t0 = time.perf_counter()
    device = utils.resolve_device(cfg.device)
    precision = utils.resolve_precision(cfg.precision, device)
    model.to(device)
    cache_dir = cfg.cache_dir or (str(Path(cfg.output) / FEATURES_DIR) if cfg.output else None)
    for folder in (cfg.output, cache_dir):  # temps of writes killed in an earlier run (checkpoint, features)
        if folder:
            utils.remove_stale_temps(folder)
    cache = FeatureCache(cache_dir) if cache_dir else None
    kw = dict(device=device, precision=precision, num_workers=cfg.num_workers, progress=cfg.progress)
    feats, labels = cached_image_features(model, train_set, cache, cfg.eval_batch_size, **kw)
    txt = class_text_features(model, classnames, templates, tokenizer, device=device, precision=precision)
    cfg.extra.setdefault("classnames", list(classnames))
    cfg.extra.setdefault("templates", list(templates))
    res = train_llu(model, feats, labels, txt, cfg, resume=resume)
    history = res["history"]
    metrics = {}
    for name, ds in (eval_sets or {}).items():
        cn = classnames
        if isinstance(ds, tuple):
            ds, cn = ds
        f, y = cached_image_features(model, ds, cache, cfg.eval_batch_size, **kw)
        t = txt if cn is classnames else class_text_features(model, cn, templates, tokenizer, device=device,
                                                             precision=precision)
        metrics[name] = evaluate_llu(model, f, y, t)
    if "base" in metrics and "new" in metrics:
        from leanclip.metrics import harmonic_mean

        metrics["H"] = harmonic_mean(metrics["base"]["top1"], metrics["new"]["top1"])
    if metrics:
        utils.get_logger().info("final eval: %s", metrics)
    seconds = time.perf_counter() - t0
    s = run_summary(cfg, history, metrics, Path(cfg.output) if cfg.output else None, seconds, res["images_seen"],
                 device, precision)
    s["train_seconds"] = res["seconds"]  # the heads alone (features cached)
    s["bank_size"] = res["bank_size"]
    s["identity_distance"] = res["identity_distance"]
    s["result_extra"] = {"bank_size": res["bank_size"], "identity_distance": res["identity_distance"]}
    if cache is not None:
        s["feature_cache"] = {"dir": str(cache.root), "hits": cache.hits, "misses": cache.misses}
    return s
