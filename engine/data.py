"""Data layer: image sources, CoOp split files, few-shot sampling, base-to-new splits, datasets and loaders.

Everything here is plain Python / torch (no Dassl). The protocols follow CoOp / CoCoOp, which CLIPFit and LLU reuse.

Sources
-------
``Sample(path, label, classname)``   one image record (``path`` as found on disk, ``label`` an int, ``classname`` text).
``ImageFolderSource(root)``          class-per-subfolder tree: sorted class folders, label = folder index.
``read_split_file(path, image_root)``CoOp ``split_zhou_<Name>.json``:
                                     ``{"train"|"val"|"test": [[relpath, label, classname], ...]}``.
``find_split_file(data_root, ds)``   -> ``(split_path, image_root)``; layouts below.
``load_dataset(data_root, ds)``      -> ``({"train", "val", "test"}, classnames)`` for every supported dataset.

Supported on-disk layouts (``<D>`` is the dataset folder)
--------------------------------------------------------
Split-file datasets (Caltech101, OxfordPets, StanfordCars, Flowers102, Food101, SUN397, DTD, EuroSAT, UCF101 and our
Synthetic). The split file is looked up, in this order, at::

    <data_root>/<coop_dir>/split_zhou_<Name>.json     CoOp layout, e.g. <root>/oxford_pets/split_zhou_OxfordPets.json
    <data_root>/<dataset as given>/split_zhou_<Name>.json
    <data_root>/split_zhou_<Name>.json               flat layout: data_root is the dataset folder

``<Name>`` is CoOp's file name (``OxfordFlowers`` for Flowers102, ``DescribableTextures`` for DTD) or our canonical name
(``Flowers102``, ``DTD``) or the name as given. Images are resolved relative to the first of ``<D>/<coop image dir>``
(e.g. ``oxford_pets/images``, ``caltech-101/101_ObjectCategories``, ``eurosat/2750``, ``stanford_cars`` itself),
``<D>/images``, ``<D>`` in which the first listed image exists.

Folder datasets as CoOp reads them (no split file): ``FGVCAircraft`` (``fgvc_aircraft/`` with ``variants.txt``,
``images_variant_{train,val,test}.txt``, ``images/<id>.jpg``), ``ImageNet`` (``imagenet/classnames.txt`` with
"<wnid> <name>" lines, ``images/train/<wnid>/``, ``images/val/<wnid>/``; val = test = images/val, as CoOp),
``ImageNetSketch`` (``imagenet-sketch/images/<wnid>/``), ``ImageNetA`` (``imagenet-adversarial/imagenet-a/<wnid>/``),
``ImageNetR`` (``imagenet-rendition/imagenet-r/<wnid>/``), ``ImageNetV2``
(``imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/``); each variant folder holds its own
``classnames.txt`` (CoOp copies ImageNet's). Test-only variants return empty train/val.

Protocols
---------
``few_shot(samples, shots, seed)``                       K per class, deterministic, local RNG.
``few_shot_cached(samples, shots, seed, cache_dir)``     the same, memoised as JSON (atomic write).
``subsample_classes(samples_by_split, which)``           CoOp base / new split, relabelled from 0.

Torch
-----
``ImageDataset(samples, transform)``, ``TensorImageDataset(images, labels, transform)``,
``clip_transform(size, train)``, ``make_loader(dataset, batch_size, shuffle, seed, ...)``,
``check_images(samples)`` -> (readable samples, BadImageError per unreadable one).

Untrusted input
---------------
Split files, list files, class-name files and image folders are read as hostile: every path they lead to must
resolve (``..`` and symlinks included) inside its image root unless ``allow_outside_root=True``; a malformed file is a
ValueError naming the file (and line or entry); an image that cannot be decoded is a `BadImageError` (ValueError)
naming its path, one line even when raised in a DataLoader worker.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import random
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .templates import canonical_dataset_name, clean_classname
from .utils import atomic_write_json

__all__ = [
    "Sample",
    "IMG_EXTENSIONS",
    "SPLITS",
    "DatasetInfo",
    "DATASET_INFO",
    "ImageFolderSource",
    "read_split_file",
    "write_split_json",
    "find_split_file",
    "load_dataset",
    "read_fgvc_aircraft",
    "read_imagenet_folders",
    "read_classnames_file",
    "BadImageError",
    "check_images",
    "classnames_from_samples",
    "few_shot",
    "few_shot_cached",
    "few_shot_cache_path",
    "subsample_classes",
    "ImageDataset",
    "TensorImageDataset",
    "clip_transform",
    "make_loader",
    "CLIP_MEAN",
    "CLIP_STD",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SPLITS = ("train", "val", "test")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip OPENAI_DATASET_MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # open_clip OPENAI_DATASET_STD
_MAX_REPORTED = 5  # how many missing images an error message lists


@dataclass(frozen=True, slots=True)
class Sample:
    """One image: `path` (as found / joined on disk), integer `label`, text `classname`."""

    path: str
    label: int
    classname: str


# ----------------------------------------------------------------------------------------------------------------------
# Dataset registry (CoOp folder names)


@dataclass(frozen=True)
class DatasetInfo:
    dataset_dir: str  # folder under the data root, as in CoOp
    image_dir: str  # image folder inside dataset_dir ("" = dataset_dir itself)
    split_name: str | None  # <Name> of split_zhou_<Name>.json; None = read from folders


DATASET_INFO: dict[str, DatasetInfo] = {
    "Caltech101": DatasetInfo("caltech-101", "101_ObjectCategories", "Caltech101"),
    "OxfordPets": DatasetInfo("oxford_pets", "images", "OxfordPets"),
    "StanfordCars": DatasetInfo("stanford_cars", "", "StanfordCars"),
    "Flowers102": DatasetInfo("oxford_flowers", "jpg", "OxfordFlowers"),
    "Food101": DatasetInfo("food-101", "images", "Food101"),
    "SUN397": DatasetInfo("sun397", "SUN397", "SUN397"),
    "DTD": DatasetInfo("dtd", "images", "DescribableTextures"),
    "EuroSAT": DatasetInfo("eurosat", "2750", "EuroSAT"),
    "UCF101": DatasetInfo("ucf101", "UCF-101-midframes", "UCF101"),
    "Synthetic": DatasetInfo("synthetic", "images", "Synthetic"),
    "FGVCAircraft": DatasetInfo("fgvc_aircraft", "images", None),
    "ImageNet": DatasetInfo("imagenet", "images", None),
    "ImageNetSketch": DatasetInfo("imagenet-sketch", "images", None),
    "ImageNetA": DatasetInfo("imagenet-adversarial", "imagenet-a", None),
    "ImageNetR": DatasetInfo("imagenet-rendition", "imagenet-r", None),
    "ImageNetV2": DatasetInfo("imagenetv2", "imagenetv2-matched-frequency-format-val", None),
}


def _canonical_or_none(dataset: str) -> str | None:
    try:
        return canonical_dataset_name(dataset)
    except KeyError:
        return None


# ----------------------------------------------------------------------------------------------------------------------
# Image folders


def _is_image(name: str, extensions: Sequence[str]) -> bool:
    return not name.startswith(".") and name.lower().endswith(tuple(extensions))


def _list_images(folder: str, extensions: Sequence[str], root: ImageRoot | None = None) -> list[str]:
    """All image files under `folder` (recursive, hidden entries skipped), sorted for determinism.

    Symlinked folders are followed, each real folder once (a link back up the tree would otherwise repeat it until
    the path is too long); with `root`, every file must resolve inside that image root (see `ImageRoot`)."""
    out = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if _is_image(f, extensions):
                path = os.path.join(dirpath, f)
                out.append(root.check(path, os.path.relpath(path, root.root), "file") if root else path)
    return out


def _require_dir(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{what} {path!r} is not a directory")


def _require_file(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path!r} is not a regular file")


def _read_text(path: str, what: str) -> str:
    """A data file's text. Undecodable or unreadable files are ValueErrors naming the file (the CLI prints them as
    one line) instead of a bare UnicodeDecodeError / PermissionError that does not say which file."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"cannot read {what} {path!r}: {e.strerror or e}") from None


def _read_json(path: str, what: str = "split file"):
    text = _read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path!r} is not valid JSON: {e}") from None
    except RecursionError:  # json's decoder recurses once per nesting level
        raise ValueError(f"{what} {path!r} nests too deeply to be a {what}") from None


def _read_lines(path: str, what: str) -> list[tuple[int, str]]:
    """(line number, stripped line) of the non-blank lines of a text list file."""
    return [(n, ln.strip()) for n, ln in enumerate(_read_text(path, what).splitlines(), 1) if ln.strip()]


class ImageRoot:
    """Resolves the image paths a data file names and keeps them inside one image root.

    A split file or list file comes from the internet as often as the images do, so the paths it names are untrusted:
    ``../``, an absolute path or a symlink must not make the engine read files outside the dataset (and train on or
    report them). A path counts as inside when its real path (``os.path.realpath``: symlinks and ``..`` resolved)
    lies under the real path of the root; the root itself may be a symlink. ``allow_outside=True`` switches the check
    off for layouts that point elsewhere on purpose. Real paths of directories are memoised, so the per-file cost is
    one ``lstat`` (ImageNet-size lists stay cheap).
    """

    def __init__(self, root: str, source: str, allow_outside: bool = False):
        self.root = root
        self.source = source  # e.g. "split file '/x/split_zhou_Pets.json'", for the error message
        self.allow_outside = allow_outside
        self._real_root = os.path.realpath(root)
        self._real_dirs: dict[str, str] = {}

    def join(self, rel: str, entry: str) -> str:
        """``join(root, rel)``, or ValueError naming the source, the entry, the path and the root."""
        return self.check(os.path.join(self.root, rel), rel, entry, absolute=os.path.isabs(rel))

    def check(self, full: str, rel: str, entry: str, *, absolute: bool = False) -> str:
        """`full` when it resolves inside the root (or outside is allowed); else the ValueError of `join`."""
        if self.allow_outside:
            return full
        if absolute or not self._inside(full):
            raise ValueError(
                f"{self.source}: {entry} path {rel!r} is outside the image root {self.root!r} (absolute, '..' or a "
                f"symlink leading out); pass allow_outside_root=True / --allow-outside-root if that is intended"
            )
        return full

    def _inside(self, full: str) -> bool:
        head, name = os.path.split(full)
        if name in ("", ".", ".."):
            real = os.path.realpath(full)
        else:
            real_head = self._real_dirs.get(head)
            if real_head is None:
                real_head = self._real_dirs[head] = os.path.realpath(head)
            real = os.path.join(real_head, name)
            if os.path.islink(real):
                real = os.path.realpath(real)
        return real == self._real_root or os.path.commonpath([real, self._real_root]) == self._real_root


class ImageFolderSource:
    """A class-per-subfolder tree: ``root/<class>/**/<image>``.

    Class folders are sorted by name and labelled 0..C-1; images are found recursively and sorted. `classnames` are
    the folder names cleaned with `clean_classname` (underscores -> spaces) unless ``clean_names=False``;
    `classname_map` (folder name -> class name, e.g. an ImageNet wnid -> "tench") overrides that per folder.

    Errors: FileNotFoundError for a missing root (naming it), ValueError when the root has no class folders or a class
    folder holds no image (naming the class), or when a symlink leads a file outside `root` (unless
    `allow_outside_root`: the folder may come from an archive as untrusted as a split file).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        extensions: Sequence[str] = IMG_EXTENSIONS,
        clean_names: bool = True,
        classname_map: Mapping[str, str] | None = None,
        ignore: Iterable[str] = (),
        allow_outside_root: bool = False,
    ):
        self.root = os.fspath(root)
        _require_dir(self.root, "image folder root")
        guard = ImageRoot(self.root, f"image folder {self.root!r}", allow_outside_root)
        ignore = set(ignore)
        folders = sorted(
            e.name
            for e in os.scandir(self.root)
            if e.is_dir() and not e.name.startswith(".") and e.name not in ignore
        )
        if not folders:
            raise ValueError(f"image folder root {self.root!r} has no class sub-folders")
        samples: list[Sample] = []
        classnames: list[str] = []
        for label, folder in enumerate(folders):
            if classname_map is not None and folder in classname_map:
                name = classname_map[folder]
            else:
                name = clean_classname(folder) if clean_names else folder
            files = _list_images(os.path.join(self.root, folder), extensions, guard)
            if not files:
                raise ValueError(
                    f"class folder {folder!r} in {self.root!r} holds no images (extensions {', '.join(extensions)})"
                )
            classnames.append(name)
            samples.extend(Sample(f, label, name) for f in files)
        self.class_folders: list[str] = folders
        self.classnames: list[str] = classnames
        self.samples: list[Sample] = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self):
        return iter(self.samples)

    def __repr__(self) -> str:
        return f"ImageFolderSource({self.root!r}, classes={len(self.classnames)}, samples={len(self.samples)})"


# ----------------------------------------------------------------------------------------------------------------------
# CoOp split files


def _check_label_names(pairs: Iterable[tuple[int, str]], where: str) -> dict[int, str]:
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
    _require_file(path, "split file")
    if image_root is None:
        base = os.path.dirname(os.path.abspath(path))
        image_root = os.path.join(base, "images") if os.path.isdir(os.path.join(base, "images")) else base
    image_root = os.fspath(image_root)
    raw = _read_json(path)
    return _parse_split(raw, path, image_root, check_exists, allow_outside_root)


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
        raise ValueError(f"{where} = {_short_repr(entry)} is not [relpath, int label, classname]")
    rel, label, name = entry
    if not rel or "\x00" in rel:
        raise ValueError(f"{where} has an empty path or one with a NUL byte: {rel!r}")
    if label < 0:
        raise ValueError(f"{where} has a negative label {label}")
    if not name.strip():
        raise ValueError(f"{where} has an empty class name")
    return rel, label, name


def _short_repr(value, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _parse_split(
    raw, path: str, image_root: str, check_exists: bool, allow_outside_root: bool = False
) -> dict[str, list[Sample]]:
    if not isinstance(raw, dict):
        raise ValueError(f"split file {path!r}: expected an object with train/val/test lists, got {type(raw).__name__}")
    for key in ("train", "test"):
        if key not in raw:
            raise ValueError(f"split file {path!r} has no {key!r} list (keys: {_short_repr(sorted(raw))})")
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
                if len(missing) < _MAX_REPORTED:
                    missing.append(full)
            samples.append(Sample(full, label, name))
            pairs.append((label, name))
        out[split] = samples
    if n_missing:
        raise FileNotFoundError(
            f"split file {path!r} lists {n_missing} image(s) missing under image root {image_root!r}, e.g. "
            + ", ".join(repr(m) for m in missing)
        )
    _check_label_names(pairs, f"split file {path!r}")
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


def _locate_split(data_root: str, dataset: str) -> tuple[tuple[str, str, dict] | None, list[str]]:
    """Find the split file and the image root -> ((split_path, image_root, parsed JSON) or None, paths tried)."""
    canonical = _canonical_or_none(dataset)
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
            raw = _read_json(p)
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


def _no_split_file(dataset: str, data_root: str, tried: list[str]) -> FileNotFoundError:
    return FileNotFoundError(f"no split file for dataset {dataset!r} under {data_root!r}; tried: " + ", ".join(tried))


def find_split_file(data_root: str | os.PathLike, dataset: str) -> tuple[str, str]:
    """Locate ``split_zhou_<Name>.json`` for `dataset` under `data_root` -> ``(split_path, image_root)``.

    See the module docstring for the layouts tried. FileNotFoundError lists every path tried.
    """
    data_root = os.fspath(data_root)
    _require_dir(data_root, "data root")
    found, tried = _locate_split(data_root, dataset)
    if found is None:
        raise _no_split_file(dataset, data_root, tried)
    return found[0], found[1]


def read_classnames_file(path: str | os.PathLike) -> dict[str, str]:
    """ImageNet-style ``classnames.txt``: lines "<folder> <class name with spaces>" -> ordered {folder: name}.

    ValueError naming the file and line for a line without a name, a folder listed twice, or no line at all."""
    path = os.fspath(path)
    _require_file(path, "class-names file")
    out: dict[str, str] = {}
    for n, line in _read_lines(path, "class-names file"):
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise ValueError(f"class-names file {path!r} line {n}: expected '<folder> <class name>', got "
                             f"{_short_repr(line)}")
        if parts[0] in out:
            raise ValueError(f"class-names file {path!r} line {n}: folder {parts[0]!r} is listed twice")
        out[parts[0]] = parts[1].strip()
    if not out:
        raise ValueError(f"class-names file {path!r} is empty")
    return out


def read_imagenet_folders(
    image_dir: str | os.PathLike, classnames_file: str | os.PathLike, *, allow_outside_root: bool = False
) -> list[Sample]:
    """CoOp's ImageNet / -Sketch / -A / -R reader: sorted <wnid> folders of `image_dir`, label = folder index,
    class name from `classnames_file` (every folder must be listed there: ValueError naming both otherwise).
    Files must resolve inside `image_dir` unless `allow_outside_root` (see `ImageFolderSource`)."""
    names = read_classnames_file(classnames_file)
    image_dir = os.fspath(image_dir)
    _require_dir(image_dir, "image folder")
    folders = sorted(e.name for e in os.scandir(image_dir) if e.is_dir() and not e.name.startswith("."))
    unknown = [f for f in folders if f not in names]
    if unknown:
        raise ValueError(
            f"{len(unknown)} folder(s) of {image_dir!r} are missing from class-names file "
            f"{os.fspath(classnames_file)!r}: {', '.join(unknown[:_MAX_REPORTED])}"
        )
    return ImageFolderSource(image_dir, classname_map=names, allow_outside_root=allow_outside_root).samples


def _read_imagenet_v2(image_dir: str, classnames_file: str, allow_outside_root: bool = False) -> list[Sample]:
    """ImageNetV2 (matched-frequency format): folders "0".."999" = labels in classnames.txt order."""
    names = list(read_classnames_file(classnames_file).values())
    _require_dir(image_dir, "image folder")
    guard = ImageRoot(image_dir, f"image folder {image_dir!r}", allow_outside_root)
    samples = []
    for label, name in enumerate(names):
        folder = os.path.join(image_dir, str(label))
        if os.path.isdir(folder):
            samples.extend(Sample(p, label, name) for p in _list_images(folder, IMG_EXTENSIONS, guard))
    if not samples:
        raise ValueError(f"no images under {image_dir!r} (expected folders 0..{len(names) - 1})")
    return samples


def _read_fgvc_variants(d: str) -> list[str]:
    vfile = os.path.join(d, "variants.txt")
    _require_file(vfile, "FGVCAircraft class list")
    classnames = [line for _, line in _read_lines(vfile, "FGVCAircraft class list")]
    if not classnames:
        raise ValueError(f"FGVCAircraft class list {vfile!r} is empty")
    if len(set(classnames)) != len(classnames):
        twice = sorted({c for c in classnames if classnames.count(c) > 1})
        raise ValueError(f"FGVCAircraft class list {vfile!r} lists {twice[:_MAX_REPORTED]} more than once")
    return classnames


def read_fgvc_aircraft(
    dataset_dir: str | os.PathLike, *, check_exists: bool = True, allow_outside_root: bool = False
) -> dict[str, list[Sample]]:
    """CoOp's FGVCAircraft reader: ``variants.txt`` gives labels (line order), ``images_variant_<split>.txt`` holds
    "<image id> <variant>" lines, images at ``images/<id>.jpg``. Image ids must resolve inside ``images/`` unless
    `allow_outside_root` (see `read_split_file`)."""
    d = os.fspath(dataset_dir)
    _require_dir(d, "FGVCAircraft folder")
    name2label = {c: i for i, c in enumerate(_read_fgvc_variants(d))}
    out: dict[str, list[Sample]] = {}
    missing: list[str] = []
    for split in SPLITS:
        lst = os.path.join(d, f"images_variant_{split}.txt")
        _require_file(lst, "FGVCAircraft split list")
        root = ImageRoot(os.path.join(d, "images"), f"FGVCAircraft split list {lst!r}", allow_outside_root)
        samples = []
        for n, line in _read_lines(lst, "FGVCAircraft split list"):
            parts = line.split(" ", 1)
            if len(parts) != 2 or parts[1] not in name2label or "\x00" in parts[0]:
                raise ValueError(f"FGVCAircraft split list {lst!r} line {n}: unknown variant in {_short_repr(line)}")
            p = root.join(parts[0] + ".jpg", f"line {n}")
            if check_exists and not os.path.isfile(p):
                missing.append(p)
            samples.append(Sample(p, name2label[parts[1]], parts[1]))
        out[split] = samples
    if missing:
        raise FileNotFoundError(
            f"FGVCAircraft lists {len(missing)} missing image(s), e.g. " + ", ".join(map(repr, missing[:_MAX_REPORTED]))
        )
    return out


def load_dataset(
    data_root: str | os.PathLike, dataset: str, *, check_exists: bool = True, allow_outside_root: bool = False
) -> tuple[dict[str, list[Sample]], list[str]]:
    """Load any supported dataset -> (``{"train", "val", "test"}`` Sample lists, classnames indexed by label).

    Split-file datasets (and any unknown name that has a ``split_zhou_<name>.json``) go through `find_split_file` /
    `read_split_file`; FGVCAircraft and the ImageNet family are read from folders as CoOp does (module docstring).
    Paths named by a split or list file, and files reached through symlinks in image folders, must stay inside
    the image root unless `allow_outside_root`.
    """
    data_root = os.fspath(data_root)
    _require_dir(data_root, "data root")
    canonical = _canonical_or_none(dataset)
    info = DATASET_INFO.get(canonical) if canonical else None
    if info is None or info.split_name is not None:
        found, tried = _locate_split(data_root, dataset)
        if found is None:
            raise _no_split_file(dataset, data_root, tried)
        path, image_root, raw = found
        splits = _parse_split(raw, path, image_root, check_exists, allow_outside_root)
        return splits, classnames_from_samples(splits)

    d = _first_dir([os.path.join(data_root, info.dataset_dir), data_root])
    outside = allow_outside_root
    if canonical == "FGVCAircraft":
        splits = read_fgvc_aircraft(d, check_exists=check_exists, allow_outside_root=outside)
        return splits, _read_fgvc_variants(d)
    cfile = os.path.join(d, "classnames.txt")
    if canonical == "ImageNet":
        train = read_imagenet_folders(os.path.join(d, info.image_dir, "train"), cfile, allow_outside_root=outside)
        test = read_imagenet_folders(os.path.join(d, info.image_dir, "val"), cfile, allow_outside_root=outside)
        splits = {"train": train, "val": test, "test": test}
    elif canonical == "ImageNetV2":
        splits = {"train": [], "val": [], "test": _read_imagenet_v2(os.path.join(d, info.image_dir), cfile, outside)}
    else:  # Sketch, A, R: test-only wnid folders
        test = read_imagenet_folders(os.path.join(d, info.image_dir), cfile, allow_outside_root=outside)
        splits = {"train": [], "val": [], "test": test}
    if canonical == "ImageNetV2":
        return splits, list(read_classnames_file(cfile).values())
    return splits, classnames_from_samples(splits)


def _first_dir(candidates: Sequence[str]) -> str:
    for c in candidates:
        if os.path.isdir(c):
            return c
    raise FileNotFoundError("none of these dataset folders exists: " + ", ".join(map(repr, candidates)))


# ----------------------------------------------------------------------------------------------------------------------
# Protocols


def _all_samples(samples_or_splits) -> list[Sample]:
    if isinstance(samples_or_splits, Mapping):
        return [s for v in samples_or_splits.values() for s in v]
    return list(samples_or_splits)


def classnames_from_samples(samples_or_splits) -> list[str]:
    """Class names indexed by label from a Sample list or a {split: samples} dict. Labels must be 0..C-1 with no gap
    and one name per label (ValueError otherwise)."""
    label2name = _check_label_names(((s.label, s.classname) for s in _all_samples(samples_or_splits)), "samples")
    if not label2name:
        raise ValueError("no samples")
    n = max(label2name) + 1
    if len(label2name) != n:  # labels come from data files: find the first gaps without walking range(n)
        gaps = list(itertools.islice((y for y in itertools.count() if y not in label2name), _MAX_REPORTED))
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


def _check_seed(seed) -> int:
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
    seed = _check_seed(seed)
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
    shots, seed = _check_shots(shots), _check_seed(seed)
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
    seed = _check_seed(seed)
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
    data = _read_json(path, "few-shot cache")
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
    label2name = _check_label_names(((s.label, s.classname) for v in splits.values() for s in v), "samples")
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


# ----------------------------------------------------------------------------------------------------------------------
# Torch datasets, transforms and loaders


def clip_transform(
    image_size: int | tuple[int, int],
    train: bool = False,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    flip: bool = True,
    randaugment: bool | str = False,
):
    """CLIP preprocessing that accepts a PIL image or a uint8/float CHW tensor (torchvision.transforms.v2).
    ``randaugment``: True or ``"torchvision"`` (torchvision's, colour operations included) or ``"albef"`` (ALBEF's
    colour-free N=2, M=7, LilT's: ``leanclip.albef_augment``).

    Eval (train=False): resize the short side to `image_size` (bicubic) + centre crop + [0,1] + normalize (as
    open_clip's preprocess on PIL input). Train: CoOp's random_resized_crop(scale) + random horizontal flip (+ RandAugment
    with ``randaugment``) + normalize;
    its randomness comes from torch's global RNG (seeded per worker by DataLoader, by torch.manual_seed in the main
    process).
    """
    from torchvision.transforms import InterpolationMode, v2

    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if train:
        geo = [v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True)]
        if flip:
            geo.append(v2.RandomHorizontalFlip())
    else:
        geo = [v2.Resize(min(size), interpolation=InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(size)]
    colour = [_randaugment(randaugment)] if train and randaugment else []
    return v2.Compose([*geo, v2.ToImage(), *colour, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(mean), list(std))])


def _randaugment(kind):
    from torchvision.transforms import v2

    if kind == "albef":
        from leanclip.albef_augment import AlbefRandAugment

        return AlbefRandAugment(2, 7)
    if kind in (True, "torchvision"):
        return v2.RandAugment()
    raise ValueError(f"randaugment must be False, True, 'torchvision' or 'albef', got {kind!r}")


def _to_float_chw(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


class BadImageError(ValueError):
    """An image file that cannot be read or decoded (truncated, not an image, unreadable, a directory, ...).

    The message is one line naming the path; `path` holds it. Inside a DataLoader worker, torch re-raises the error
    in the main process as ``BadImageError(<"Caught BadImageError in DataLoader worker process N. Original
    Traceback ...">)``; the constructor recognises that form and keeps the original line plus the worker, so the
    error still reads as one line naming the image (the full worker traceback stays in `worker_traceback`).
    """

    def __init__(self, message: str, path: str | None = None):
        message, self.worker_traceback = _unwrap_worker_message(str(message))
        super().__init__(message)
        self.path = path


def _unwrap_worker_message(message: str) -> tuple[str, str | None]:
    head, sep, trace = message.partition(".\nOriginal ")
    if not (sep and head.startswith(f"Caught {BadImageError.__name__} ")):
        return message, None
    lines = [ln for ln in trace.splitlines() if ln.strip()]
    tag = f"{BadImageError.__name__}: "
    last = lines[-1] if lines else ""
    original = last[last.index(tag) + len(tag):] if tag in last else last
    where = head[len(f"Caught {BadImageError.__name__} "):]
    return f"{original} ({where})", trace


# What PIL raises for files it cannot decode: OSError (unidentified / truncated / unreadable / a directory),
# SyntaxError and ValueError from format plugins on malformed headers, EOFError from short multi-frame files,
# DecompressionBombError (a plain Exception) for absurd sizes.
def _decode_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image

    return OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError


def _open_header(path: str) -> None:
    """Identify `path` as an image from its header, or BadImageError naming it."""
    from PIL import Image

    try:
        with Image.open(path):
            pass
    except _decode_errors() as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise BadImageError(f"cannot read image {path!r}: {reason}", path) from e


def _load_rgb(path: str, detail: str = ""):
    """Open and fully decode `path` as an RGB PIL image, or BadImageError naming it (`detail`: context after it)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except _decode_errors() as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise BadImageError(f"cannot read image {path!r}{detail}: {reason}", path) from e


def check_images(samples: Sequence[Sample], *, threads: int | None = None,
                 decode: bool = True) -> tuple[list[Sample], list[BadImageError]]:
    """Decode every image once -> (readable samples in input order, one BadImageError per unreadable one).
    ``decode=False`` reads only each file's header: it finds missing, unreadable and non-image files (a directory, a
    text file named ``.jpg``, an empty file) at the cost of one small read per file, but not a truncated image.

    The check is a full decode, the same `ImageDataset` does, not ``PIL.Image.verify``: verify reads no pixel data
    for JPEG, so a truncated JPEG passes it and would still fail mid-epoch. Dropping the bad images up front keeps a
    run deterministic (the same images in every epoch, whatever the worker count) at the cost of one extra read of
    the images used. Each distinct path is decoded once, on a thread pool (PIL releases the GIL while decoding).
    """
    samples = list(samples)
    paths = list(dict.fromkeys(s.path for s in samples))

    def probe(path: str) -> BadImageError | None:
        try:
            _load_rgb(path) if decode else _open_header(path)
        except BadImageError as e:
            return e
        return None

    n_threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        errors = dict(zip(paths, pool.map(probe, paths)))
    bad = [e for e in errors.values() if e is not None]
    return [s for s in samples if errors[s.path] is None], bad


class ImageDataset(Dataset):
    """Samples -> (image, label). Images are loaded with PIL and converted to RGB; `transform` (e.g. `clip_transform`
    or open_clip's preprocess) gets the PIL image. Without a transform the image is a float32 CHW tensor in [0,1].
    A file that cannot be read or decoded raises `BadImageError` (a ValueError) naming the path and the sample."""

    def __init__(self, samples: Sequence[Sample], transform: Callable | None = None):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        img = _load_rgb(s.path, f" (sample {i}, class {s.classname!r})")
        if self.transform is not None:
            return self.transform(img), s.label
        arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return _to_float_chw(arr), s.label

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]


class TensorImageDataset(Dataset):
    """In-memory images (N×3×H×W uint8 or float tensor / array, or N×H×W×3 uint8 array) + int labels.

    Without `transform` an item is (float32 CHW in [0,1] — uint8 is divided by 255, float kept, label). With a
    transform, the transform gets the stored CHW tensor as is (uint8 stays uint8: `clip_transform` handles both).
    """

    def __init__(self, images, labels, transform: Callable | None = None):
        images = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
        if images.dim() != 4:
            raise ValueError(f"images must be N×3×H×W (or N×H×W×3), got shape {tuple(images.shape)}")
        if images.shape[1] != 3 and images.shape[-1] == 3:
            images = images.permute(0, 3, 1, 2)
        if images.shape[1] != 3:
            raise ValueError(f"images must have 3 channels, got shape {tuple(images.shape)}")
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels.numel() != images.shape[0]:
            raise ValueError(f"labels has {labels.numel()} entries for {images.shape[0]} images")
        self.images = images.contiguous()
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        x = self.images[i]
        x = self.transform(x) if self.transform is not None else _to_float_chw(x)
        return x, int(self.labels[i])


def _seed_worker(worker_id: int) -> None:  # runs inside each worker process only
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


@contextlib.contextmanager
def _seeded_rngs(seed: int):
    """Seed torch's CPU RNG, numpy's and ``random``'s from ``seed`` for the body, then put the caller's states back
    (so loading an item in the main process leaves the trainer's RNG streams as they were)."""
    saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        np.random.set_state(saved[1])
        random.setstate(saved[2])


class _SeededOrder(torch.utils.data.Sampler):
    """Yields ``(index, item_seed)``: the order of pass ``e`` is a permutation drawn from ``derive_seed(seed, e)``
    (or ``range(n)`` without shuffling) and ``item_seed = derive_seed(seed, e, index)``. With ``epoch`` fixed every
    ``iter()`` gives the same pass, however often it is called; with ``epoch=None`` pass ``e`` is the e-th iteration
    that was actually started (a generator: an iterator made and dropped unused does not count)."""

    def __init__(self, n: int, seed: int, shuffle: bool, epoch: int | None = None):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, epoch
        self._passes = 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        from .utils import derive_seed

        epoch = self.epoch
        if epoch is None:
            epoch, self._passes = self._passes, self._passes + 1
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch)))
            order = order.tolist()
        else:
            order = range(self.n)
        for i in order:
            yield i, derive_seed(self.seed, epoch, i)


class _SeededItems(Dataset):
    """``dataset[index]`` computed under RNGs seeded from the item's own seed (``_SeededOrder``): a random
    augmentation of item i in pass e is the same whichever process loads it, so the run does not depend on the
    worker count, on which worker gets which batch, or on what else drew from the RNGs."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with _seeded_rngs(seed):
            return self.dataset[index]


class ItemSeeds(torch.utils.data.Sampler):
    """Gives the indices of another sampler (e.g. a ``DistributedSampler`` at its epoch) their item seeds,
    ``(index, derive_seed(seed, epoch, index))``, for a dataset wrapped with :func:`seeded_dataset`: then a random
    augmentation depends on the item and the pass only, not on the worker count or the global RNG."""

    def __init__(self, sampler, seed: int, epoch: int):
        self.sampler, self.seed, self.epoch = sampler, _check_seed(seed), _check_seed(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        from .utils import derive_seed

        for i in self.sampler:
            yield i, derive_seed(self.seed, self.epoch, i)


def seeded_dataset(dataset: Dataset) -> Dataset:
    """``dataset`` read by ``(index, item_seed)`` keys (:class:`ItemSeeds`), each item under RNGs seeded from its
    seed (the caller's RNG states restored afterwards)."""
    return _SeededItems(dataset)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
    *,
    epoch: int | None = None,
    pin_memory: bool = False,
    collate_fn: Callable | None = None,
    persistent_workers: bool | None = None,
) -> DataLoader:
    """A DataLoader whose batches, and every random augmentation inside them, are a function of ``(seed, epoch,
    index)`` only: not of the worker count, of how often ``iter()`` is called, or of the global RNG.

    The batch order of a pass is a permutation drawn from ``(seed, epoch)``; each item is loaded under torch / numpy
    / ``random`` RNGs seeded from ``(seed, epoch, index)`` (the caller's RNG states are restored afterwards, the
    workers' base seeds come from the loader's own generator, so the global RNG is never drawn from). ``epoch``:
    the pass to produce on every ``iter()`` (what a trainer passes); None: iteration e of this loader is pass e."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    seed = _check_seed(seed)
    if epoch is not None:
        epoch = _check_seed(epoch)
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    return DataLoader(
        _SeededItems(dataset),
        batch_size=batch_size,
        sampler=_SeededOrder(len(dataset), seed, shuffle, epoch),
        num_workers=num_workers,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
        persistent_workers=persistent_workers,
    )
