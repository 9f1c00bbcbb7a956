"""Image-tower features shared across runs: one forward pass over a dataset split per (image-tower weights,
preprocessing, split, precision, batch size), reused by every run that leaves the image tower frozen.

    export LEANCLIP_FEATURE_CACHE=sweep/features      # what `leanclip sweep` sets for its cells
    got = encoder_features(model, test_set, 256, device=dev, precision="fp32")
    # -> (raw (N, E) fp32 on CPU, labels (N,)), or None (no cache, or the image tower trains)

What is stored is ``model.encode_image(images).float()`` per sample, before any normalisation or method head, so the
callers (``leanclip.trainer.evaluate``, ``leanclip.llu.cached_image_features``) apply exactly the operations they
apply to a fresh batch: a run reading the cache computes the same numbers as one that does not.

Key: sha256 of the image tower (its ``repr``, i.e. structure and hyper-parameters, lean or plain modules, plus every
state tensor's name, dtype, shape and bytes), of the dataset (``dataset_fingerprint``: paths, labels and
the transform's repr), the autocast precision and the batch size. Changing any of them is a different entry, so
weights that change invalidate by construction; nothing is ever served for other weights.

Concurrency: one ``flock``-ed lock file per key; the first process computes and writes (temp + rename), the others
wait and read. Every forward pass over a dataset and every reuse is appended as one line to ``events.jsonl`` in the
cache folder (``{"event": "pass"|"hit", "key", "n"}``), which is how a sweep counts image-tower passes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from leanclip import utils
from leanclip.registry import method_hooks
from leanclip.training import eval_loader

ENV_VAR = "LEANCLIP_FEATURE_CACHE"
EVENTS_NAME = "events.jsonl"

__all__ = ["ENV_VAR", "SharedFeatureCache", "active_cache", "image_tower_frozen", "image_tower_fingerprint",
           "encoder_pass", "encoder_features", "cached_batches", "count_events"]


_CACHE_VERSION = 1


class FeatureCache:
    """Directory of ``<sha256>.safetensors`` files, each holding the tensors of one (model, dataset, transform, dtype)
    combination. Files are written atomically (temp file + ``os.replace``); a corrupt file is a miss and is rewritten.
    ``hits`` / ``misses`` count lookups of this instance."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        p = self.path(key)
        if not p.is_file():
            return None
        try:
            return load_file(str(p))
        except Exception as e:  # truncated / foreign file: treat as a miss
            utils.get_logger().warning("feature cache: ignoring unreadable %s (%s)", p, e)
            return None

    def save(self, key: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> Path:
        from safetensors.torch import save

        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                    metadata={"leanclip_feature_cache": str(_CACHE_VERSION), "meta": json.dumps(meta or {})})
        return utils.atomic_write_bytes(self.path(key), data)

    def get_or_compute(self, key: str, compute: Callable[[], Mapping[str, torch.Tensor]],
                       meta: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        got = self.load(key)
        if got is not None:
            self.hits += 1
            return got
        self.misses += 1
        out = {k: v.detach().cpu() for k, v in compute().items()}
        self.save(key, out, meta)
        return out


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_fingerprint(model: torch.nn.Module, weights_path: str | os.PathLike | None = None,
                      exclude: Sequence[str] = ("llu_",)) -> str:
    """Identity of the frozen encoders: sha256 of the weights file (plus the parameter dtypes) when given, else of
    every state_dict tensor's name, dtype, shape and bytes (random-init models), leaving out the LLU heads."""
    h = hashlib.sha256()
    if weights_path is not None:
        h.update(b"file:" + utils.sha256_file(weights_path).encode())
        h.update(json.dumps(sorted({str(p.dtype) for p in model.parameters()})).encode())
        return h.hexdigest()
    for name, t in model.state_dict().items():
        if any(name.startswith(e) or f".{e}" in name for e in exclude):
            continue
        h.update(name.encode())
        if isinstance(t, torch.Tensor):
            _hash_tensor(h, t)
    return h.hexdigest()


def dataset_fingerprint(dataset) -> str:
    """Identity of a dataset's sample list: paths + labels for ``ImageDataset`` (``.samples``), image bytes + labels
    for ``TensorImageDataset`` (``.images``), and the transform's repr."""
    h = hashlib.sha256()
    h.update(type(dataset).__name__.encode())
    if hasattr(dataset, "samples"):
        for s in dataset.samples:
            path, label = (s.path, s.label) if hasattr(s, "path") else (s[0], s[1])
            h.update(json.dumps([os.path.abspath(os.fspath(path)), int(label)]).encode())
    elif hasattr(dataset, "images") and isinstance(dataset.images, torch.Tensor):
        _hash_tensor(h, dataset.images)
        _hash_tensor(h, torch.as_tensor(dataset.labels))
    else:  # generic dataset: hash every item (slow but exact)
        for i in range(len(dataset)):
            x, y = dataset[i]
            _hash_tensor(h, torch.as_tensor(x))
            h.update(str(int(y)).encode())
    h.update(repr(getattr(dataset, "transform", None)).encode())
    return h.hexdigest()


def feature_key(model_name: str, model_id: str, dataset_id: str, dtype: str, kind: str = "image") -> str:
    blob = json.dumps({"v": _CACHE_VERSION, "kind": kind, "model": model_name, "model_id": model_id,
                       "data": dataset_id, "dtype": dtype}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# -------------------------------------------------------------------------------------------------- feature extraction


class SharedFeatureCache(FeatureCache):
    """:class:`FeatureCache` made safe for concurrent processes (a lock per key, write-once) and
    counted (``events.jsonl``)."""

    def get_or_compute(self, key: str, compute: Callable[[], Mapping[str, torch.Tensor]],
                       meta: Mapping | None = None) -> dict[str, torch.Tensor]:
        self.root.mkdir(parents=True, exist_ok=True)
        with _locked(self.root / f"{key}.lock"):
            got = self.load(key)
            if got is not None:
                self.hits += 1
                utils.append_jsonl(self.root / EVENTS_NAME, {"event": "hit", "key": key, **(meta or {})})
                return got
            self.misses += 1
            out = {k: v.detach().cpu().contiguous() for k, v in compute().items()}
            self.save(key, out, meta)
            utils.append_jsonl(self.root / EVENTS_NAME, {"event": "pass", "key": key, **(meta or {})})
            return out


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive ``flock`` on ``path`` for the block (no lock where fcntl does not exist)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: write-once via atomic rename still holds
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def active_cache() -> SharedFeatureCache | None:
    """The cache ``$LEANCLIP_FEATURE_CACHE`` names (created if needed), or None when it is unset or empty."""
    root = os.environ.get(ENV_VAR)
    return SharedFeatureCache(root) if root else None


def count_events(root) -> dict:
    """``{"passes": image-tower passes over a dataset, "hits": reuses}`` recorded in the cache folder ``root``."""
    path = Path(root) / EVENTS_NAME
    events = utils.read_jsonl(path) if path.is_file() else []
    return {"passes": sum(e.get("event") == "pass" for e in events),
            "hits": sum(e.get("event") == "hit" for e in events)}


def image_tower_frozen(model) -> bool:
    """True when ``leanclip.features.image_features`` is the bare, frozen image encoder: no image-tower parameter
    trains and no feature-level module (CLIP-Adapter) follows it."""
    if method_hooks(model).get("image_features") is not None:
        return False
    return not any(p.requires_grad for p in model.visual.parameters())


def _encode(model, images):
    """``model.encode_image`` in fp32, images cast to the patch embedding's dtype (frozen bf16 weights), as
    ``leanclip.features.image_features`` feeds the encoder."""
    conv = getattr(model.visual, "conv1", None)
    if conv is not None and images.dtype != conv.weight.dtype and images.is_floating_point():
        images = images.to(conv.weight.dtype)
    return model.encode_image(images).float()


def image_tower_fingerprint(model) -> str:
    """sha256 of the image tower's structure (``repr``) and state (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256(repr(model.visual).encode())
    for name, t in model.visual.state_dict().items():
        h.update(name.encode())
        _hash_tensor(h, t)
    return h.hexdigest()


@torch.no_grad()
def encoder_pass(model, dataset, batch_size: int, *, device, precision: str, num_workers: int = 0,
                 progress: bool = False, encode: Callable = _encode, post: Callable | None = None):
    """One pass of the image tower over ``dataset`` in order (eval mode, no grad): ``encode(model, images)`` per
    batch under autocast, then ``post`` (outside autocast) -> ``(features (N, E) on CPU, labels (N,) int64)``."""
    was = model.training
    model.eval()
    feats, labels = [], []
    try:
        for images, y in utils.track(eval_loader(dataset, batch_size, num_workers), "features", progress):
            with utils.autocast(device, precision):
                f = encode(model, images.to(device, non_blocking=True))
            feats.append((post(f) if post is not None else f).cpu())
            labels.append(torch.as_tensor(y).long().cpu())
    finally:
        model.train(was)
    if not feats:
        raise ValueError("image features: empty dataset")
    return torch.cat(feats), torch.cat(labels)


def encoder_features(model, dataset, batch_size: int, *, device, precision: str, num_workers: int = 0,
                     progress: bool = False, encoder_only: bool = False, cache: SharedFeatureCache | None = None):
    """``(raw image-encoder features (N, E) fp32 on CPU, labels (N,))`` of ``dataset`` in order, from the shared
    cache (``cache`` or :func:`active_cache`), computed there on a miss; None when there is no cache or when the
    model's image features depend on trainable parameters (:func:`image_tower_frozen`; ``encoder_only=True``: the
    caller uses the bare encoder output whatever trains, as zero-shot evaluation does). ``device`` / ``precision``
    are resolved values (a ``torch.device``, ``"fp32"`` / ``"bf16"``)."""
    cache = cache if cache is not None else active_cache()
    if cache is None or not (encoder_only or image_tower_frozen(model)):
        return None
    key = feature_key("image-tower", image_tower_fingerprint(model), dataset_fingerprint(dataset), precision,
                      kind=f"encoder/batch{int(batch_size)}")
    meta = {"n": len(dataset), "precision": precision, "batch_size": int(batch_size), "pid": os.getpid()}

    def compute():
        f, y = encoder_pass(model, dataset, batch_size, device=device, precision=precision, num_workers=num_workers,
                            progress=progress)
        return {"features": f, "labels": y}

    out = cache.get_or_compute(key, compute, meta)
    return out["features"].float(), out["labels"].long()


def cached_batches(model, dataset, batch_size: int, *, device, precision: str, num_workers: int = 0,
                   progress: bool = False, encoder_only: bool = False):
    """:func:`encoder_features` as ``(raw features, labels)`` chunks of ``batch_size`` rows (the batches an
    evaluation loader would give, so per-batch arithmetic is unchanged), or None (see there)."""
    got = encoder_features(model, dataset, batch_size, device=device, precision=precision, num_workers=num_workers,
                           progress=progress, encoder_only=encoder_only)
    if got is None:
        return None
    feats, labels = got
    return zip(feats.split(int(batch_size)), labels.split(int(batch_size)))
