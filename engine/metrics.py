"""Evaluation metrics: top-k accuracy, base-to-new harmonic mean, image-text retrieval recall@k.

All accuracies / recalls are percentages (0..100), returned as Python floats.

    accuracy(logits, labels, topk=(1, 5))            -> {"top1": 93.0, "top5": 99.0}
    AccuracyMeter(topk=(1, 5)).update(logits, labels) ... .compute()   (streaming, same numbers)
    mean_per_class_accuracy(logits, labels)          -> macro (class-balanced) top-1
    harmonic_mean(base, new)                         -> 2BN / (B + N), 0 when both are 0
    retrieval_recall(sim, txt_to_img, ks=(1, 5, 10)) -> {"i2t_R@1", ..., "t2i_R@10", "i2t_mean", "t2i_mean", "mean"}
    retrieval_recall_from_features(img_f, txt_f, txt_to_img)   same, without the N_img × N_txt matrix in memory

Retrieval protocol (COCO / Flickr style): image i has one or more captions (txt_to_img[j] = image of caption j).
Image→text: an image is a hit at k when any of its captions ranks in the top k. Text→image: a caption is a hit at k
when its image ranks in the top k. Ties count against the query (a negative with a score equal to the best positive
ranks ahead of it), so a constant similarity matrix scores 0, not 100; this makes results independent of sort order.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "accuracy",
    "AccuracyMeter",
    "mean_per_class_accuracy",
    "harmonic_mean",
    "retrieval_recall",
    "retrieval_recall_from_features",
]


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, (np.ndarray, list, tuple)):
        return torch.as_tensor(np.asarray(x))
    raise TypeError(f"{name} must be a tensor or array, got {type(x).__name__}")


def _check_topk(topk) -> tuple[int, ...]:
    if isinstance(topk, int):
        topk = (topk,)
    topk = tuple(topk)
    if not topk or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in topk):
        raise ValueError(f"topk must hold positive ints, got {topk!r}")
    return topk


def _check_logits_labels(logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
    logits = _as_tensor(logits, "logits")
    labels = _as_tensor(labels, "labels")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (N, C), got shape {tuple(logits.shape)}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be 1-D with N={logits.shape[0]} entries, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integers, got {labels.dtype}")
    if logits.shape[0] == 0:
        raise ValueError("logits is empty (N = 0)")
    if logits.shape[1] == 0:
        raise ValueError("logits has no classes (C = 0)")
    labels = labels.to(device=logits.device, dtype=torch.long)
    if bool(((labels < 0) | (labels >= logits.shape[1])).any()):
        raise ValueError(
            f"labels must lie in [0, {logits.shape[1]}), got min {int(labels.min())} max {int(labels.max())}"
        )
    return logits, labels


def _correct_counts(logits: torch.Tensor, labels: torch.Tensor, topk: tuple[int, ...]) -> list[int]:
    c = logits.shape[1]
    maxk = min(max(topk), c)
    pred = logits.topk(maxk, dim=1).indices  # N × maxk
    hit = pred.eq(labels[:, None])
    cum = hit.cumsum(1).clamp_(max=1)  # cum[:, k-1] = correct within top k
    return [int(cum[:, min(k, c) - 1].sum()) for k in topk]


def accuracy(logits, labels, topk: Sequence[int] | int = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent for each k -> {"top1": ..., "top5": ...}. With fewer classes than k, top-k counts
    every class (100%). ValueError for empty input, wrong shapes or labels outside [0, C)."""
    topk = _check_topk(topk)
    logits, labels = _check_logits_labels(logits, labels)
    n = logits.shape[0]
    return {f"top{k}": 100.0 * c / n for k, c in zip(topk, _correct_counts(logits, labels, topk))}


class AccuracyMeter:
    """Streaming top-k accuracy over batches: ``m.update(logits, labels)`` then ``m.compute()``."""

    def __init__(self, topk: Sequence[int] | int = (1, 5)):
        self.topk = _check_topk(topk)
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.correct = [0] * len(self.topk)

    def update(self, logits, labels) -> None:
        logits, labels = _check_logits_labels(logits, labels)
        for i, c in enumerate(_correct_counts(logits, labels, self.topk)):
            self.correct[i] += c
        self.n += logits.shape[0]

    def compute(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("AccuracyMeter has seen no samples")
        return {f"top{k}": 100.0 * c / self.n for k, c in zip(self.topk, self.correct)}


def mean_per_class_accuracy(logits, labels) -> float:
    """Class-balanced top-1 accuracy in percent: the mean over classes present in `labels` of per-class accuracy."""
    logits, labels = _check_logits_labels(logits, labels)
    pred = logits.argmax(1)
    c = logits.shape[1]
    total = torch.bincount(labels, minlength=c)
    right = torch.bincount(labels[pred == labels], minlength=c)
    present = total > 0
    return float((right[present].double() / total[present].double()).mean() * 100.0)


def harmonic_mean(base: float, new: float) -> float:
    """H = 2·B·N / (B + N) (base-to-new protocol); 0 when both are 0. ValueError for negative or non-finite input."""
    b, n = float(base), float(new)
    if not (math.isfinite(b) and math.isfinite(n)) or b < 0 or n < 0:
        raise ValueError(f"harmonic_mean needs finite non-negative accuracies, got base={base!r}, new={new!r}")
    if b + n == 0:
        return 0.0
    return 2.0 * b * n / (b + n)


# ----------------------------------------------------------------------------------------------------------------------
# Retrieval


def _mapping(txt_to_img, img_to_txt, n_img: int, n_txt: int, device) -> torch.Tensor:
    """-> LongTensor (n_txt,) image index of each caption; checks every image has >= 1 caption."""
    if txt_to_img is not None and img_to_txt is not None:
        raise ValueError("give txt_to_img or img_to_txt, not both")
    if txt_to_img is not None and not isinstance(txt_to_img, torch.Tensor):
        seq = list(txt_to_img)
        if seq and isinstance(seq[0], (list, tuple, range, np.ndarray)):  # nested: it is really img_to_txt
            txt_to_img, img_to_txt = None, seq
    if img_to_txt is not None:
        t2i = torch.full((n_txt,), -1, dtype=torch.long)
        if len(img_to_txt) != n_img:
            raise ValueError(f"img_to_txt has {len(img_to_txt)} entries for {n_img} images")
        for i, caps in enumerate(img_to_txt):
            for j in caps:
                j = int(j)
                if not 0 <= j < n_txt:
                    raise ValueError(f"img_to_txt[{i}] holds caption index {j} outside [0, {n_txt})")
                if t2i[j] != -1:
                    raise ValueError(f"caption {j} is assigned to two images ({int(t2i[j])} and {i})")
                t2i[j] = i
        if bool((t2i < 0).any()):
            raise ValueError(f"caption {int((t2i < 0).nonzero()[0])} belongs to no image in img_to_txt")
    elif txt_to_img is None:
        if n_img != n_txt:
            raise ValueError(f"without a mapping sim must be square (caption j of image j), got {n_img} × {n_txt}")
        t2i = torch.arange(n_txt)
    else:
        t2i = _as_tensor(txt_to_img, "txt_to_img")
        if t2i.dtype.is_floating_point or t2i.dtype == torch.bool:
            raise TypeError(f"txt_to_img must hold integers, got {t2i.dtype}")
        t2i = t2i.long().reshape(-1).cpu()
        if t2i.numel() != n_txt:
            raise ValueError(f"txt_to_img has {t2i.numel()} entries for {n_txt} captions")
        if n_txt and (int(t2i.min()) < 0 or int(t2i.max()) >= n_img):
            raise ValueError(f"txt_to_img values must lie in [0, {n_img})")
    counts = torch.bincount(t2i, minlength=n_img)
    if bool((counts == 0).any()):
        raise ValueError(f"image {int((counts == 0).nonzero()[0])} has no caption (every image needs at least one)")
    return t2i.to(device)


def _check_ks(ks) -> tuple[int, ...]:
    return _check_topk(ks)


def _recall(blocks: Iterator[tuple[int, torch.Tensor]], t2i, pos, n_img, n_txt, ks) -> dict[str, float]:
    """Ranks from row blocks of the similarity matrix; positives are masked out, so only negatives are counted."""
    device = pos.device
    best = torch.full((n_img,), -math.inf, dtype=pos.dtype, device=device)
    best.scatter_reduce_(0, t2i, pos, reduce="amax")
    i2t_rank = torch.empty(n_img, dtype=torch.long, device=device)
    t2i_rank = torch.zeros(n_txt, dtype=torch.long, device=device)
    for a, block in blocks:
        b = a + block.shape[0]
        if bool(torch.isnan(block).any()):
            raise ValueError(f"similarities hold NaN (rows {a}..{b - 1})")
        is_pos = t2i[None, :] == torch.arange(a, b, device=device)[:, None]
        neg = block.masked_fill(is_pos, -math.inf)
        i2t_rank[a:b] = (neg >= best[a:b, None]).sum(1)
        t2i_rank += (neg >= pos[None, :]).sum(0)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = float((i2t_rank < k).double().mean() * 100.0)
    for k in ks:
        out[f"t2i_R@{k}"] = float((t2i_rank < k).double().mean() * 100.0)
    out["i2t_mean"] = sum(out[f"i2t_R@{k}"] for k in ks) / len(ks)
    out["t2i_mean"] = sum(out[f"t2i_R@{k}"] for k in ks) / len(ks)
    out["mean"] = (out["i2t_mean"] + out["t2i_mean"]) / 2
    return out


def _rows_per_block(chunk_size: int, n_txt: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return max(1, min(chunk_size, (1 << 24) // max(n_txt, 1)))  # <= 16M elements per block


def retrieval_recall(
    sim,
    txt_to_img=None,
    ks: Sequence[int] = (1, 5, 10),
    *,
    img_to_txt: Sequence[Sequence[int]] | None = None,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@k both ways from a precomputed similarity matrix `sim` (N_img × N_txt, higher = more similar).

    Caption ownership: `txt_to_img` (N_txt image indices), or `img_to_txt` (per image, its caption indices; a nested
    list passed as `txt_to_img` is read as this), or neither for a square matrix with caption j of image j. Works on
    row blocks of `chunk_size` images: extra memory is O(block × N_txt), no sort. Returns percentages
    {"i2t_R@k"..., "t2i_R@k"..., "i2t_mean", "t2i_mean", "mean"} (mean = average of all 2·len(ks) recalls).
    """
    ks = _check_ks(ks)
    sim = _as_tensor(sim, "sim")
    if sim.dim() != 2 or sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"sim must be a non-empty 2-D (N_img, N_txt) matrix, got shape {tuple(sim.shape)}")
    if not sim.dtype.is_floating_point:
        sim = sim.double()
    n_img, n_txt = sim.shape
    t2i = _mapping(txt_to_img, img_to_txt, n_img, n_txt, sim.device)
    pos = sim[t2i, torch.arange(n_txt, device=sim.device)]
    rows = _rows_per_block(chunk_size, n_txt)
    blocks = ((a, sim[a : a + rows]) for a in range(0, n_img, rows))
    return _recall(blocks, t2i, pos, n_img, n_txt, ks)


def retrieval_recall_from_features(
    image_features,
    text_features,
    txt_to_img=None,
    ks: Sequence[int] = (1, 5, 10),
    *,
    img_to_txt: Sequence[Sequence[int]] | None = None,
    normalize: bool = True,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """`retrieval_recall` on cosine (or, with normalize=False, dot-product) similarities computed block by block from
    features (N_img × D, N_txt × D): the full matrix is never held. Computed in float32 (float64 stays float64)."""
    ks = _check_ks(ks)
    img = _as_tensor(image_features, "image_features")
    txt = _as_tensor(text_features, "text_features")
    if img.dim() != 2 or txt.dim() != 2 or img.shape[1] != txt.shape[1] or img.shape[0] == 0 or txt.shape[0] == 0:
        raise ValueError(
            f"image_features (N_img, D) and text_features (N_txt, D) must be non-empty 2-D with equal D, got "
            f"{tuple(img.shape)} and {tuple(txt.shape)}"
        )
    if img.device != txt.device:
        raise ValueError(f"image_features on {img.device} but text_features on {txt.device}")
    dtype = torch.float64 if torch.float64 in (img.dtype, txt.dtype) else torch.float32
    img, txt = img.to(dtype), txt.to(dtype)
    if normalize:
        img = torch.nn.functional.normalize(img, dim=-1)
        txt = torch.nn.functional.normalize(txt, dim=-1)
    n_img, n_txt = img.shape[0], txt.shape[0]
    t2i = _mapping(txt_to_img, img_to_txt, n_img, n_txt, img.device)
    pos = (img[t2i] * txt).sum(-1)
    rows = _rows_per_block(chunk_size, n_txt)
    txt_t = txt.t()
    blocks = ((a, img[a : a + rows] @ txt_t) for a in range(0, n_img, rows))
    return _recall(blocks, t2i, pos, n_img, n_txt, ks)
