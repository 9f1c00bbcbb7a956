"""The protocols on samples: class names from samples, K-shot sampling per class with a seed (and its JSON
cache, atomic and keyed by the samples), CoOp's base / new class split."""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from leanclip.data.records import Sample, MAX_REPORTED
from leanclip.data.sources import read_json
from leanclip.data.splits import check_label_names
from leanclip.utils import atomic_write_json


# ----------------------------------------------------------------------------------------------------------------------
# Protocols


def _all_samples(samples_or_splits) -> list[Sample]:
    if isinstance(samples_or_splits, Mapping):
        return [s for v in samples_or_splits.values() for s in v]
    return list(samples_or_splits)


def classnames_from_samples(samples_or_splits) -> list[str]:
    """Class names indexed by label from a Sample list or a {split: samples} dict. Labels must be 0..C-1 with no gap
    and one name per label (ValueError otherwise)."""
    label2name = check_label_names(((s.label, s.classname) for s in _all_samples(samples_or_splits)), "samples")
    if not label2name:
        raise ValueError("no samples")
    n = max(label2name) + 1
    if len(label2name) != n:  # labels come from data files: find the first gaps without walking range(n)
        gaps = list(itertools.islice((y for y in itertools.count() if y not in label2name), MAX_REPORTED))
        raise ValueError(f"labels are not contiguous 0..{n - 1}: no sample for label(s) {gaps}")
    return [label2name[y] for y in range(n)]


def check_classes(classnames: Sequence[str], what: str) -> None:
    """ValueError naming ``what`` (a split, a subsample, an argument) when it holds fewer than 2 classes: with one
    class every prediction is right (100% top-1) and the loss has nothing to separate, so a run on it would report
    a number that means nothing."""
    if len(classnames) < 2:
        names = ", ".join(repr(c) for c in classnames) or "none"
        raise ValueError(f"{what} has {len(classnames)} class ({names}): classification needs at least 2")


def _check_shots(shots) -> int:
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)):
        raise TypeError(f"shots must be a positive int, got {shots!r}")
    if shots < 1:
        raise ValueError(f"shots must be a positive int, got {shots}")
    return int(shots)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return int(seed)


def few_shot(samples: Sequence[Sample], shots: int, seed: int) -> list[Sample]:
    """K = `shots` samples per class, chosen without replacement by a local ``random.Random(seed)``.

    Deterministic for (sample set, shots, seed), independent of the input order: classes are visited in sorted label
    order and each class's candidates are sorted by path before ``rng.sample``. Output: classes in label order, each
    class's picks sorted by path. A class with fewer than K samples is a ValueError naming it and its size (CoOp
    would silently keep fewer).
    """
    shots = _check_shots(shots)
    seed = check_seed(seed)
    by_label: dict[int, list[Sample]] = {}
    for s in samples:
        by_label.setdefault(s.label, []).append(s)
    if not by_label:
        raise ValueError("few_shot got no samples")
    rng = random.Random(seed)
    out: list[Sample] = []
    for label in sorted(by_label):
        items = sorted(by_label[label], key=lambda s: s.path)
        if len(items) < shots:
            raise ValueError(
                f"class {items[0].classname!r} (label {label}) has only {len(items)} sample(s), "
                f"fewer than shots={shots}"
            )
        out.extend(sorted(rng.sample(items, shots), key=lambda s: s.path))
    return out


def _relpaths(paths: Sequence[str]) -> list[str]:
    """Paths relative to their longest common directory (so a cache survives moving the data root)."""
    if not paths:
        return []
    prefix = os.path.commonprefix([min(paths), max(paths)])
    cut = prefix.rfind(os.sep) + 1 if os.sep in prefix else 0
    if len(paths) == 1:
        cut = paths[0].rfind(os.sep) + 1
    return [p[cut:] for p in paths]


_CACHE_VERSION = 1


def few_shot_cache_path(samples: Sequence[Sample], shots: int, seed: int, cache_dir: str | os.PathLike) -> str:
    """Where `few_shot_cached` keeps the selection for these arguments."""
    shots, seed = _check_shots(shots), check_seed(seed)
    return _cache_file(cache_dir, shots, seed, _cache_key(list(samples), shots, seed))


def _cache_file(cache_dir, shots: int, seed: int, key: str) -> str:
    return os.path.join(os.fspath(cache_dir), f"fewshot_{shots}shot_seed{seed}_{key[:16]}.json")


def _cache_key(samples: Sequence[Sample], shots: int, seed: int, rel: list[str] | None = None) -> str:
    if rel is None:
        rel = _relpaths([s.path for s in samples])
    items = sorted(zip(rel, (int(s.label) for s in samples), (s.classname for s in samples)))
    h = hashlib.sha256()
    h.update(json.dumps({"v": _CACHE_VERSION, "shots": shots, "seed": seed}).encode())
    for r, y, c in items:
        h.update(json.dumps([r, y, c]).encode())
        h.update(b"\n")
    return h.hexdigest()


def few_shot_cached(
    samples: Sequence[Sample], shots: int, seed: int, cache_dir: str | os.PathLike
) -> list[Sample]:
    """`few_shot`, memoised in ``cache_dir/fewshot_<K>shot_seed<S>_<hash>.json``.

    The key hashes the sample list (paths relative to their common folder, labels, class names; order-independent),
    shots and seed. The file stores the chosen relpaths + labels; it is written atomically (temp file + os.replace).
    A present, valid file is re-used; a corrupt or inconsistent one is regenerated (RuntimeWarning).
    """
    shots = _check_shots(shots)
    seed = check_seed(seed)
    samples = list(samples)
    rel = _relpaths([s.path for s in samples])
    key = _cache_key(samples, shots, seed, rel)
    path = _cache_file(cache_dir, shots, seed, key)
    if os.path.exists(path):
        try:
            chosen = _load_cached_selection(path, key, shots, samples, rel)
        except (OSError, ValueError, KeyError, TypeError) as e:
            warnings.warn(f"few-shot cache {path!r} is unusable ({e}); regenerating", RuntimeWarning, stacklevel=2)
        else:
            return chosen
    chosen = few_shot(samples, shots, seed)
    index = {id(s): r for s, r in zip(samples, rel)}
    data = {
        "version": _CACHE_VERSION,
        "key": key,
        "shots": shots,
        "seed": seed,
        "n_samples": len(samples),
        "items": [[index[id(s)], int(s.label)] for s in chosen],
    }
    atomic_write_json(path, data, indent=None)
    return chosen


def _load_cached_selection(path, key, shots, samples, rel) -> list[Sample]:
    data = read_json(path, "few-shot cache")
    if not isinstance(data, dict) or data.get("key") != key or data.get("version") != _CACHE_VERSION:
        raise ValueError("key/version mismatch")
    by_rel = {(r, int(s.label)): s for s, r in zip(samples, rel)}
    chosen = [by_rel[(r, int(y))] for r, y in data["items"]]
    counts: dict[int, int] = {}
    for s in chosen:
        counts[s.label] = counts.get(s.label, 0) + 1
    labels = {s.label for s in samples}
    if set(counts) != labels or any(c != shots for c in counts.values()) or len(set(map(id, chosen))) != len(chosen):
        raise ValueError("selection does not hold exactly `shots` distinct samples of every class")
    return chosen


def subsample_classes(samples_by_split, which: str = "all"):
    """CoOp base-to-new class split -> ``(samples_by_split, classnames)``.

    The labels present (over all splits) are sorted; base = the first ceil(n/2), new = the rest; the kept classes are
    relabelled 0..m-1 in that order and `classnames[i]` is the name of new label i. ``which="all"`` keeps every class
    (relabelled the same way, i.e. unchanged when the labels are already 0..n-1). Accepts a {split: samples} dict
    (returns a dict with the same keys) or a single Sample list (returns a list). ValueError for another `which`
    or when the requested half is empty.
    """
    if which not in ("all", "base", "new"):
        raise ValueError(f"which must be 'all', 'base' or 'new', got {which!r}")
    single = not isinstance(samples_by_split, Mapping)
    splits = {"_": list(samples_by_split)} if single else {k: list(v) for k, v in samples_by_split.items()}
    label2name = check_label_names(((s.label, s.classname) for v in splits.values() for s in v), "samples")
    labels = sorted(label2name)
    m = math.ceil(len(labels) / 2)
    selected = labels if which == "all" else labels[:m] if which == "base" else labels[m:]
    if not selected:
        raise ValueError(f"subsample_classes(which={which!r}) selects no class out of {len(labels)}")
    relabel = {y: i for i, y in enumerate(selected)}
    def move(s: Sample) -> Sample:
        return s if relabel[s.label] == s.label else Sample(s.path, relabel[s.label], s.classname)

    out = {k: [move(s) for s in v if s.label in relabel] for k, v in splits.items()}
    classnames = [label2name[y] for y in selected]
    return (out["_"] if single else out), classnames
