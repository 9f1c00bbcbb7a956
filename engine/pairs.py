"""Image–text pair data for contrastive alignment (LilT / LiT) and retrieval evaluation.

    pairs = load_pairs("captions.csv")                      # columns image, caption (one pair per row)
    pairs = load_pairs("train.jsonl", root="/data/imgs")    # {"image": ..., "caption": "..." | ["...", ...]} per line
    pairs = load_pairs("dataset_coco.json", split="test")   # Karpathy split file / COCO captions / list of entries
    pairs = synthetic_pairs(512, size=32, seed=0)            # procedural images + captions (tests, smoke runs)
    ds = PairDataset(pairs, transform)                       # item j: (image tensor of caption j, caption j)

A ``PairSet`` holds unique images (paths or in-memory CHW tensors), every caption and ``txt_to_img`` (the image of
each caption): rows naming the same image file are grouped, so COCO-style data (5 captions per image) trains on
every (image, caption) pair and evaluates retrieval on unique images against all captions.

Relative image paths are resolved against ``root`` when given, else against the folder of the annotation file.
Errors name the file and the line (CSV/JSONL) or entry (JSON): a missing image file (FileNotFoundError), an empty
caption or a missing column/key (ValueError).

JSON layouts understood by ``read_pairs_json``:

- Karpathy split file: ``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"} | {"tokens"}]}]}``;
  ``split="train"`` also takes ``restval`` (the usual Karpathy training set);
- COCO captions: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``;
- a list of entries ``[{"image", "caption": str | [str, ...], "split"?}]`` (ALBEF / LilT annotation files).
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from leanclip.data import ImageRoot
from leanclip.synthetic import make_caption_corpus

__all__ = ["PairSet", "PairDataset", "ImageListDataset", "load_pairs", "read_pairs_csv", "read_pairs_jsonl",
           "read_pairs_json", "synthetic_pairs", "from_lists"]

IMAGE_KEY, CAPTION_KEY = "image", "caption"
TRAIN_SPLIT_ALIASES = {"train": ("train", "restval")}


@dataclass
class PairSet:
    """Unique ``images`` (path strings or CHW tensors), all ``captions`` and ``txt_to_img`` (image index of each
    caption). ``len()`` is the number of captions, i.e. of (image, caption) training pairs."""

    images: list
    captions: list[str]
    txt_to_img: list[int]
    source: str | None = None
    where: list[str] = field(default_factory=list)  # per caption: "file, line N" (for error messages)

    def __post_init__(self):
        if len(self.captions) != len(self.txt_to_img):
            raise ValueError(f"{len(self.captions)} captions but {len(self.txt_to_img)} txt_to_img entries")
        n = len(self.images)
        for j, i in enumerate(self.txt_to_img):
            if not 0 <= int(i) < n:
                raise ValueError(f"txt_to_img[{j}]={i} is not an image index in [0, {n})")
        counts = np.bincount(np.asarray(self.txt_to_img, dtype=np.int64), minlength=n) if n else np.zeros(0)
        if n and (counts == 0).any():
            raise ValueError(f"image {int(np.flatnonzero(counts == 0)[0])} has no caption")
        for j, c in enumerate(self.captions):
            if not isinstance(c, str) or not c.strip():
                raise ValueError(f"empty caption ({self._where(j)})")

    def _where(self, j: int) -> str:
        return self.where[j] if j < len(self.where) else f"caption {j}"

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def img_to_txt(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.images]
        for j, i in enumerate(self.txt_to_img):
            out[i].append(j)
        return out

    def subset_images(self, indices: Sequence[int]) -> "PairSet":
        """The images ``indices`` (in that order) with all their captions."""
        idx = [int(i) for i in indices]
        remap = {old: new for new, old in enumerate(idx)}
        if len(remap) != len(idx):
            raise ValueError("subset_images: repeated image index")
        caps, t2i, where = [], [], []
        for j, i in enumerate(self.txt_to_img):
            if i in remap:
                caps.append(self.captions[j])
                t2i.append(remap[i])
                where.append(self._where(j))
        return PairSet([self.images[i] for i in idx], caps, t2i, self.source, where)

    def subset(self, n_pairs: int, seed: int = 0) -> "PairSet":
        """A seeded random subset of ``n_pairs`` (image, caption) pairs (every pair if there are fewer), for
        data-scaling runs: the same ``(n_pairs, seed)`` gives the same pairs; a smaller ``n_pairs`` gives a subset of
        a larger one's pairs."""
        if isinstance(n_pairs, bool) or not isinstance(n_pairs, int) or n_pairs < 1:
            raise ValueError(f"n_pairs must be a positive int, got {n_pairs!r}")
        order = np.random.default_rng(seed).permutation(len(self))[:n_pairs]
        keep = sorted(int(j) for j in order)
        images = sorted({int(self.txt_to_img[j]) for j in keep})
        remap = {old: new for new, old in enumerate(images)}
        return PairSet([self.images[i] for i in images], [self.captions[j] for j in keep],
                       [remap[int(self.txt_to_img[j])] for j in keep], self.source, [self._where(j) for j in keep])

    def __repr__(self) -> str:
        return (f"PairSet({self.num_images} images, {len(self)} captions"
                + (f", from {self.source!r}" if self.source else "") + ")")


# ----------------------------------------------------------------------------------------------------------- builders
class _Builder:
    def __init__(self, source: str, root: str, check_exists: bool, allow_outside_root: bool = False):
        self.source, self.root, self.check = source, root, check_exists
        # image paths of a pair file are untrusted: they must stay inside the image root (leanclip.data.ImageRoot)
        self.inside = ImageRoot(root, f"pair file {source!r}", allow_outside_root)
        self.images: list = []
        self.index: dict = {}
        self.captions: list[str] = []
        self.t2i: list[int] = []
        self.where: list[str] = []

    def add(self, image, captions, where: str) -> None:
        if image is None or (isinstance(image, str) and not image.strip()):
            raise ValueError(f"{where}: empty image path")
        if not isinstance(image, str):
            raise ValueError(f"{where}: image must be a path string, got {type(image).__name__}")
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(captions, (list, tuple)) or not captions:
            raise ValueError(f"{where}: empty caption")
        for c in captions:
            if not isinstance(c, str):
                raise ValueError(f"{where}: caption must be a string, got {type(c).__name__}")
            if not c.strip():
                raise ValueError(f"{where}: empty caption")
        if "\x00" in image:
            raise ValueError(f"{where}: image path holds a NUL byte")
        path = os.path.normpath(self.inside.join(image, where))
        i = self.index.get(path)
        if i is None:
            if self.check and not os.path.isfile(path):
                raise FileNotFoundError(f"{where}: image file not found: {path}")
            i = self.index[path] = len(self.images)
            self.images.append(path)
        for c in captions:
            self.captions.append(" ".join(c.split()))
            self.t2i.append(i)
            self.where.append(where)

    def build(self, what: str = "") -> PairSet:
        if not self.captions:
            raise ValueError(f"{self.source}: no image-caption pairs{what}")
        return PairSet(self.images, self.captions, self.t2i, self.source, self.where)


def _root_of(path: str, root) -> str:
    if root is not None:
        root = os.path.expanduser(os.fspath(root))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image root {root!r} is not a directory")
        return root
    return os.path.dirname(os.path.abspath(path))


def _check_file(path) -> str:
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such annotation file: {path!r}")
    return path


# ----------------------------------------------------------------------------------------------------------- readers
def read_pairs_csv(path, root=None, *, image_key: str = IMAGE_KEY, caption_key: str = CAPTION_KEY,
                   check_exists: bool = True, delimiter: str | None = None,
                   allow_outside_root: bool = False) -> PairSet:
    """One pair per row of a CSV (TSV for ``.tsv``) file with a header naming ``image_key`` and ``caption_key``."""
    path = _check_file(path)
    if delimiter is None:
        delimiter = "\t" if path.lower().endswith(".tsv") else ","
    b = _Builder(path, _root_of(path, root), check_exists, allow_outside_root)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        cols = reader.fieldnames or []
        for key in (image_key, caption_key):
            if key not in cols:
                raise ValueError(f"{path}: missing column {key!r} (the header has {cols}); pass "
                                 f"{'image_key' if key == image_key else 'caption_key'}= to use another column")
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            if row.get(image_key) is None or row.get(caption_key) is None:
                raise ValueError(f"{where}: row has fewer fields than the header")
            b.add(row[image_key].strip(), row[caption_key], where)
    return b.build()


def read_pairs_jsonl(path, root=None, *, image_key: str = IMAGE_KEY, caption_key: str = CAPTION_KEY,
                     check_exists: bool = True, split: str | None = None,
                     allow_outside_root: bool = False) -> PairSet:
    """One JSON object per line: ``{image_key: path, caption_key: str | [str, ...]}`` (blank lines skipped;
    with ``split``, only objects whose ``"split"`` matches)."""
    path = _check_file(path)
    b = _Builder(path, _root_of(path, root), check_exists, allow_outside_root)
    splits_seen = set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if split is not None:
                s = obj.get("split")
                if s is None:
                    raise ValueError(f"{where}: split={split!r} was requested but the entry has no 'split' key")
                splits_seen.add(s)
                if s not in TRAIN_SPLIT_ALIASES.get(split, (split,)):
                    continue
            _add_entry(b, obj, where, image_key, caption_key)
    return b.build(_split_note(split, splits_seen))


def _add_entry(b: _Builder, obj: dict, where: str, image_key: str, caption_key: str) -> None:
    for key in (image_key, caption_key):
        if key not in obj:
            raise ValueError(f"{where}: missing key {key!r} (has {sorted(obj)})")
    b.add(obj[image_key], obj[caption_key], where)


def _split_note(split, seen) -> str:
    if split is None:
        return ""
    return f" in split {split!r} (splits present: {sorted(seen)})"


def read_pairs_json(path, root=None, *, split: str | None = None, image_key: str = IMAGE_KEY,
                    caption_key: str = CAPTION_KEY, check_exists: bool = True,
                    allow_outside_root: bool = False) -> PairSet:
    """A Karpathy split file, a COCO captions file or a JSON list of entries (see the module docstring)."""
    path = _check_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON (line {e.lineno}: {e.msg})") from None
    b = _Builder(path, _root_of(path, root), check_exists, allow_outside_root)
    seen: set = set()
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        if split is not None:
            raise ValueError(f"{path}: a COCO captions file has no split field (split={split!r}); use the file of "
                             f"that split")
        _read_coco(b, data, path)
    elif isinstance(data, dict) and isinstance(data.get("images"), list):
        _read_karpathy(b, data["images"], path, split, seen)
    elif isinstance(data, list):
        for k, obj in enumerate(data):
            where = f"{path}, entry {k}"
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
            if split is not None:
                s = obj.get("split")
                if s is None:
                    raise ValueError(f"{where}: split={split!r} was requested but the entry has no 'split' key")
                seen.add(s)
                if s not in TRAIN_SPLIT_ALIASES.get(split, (split,)):
                    continue
            _add_entry(b, obj, where, image_key, caption_key)
    else:
        raise ValueError(f"{path}: unrecognised JSON layout (expected a Karpathy split file with 'images', a COCO "
                         f"captions file with 'images' and 'annotations', or a list of entries)")
    return b.build(_split_note(split, seen))


def _read_karpathy(b: _Builder, images: list, path: str, split, seen: set) -> None:
    for k, im in enumerate(images):
        where = f"{path}, images[{k}]"
        if not isinstance(im, dict):
            raise ValueError(f"{where}: expected an object, got {type(im).__name__}")
        s = im.get("split")
        if split is not None:
            if s is None:
                raise ValueError(f"{where}: split={split!r} was requested but the entry has no 'split' key")
            seen.add(s)
            if s not in TRAIN_SPLIT_ALIASES.get(split, (split,)):
                continue
        if "filename" not in im:
            raise ValueError(f"{where}: missing key 'filename' (has {sorted(im)})")
        if "sentences" not in im:
            raise ValueError(f"{where}: missing key 'sentences' (has {sorted(im)})")
        rel = os.path.join(im.get("filepath") or "", im["filename"])
        caps = []
        for t, sent in enumerate(im["sentences"] or []):
            if isinstance(sent, str):
                caps.append(sent)
            elif isinstance(sent, dict) and isinstance(sent.get("raw"), str):
                caps.append(sent["raw"])
            elif isinstance(sent, dict) and isinstance(sent.get("tokens"), list):
                caps.append(" ".join(map(str, sent["tokens"])))
            else:
                raise ValueError(f"{where}: sentences[{t}] has no 'raw' text")
        b.add(rel, caps, where)


def _read_coco(b: _Builder, data: dict, path: str) -> None:
    files = {}
    for k, im in enumerate(data.get("images") or []):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise ValueError(f"{path}, images[{k}]: needs 'id' and 'file_name'")
        files[im["id"]] = im["file_name"]
    for k, ann in enumerate(data["annotations"]):
        where = f"{path}, annotations[{k}]"
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise ValueError(f"{where}: needs 'image_id' and 'caption'")
        if ann["image_id"] not in files:
            raise ValueError(f"{where}: image_id {ann['image_id']!r} is not in 'images'")
        b.add(files[ann["image_id"]], ann["caption"], where)


def load_pairs(path, root=None, *, split: str | None = None, check_exists: bool = True, **kw) -> PairSet:
    """Read ``path`` by extension: ``.csv``/``.tsv``, ``.jsonl``, ``.json`` (see the readers)."""
    p = os.fspath(path)
    ext = os.path.splitext(p)[1].lower()
    if ext in (".csv", ".tsv"):
        if split is not None:
            raise ValueError(f"{p}: split={split!r} needs a JSON / JSONL file with a 'split' field")
        return read_pairs_csv(p, root, check_exists=check_exists, **kw)
    if ext == ".jsonl":
        return read_pairs_jsonl(p, root, split=split, check_exists=check_exists, **kw)
    if ext == ".json":
        return read_pairs_json(p, root, split=split, check_exists=check_exists, **kw)
    raise ValueError(f"{p}: unknown pair file type {ext!r} (expected .csv, .tsv, .jsonl or .json)")


def from_lists(images: Sequence, captions: Sequence, source: str | None = None) -> PairSet:
    """Pairs from parallel lists: ``images[i]`` (path or CHW tensor) with ``captions[i]`` (a string or a list of
    strings for several captions of that image)."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} caption entries")
    caps, t2i, where = [], [], []
    for i, c in enumerate(captions):
        cs = [c] if isinstance(c, str) else list(c)
        if not cs:
            raise ValueError(f"entry {i}: empty caption")
        for x in cs:
            caps.append(x)
            t2i.append(i)
            where.append(f"entry {i}")
    return PairSet(list(images), caps, t2i, source, where)


def synthetic_pairs(n: int, size: int = 32, seed: int = 0, *, captions_per_image: int = 1,
                    domain: str = "source") -> PairSet:
    """``n`` procedural images (``leanclip.synthetic.make_caption_corpus``, uint8 CHW tensors) with their captions."""
    imgs, caps = make_caption_corpus(n, size=size, seed=seed, domain=domain, captions_per_image=captions_per_image)
    return from_lists(list(imgs), caps, source=f"synthetic(n={n}, size={size}, seed={seed})")


# ----------------------------------------------------------------------------------------------------------- datasets
def _load_image(img, transform, where: str):
    if isinstance(img, torch.Tensor):
        x = img
        if transform is not None:
            return transform(x)
        return x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
    from PIL import Image

    try:
        with Image.open(img) as im:
            pil = im.convert("RGB")
    except OSError as e:
        raise OSError(f"cannot load image {img!r} ({where}): {e}") from e
    if transform is not None:
        return transform(pil)
    arr = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1)
    return arr.float().div(255.0)


class PairDataset(Dataset):
    """Item ``j``: (image of caption ``j`` through ``transform``, caption ``j``). ``cache=True`` keeps transformed
    images in memory (only for a deterministic transform; default: on for in-memory tensor images)."""

    def __init__(self, pairs: PairSet, transform: Callable | None = None, *, cache: bool | None = None):
        if not isinstance(pairs, PairSet):
            raise TypeError(f"pairs must be a PairSet, got {type(pairs).__name__}")
        self.pairs, self.transform = pairs, transform
        if cache is None:
            cache = all(isinstance(im, torch.Tensor) for im in pairs.images)
        self._cache: dict | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.pairs)

    def image(self, i: int) -> torch.Tensor:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        x = _load_image(self.pairs.images[i], self.transform, f"image {i} of {self.pairs.source or 'pairs'}")
        if self._cache is not None:
            self._cache[i] = x
        return x

    def __getitem__(self, j: int):
        return self.image(self.pairs.txt_to_img[j]), self.pairs.captions[j]


class ImageListDataset(Dataset):
    """The unique images of a PairSet (retrieval evaluation); item ``i``: the transformed image ``i``."""

    def __init__(self, pairs: PairSet, transform: Callable | None = None):
        self.pairs, self.transform = pairs, transform

    def __len__(self) -> int:
        return self.pairs.num_images

    def __getitem__(self, i: int):
        return _load_image(self.pairs.images[i], self.transform, f"image {i} of {self.pairs.source or 'pairs'}")
