"""CoOp split files (``split_zhou_<Name>.json``): reading, writing, and finding one under a data root in
the layouts ``leanclip.data`` documents."""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

from leanclip.data.records import DATASET_INFO, SPLITS, Sample, MAX_REPORTED, canonical_or_none
from leanclip.data.sources import ImageRoot, read_json, require_dir, require_file
from leanclip.utils import atomic_write_json


# ----------------------------------------------------------------------------------------------------------------------
# CoOp split files


def check_label_names(pairs: Iterable[tuple[int, str]], where: str) -> dict[int, str]:
    """label -> classname, checking the map is one-to-one."""
    label2name: dict[int, str] = {}
    name2label: dict[str, int] = {}
    for label, name in pairs:
        old = label2name.setdefault(label, name)
        if old != name:
            raise ValueError(f"{where}: label {label} is used for two class names, {old!r} and {name!r}")
        old_label = name2label.setdefault(name, label)
        if old_label != label:
            raise ValueError(f"{where}: class name {name!r} has two labels, {old_label} and {label}")
    return label2name


def read_split_file(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    check_exists: bool = True,
    allow_outside_root: bool = False,
) -> dict[str, list[Sample]]:
    """Parse a CoOp ``split_zhou_<Name>.json`` into ``{"train": [...], "val": [...], "test": [...]}`` of Samples.

    Entries are ``[relpath, label, classname]``; ``Sample.path = join(image_root, relpath)``. `image_root` defaults to
    ``<dir of the file>/images`` when that folder exists, else the file's folder. A missing "val" key reads as an empty
    split; "train" and "test" are required. Checks, each a ValueError naming the file: text that is not UTF-8 JSON (or
    nests too deeply to parse), the structure, int labels >= 0, one class name per label and one label per class name,
    and every relpath resolving inside `image_root` (see `ImageRoot`; ``allow_outside_root=True`` lifts that). With
    `check_exists`, every image must exist (FileNotFoundError naming the split file, the number missing and the first
    few).
    """
    path = os.fspath(path)
    require_file(path, "split file")
    if image_root is None:
        base = os.path.dirname(os.path.abspath(path))
        image_root = os.path.join(base, "images") if os.path.isdir(os.path.join(base, "images")) else base
    image_root = os.fspath(image_root)
    raw = read_json(path)
    return parse_split(raw, path, image_root, check_exists, allow_outside_root)


def _split_entry(entry, where: str) -> tuple[str, int, str]:
    """Validate one ``[relpath, label, classname]`` entry (``where`` names it in the error)."""
    if (
        not isinstance(entry, (list, tuple))
        or len(entry) != 3
        or not isinstance(entry[0], str)
        or isinstance(entry[1], bool)
        or not isinstance(entry[1], int)
        or not isinstance(entry[2], str)
    ):
        raise ValueError(f"{where} = {short_repr(entry)} is not [relpath, int label, classname]")
    rel, label, name = entry
    if not rel or "\x00" in rel:
        raise ValueError(f"{where} has an empty path or one with a NUL byte: {rel!r}")
    if label < 0:
        raise ValueError(f"{where} has a negative label {label}")
    if not name.strip():
        raise ValueError(f"{where} has an empty class name")
    return rel, label, name


def short_repr(value, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_split(
    raw, path: str, image_root: str, check_exists: bool, allow_outside_root: bool = False
) -> dict[str, list[Sample]]:
    if not isinstance(raw, dict):
        raise ValueError(f"split file {path!r}: expected an object with train/val/test lists, got {type(raw).__name__}")
    for key in ("train", "test"):
        if key not in raw:
            raise ValueError(f"split file {path!r} has no {key!r} list (keys: {short_repr(sorted(raw))})")
    root = ImageRoot(image_root, f"split file {path!r}", allow_outside_root)
    out: dict[str, list[Sample]] = {}
    pairs: list[tuple[int, str]] = []
    missing: list[str] = []
    n_missing = 0
    for split in SPLITS:
        entries = raw.get(split, [])
        if not isinstance(entries, list):
            raise ValueError(f"split file {path!r}: {split!r} must be a list, got {type(entries).__name__}")
        samples = []
        for i, entry in enumerate(entries):
            rel, label, name = _split_entry(entry, f"split file {path!r}: {split}[{i}]")
            full = root.join(rel, f"{split}[{i}]")
            if check_exists and not os.path.isfile(full):
                n_missing += 1
                if len(missing) < MAX_REPORTED:
                    missing.append(full)
            samples.append(Sample(full, label, name))
            pairs.append((label, name))
        out[split] = samples
    if n_missing:
        raise FileNotFoundError(
            f"split file {path!r} lists {n_missing} image(s) missing under image root {image_root!r}, e.g. "
            + ", ".join(repr(m) for m in missing)
        )
    check_label_names(pairs, f"split file {path!r}")
    return out


def write_split_json(
    path: str | os.PathLike, samples_by_split: Mapping[str, Sequence[Sample]], image_root: str | os.PathLike
) -> str:
    """Write a CoOp split file (relpaths relative to `image_root`), atomically. Returns the path."""
    image_root = os.fspath(image_root)
    data = {
        split: [[os.path.relpath(s.path, image_root), int(s.label), s.classname] for s in samples]
        for split, samples in ((k, samples_by_split.get(k, ())) for k in SPLITS)
    }
    atomic_write_json(path, data, indent=None)
    return os.fspath(path)


def _split_file_names(dataset: str, canonical: str | None) -> list[str]:
    names = []
    if canonical is not None and DATASET_INFO.get(canonical) and DATASET_INFO[canonical].split_name:
        names.append(DATASET_INFO[canonical].split_name)
    if canonical is not None:
        names.append(canonical)
    names.append(dataset)
    return [f"split_zhou_{n}.json" for n in dict.fromkeys(names)]


def locate_split(data_root: str, dataset: str) -> tuple[tuple[str, str, dict] | None, list[str]]:
    """Find the split file and the image root -> ((split_path, image_root, parsed JSON) or None, paths tried)."""
    canonical = canonical_or_none(dataset)
    info = DATASET_INFO.get(canonical) if canonical else None
    dirs = []
    if info is not None:
        dirs.append(os.path.join(data_root, info.dataset_dir))
    dirs += [os.path.join(data_root, dataset), data_root]
    tried = []
    for d in dict.fromkeys(dirs):
        for fname in _split_file_names(dataset, canonical):
            p = os.path.join(d, fname)
            tried.append(p)
            if not os.path.isfile(p):
                continue
            raw = read_json(p)
            first = None
            if isinstance(raw, dict):
                for split in SPLITS:
                    entries = raw.get(split)
                    if isinstance(entries, list) and entries and isinstance(entries[0], (list, tuple)) and entries[0]:
                        first = entries[0][0]
                        break
            roots = []
            if info is not None:
                roots.append(os.path.join(d, info.image_dir) if info.image_dir else d)
            roots += [os.path.join(d, "images"), d]
            roots = [r for r in dict.fromkeys(os.path.normpath(r) for r in roots) if os.path.isdir(r)]
            chosen = roots[0] if roots else d
            if isinstance(first, str):
                for r in roots:
                    if "\x00" not in first and os.path.isfile(os.path.join(r, first)):
                        chosen = r
                        break
            return (p, chosen, raw), tried
    return None, tried


def no_split_file(dataset: str, data_root: str, tried: list[str]) -> FileNotFoundError:
    return FileNotFoundError(f"no split file for dataset {dataset!r} under {data_root!r}; tried: " + ", ".join(tried))


def find_split_file(data_root: str | os.PathLike, dataset: str) -> tuple[str, str]:
    """Locate ``split_zhou_<Name>.json`` for `dataset` under `data_root` -> ``(split_path, image_root)``.

    See the module docstring for the layouts tried. FileNotFoundError lists every path tried.
    """
    data_root = os.fspath(data_root)
    require_dir(data_root, "data root")
    found, tried = locate_split(data_root, dataset)
    if found is None:
        raise no_split_file(dataset, data_root, tried)
    return found[0], found[1]
