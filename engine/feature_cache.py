"""Image-tower features shared across runs: one forward pass over a dataset split per (image-tower weights,
preprocessing, split, precision, batch size), reused by every run that leaves the image tower frozen.

    export LEANCLIP_FEATURE_CACHE=sweep/features      # what `leanclip sweep` sets for its cells
    got = encoder_features(model, test_set, 256, device=dev, precision="fp32")
    # -> (raw (N, E) fp32 on CPU, labels (N,)), or None (no cache, or the image tower trains)

What is stored is ``model.encode_image(images).float()`` per sample, before any normalisation or method head, so the
callers (``leanclip.trainer.evaluate``, ``leanclip.llu.cached_image_features``) apply exactly the operations they
apply to a fresh batch: a run reading the cache computes the same numbers as one that does not.

Key: sha256 of the image tower (its ``repr``, i.e. structure and hyper-parameters, lean or plain modules, plus every
state tensor's name, dtype, shape and bytes), of the dataset (``dataset_fingerprint``: paths, each image file's size
and mtime_ns, labels and the transform's repr), the autocast precision and the batch size. Changing any of them is a
different entry, so weights that change, and images rewritten in place, invalidate by construction; nothing is ever
served for other weights or other image bytes.

Trust: an entry is used only when it is what it claims to be. Each file records its key and the sha256 of its
tensors and metadata (``leanclip.utils.tensors_sha256``, written with them); a read checks both, and checks the
entry against the dataset asking for it: one row per sample, and the labels the dataset states. An entry that fails
any check (damaged, truncated, planted under another key, rows or labels that do not match) is discarded with a
one-line warning and recomputed, and the correct entry replaces it: recomputing costs one pass, while refusing
would stop a sweep over a file the cache can repair itself, and a wrong entry is never used either way. The digest
finds damage, not forgery (whoever can write the folder can write a matching digest), so the folder itself must be
private: it is created 0700 and one that another user owns or that group / others may write is refused
(``leanclip.synthetic.private_dir``, the synthetic-data cache's check), before any work.

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
from leanclip.features import encode_images
from leanclip.registry import method_hooks
from leanclip.synthetic import private_dir
from leanclip.training import dataset_labels, eval_loader

ENV_VAR = "LEANCLIP_FEATURE_CACHE"
EVENTS_NAME = "events.jsonl"

__all__ = ["ENV_VAR", "FeatureCache", "active_cache", "expected_entry", "image_tower_frozen",
           "image_tower_fingerprint", "encoder_pass", "encoder_features", "cached_batches", "count_events"]


_CACHE_VERSION = 2  # 2: entries record their key and sha256; the dataset key covers each image's size and mtime


class FeatureCache:
    """Directory of ``<sha256>.safetensors`` files, each holding the tensors of one (image tower, dataset, transform,
    precision, batch size) combination: the run's own folder (``leanclip.llu``) or the one a sweep shares
    (:func:`active_cache`), safe for concurrent processes (a lock per key, write-once) and counted (``events.jsonl``).
    Files are written atomically (temp file + ``os.replace``) with their key and digest; an entry that does not pass
    :meth:`load`'s checks is a miss and is rewritten. The folder must be private (module docstring). ``hits`` /
    ``misses`` count lookups of this instance."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def check_root(self) -> Path:
        """Create the folder (0700) if needed; ValueError when another user owns it or others may write to it."""
        private_dir(self.root, "feature cache")
        return self.root

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str, expect: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor] | None:
        """The entry's tensors, or None (a miss) when there is none or it fails a check: readable, its recorded key
        and sha256, and ``expect`` (:func:`expected_entry`: rows, labels). A failed check is one warning line."""
        from safetensors import safe_open

        p = self.path(key)
        if not p.is_file():
            return None
        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # truncated / foreign file: treat as a miss
            utils.get_logger().warning("feature cache: discarding unreadable %s (%s); recomputing it", p, e)
            return None
        problem = _entry_problem(key, tensors, metadata, expect or {})
        if problem:
            utils.get_logger().warning("feature cache: discarding %s: %s; recomputing it", p, problem)
            return None
        return tensors

    def save(self, key: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> Path:
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        metadata = {"leanclip_feature_cache": str(_CACHE_VERSION), "key": key, "meta": json.dumps(meta or {})}
        metadata["sha256"] = _entry_digest(tensors, metadata)
        return utils.atomic_write_bytes(self.path(key), save(tensors, metadata=metadata))

    def get_or_compute(self, key: str, compute: Callable[[], Mapping[str, torch.Tensor]],
                       meta: Mapping | None = None, expect: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """The entry of ``key``, or ``compute()`` written there: one process computes, the others wait and read
        (a lock per key); each pass and each reuse is a line of ``events.jsonl``."""
        self.check_root()
        with _locked(self.root / f"{key}.lock"):
            got = self.load(key, expect)
            if got is not None:
                self.hits += 1
                utils.append_jsonl(self.root / EVENTS_NAME, {"event": "hit", "key": key, **(meta or {})})
                return got
            self.misses += 1
            out = {k: v.detach().cpu().contiguous() for k, v in compute().items()}
            self.save(key, out, meta)
            utils.append_jsonl(self.root / EVENTS_NAME, {"event": "pass", "key": key, **(meta or {})})
            return out


def _entry_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """What an entry records as ``sha256``: its tensors and its other metadata strings."""
    rest = json.dumps(sorted((k, v) for k, v in metadata.items() if k != "sha256"))
    return utils.tensors_sha256(tensors, rest)


def expected_entry(dataset) -> dict:
    """What an entry of ``dataset``'s features must match: one row per sample, and the labels when the dataset
    states them (``leanclip.training.dataset_labels``)."""
    return {"rows": len(dataset), "labels": dataset_labels(dataset)}


def _entry_problem(key: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                   expect: Mapping[str, Any]) -> str | None:
    """Why an entry read for ``key`` cannot be used, or None."""
    if metadata.get("leanclip_feature_cache") != str(_CACHE_VERSION) or metadata.get("key") != key:
        return "it was not written for this key"
    if metadata.get("sha256") != _entry_digest(tensors, metadata):
        return "its contents do not match the sha256 recorded when it was written"
    rows = expect.get("rows")
    if rows is not None and any(t.dim() == 0 or t.shape[0] != rows for t in tensors.values()):
        return f"it holds {[tuple(t.shape) for t in tensors.values()]} rows, the dataset {rows} samples"
    labels = expect.get("labels")
    if labels is not None and not ("labels" in tensors and torch.equal(tensors["labels"].long().reshape(-1), labels)):
        return "its labels are not the dataset's"
    return None


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _file_identity(path) -> list | None:
    """``[size, mtime_ns]`` of an image file (None when it cannot be read): an image rewritten at the same path gets
    another dataset key, without reading every image's bytes at each lookup."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def dataset_fingerprint(dataset) -> str:
    """Identity of a dataset's sample list: paths, file sizes and mtimes + labels for ``ImageDataset``
    (``.samples``), image bytes + labels for ``TensorImageDataset`` (``.images``), and the transform's repr."""
    h = hashlib.sha256()
    h.update(type(dataset).__name__.encode())
    if hasattr(dataset, "samples"):
        for s in dataset.samples:
            path, label = (s.path, s.label) if hasattr(s, "path") else (s[0], s[1])
            h.update(json.dumps([os.path.abspath(os.fspath(path)), int(label), _file_identity(path)]).encode())
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


def active_cache() -> FeatureCache | None:
    """The cache ``$LEANCLIP_FEATURE_CACHE`` names (created 0700 if needed), or None when it is unset or empty;
    ValueError naming the variable when the folder is not private (another user's, or writable by others)."""
    root = os.environ.get(ENV_VAR)
    if not root:
        return None
    private_dir(root, f"feature cache ${ENV_VAR}")
    return FeatureCache(root)


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


def image_tower_fingerprint(model) -> str:
    """sha256 of the image tower's structure (``repr``) and state (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256(repr(model.visual).encode())
    for name, t in model.visual.state_dict().items():
        h.update(name.encode())
        _hash_tensor(h, t)
    return h.hexdigest()


@torch.no_grad()
def encoder_pass(model, dataset, batch_size: int, *, device, precision: str, num_workers: int = 0,
                 progress: bool = False, post: Callable | None = None):
    """One pass of the image tower over ``dataset`` in order (eval mode, no grad): ``encode_images`` per batch under
    autocast, then ``post`` (outside autocast) -> ``(features (N, E) on CPU, labels (N,) int64)``."""
    was = model.training
    model.eval()
    feats, labels = [], []
    try:
        for images, y in utils.track(eval_loader(dataset, batch_size, num_workers), "features", progress):
            with utils.autocast(device, precision):
                f = encode_images(model, images.to(device, non_blocking=True))
            feats.append((post(f) if post is not None else f).cpu())
            labels.append(torch.as_tensor(y).long().cpu())
    finally:
        model.train(was)
    if not feats:
        raise ValueError("image features: empty dataset")
    return torch.cat(feats), torch.cat(labels)


def encoder_features(model, dataset, batch_size: int, *, device, precision: str, num_workers: int = 0,
                     progress: bool = False, encoder_only: bool = False, cache: FeatureCache | None = None):
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

    out = cache.get_or_compute(key, compute, meta, expect=expected_entry(dataset))
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
