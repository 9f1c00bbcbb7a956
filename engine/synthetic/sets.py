"""Data sets built from the renders: tensors for classification and captioned corpora, and on disk an image
folder or a CoOp-layout tree with its split file."""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from leanclip.synthetic.captions import caption_variants
from leanclip.synthetic.classes import COLOURS, ClassSpec, SHAPES, TEXTURES, DOMAIN_CODE, SPLIT_CODE
from leanclip.synthetic.render import check_domain, check_size, draw_batch


# ----------------------------------------------------------------------------------------------------------------------
# Sets


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFF, *key])


_CHUNK = 32  # images per vectorised batch: keeps the float32 planes cache-sized


def _to_tensor(images: list[np.ndarray], size: int, as_float: bool) -> torch.Tensor:
    """Concatenate n_i×3×H×W uint8 blocks -> N×3×H×W tensor."""
    t = torch.from_numpy(np.concatenate(images) if images else np.zeros((0, 3, size, size), np.uint8))
    return t.float().div_(255.0) if as_float else t


def _check_count(n, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"{what} must be a non-negative int, got {n!r}")
    return int(n)


def make_classification_set(
    classes: Sequence[ClassSpec],
    n_per_class: int,
    size: int = 32,
    seed: int = 0,
    domain: str = "source",
    *,
    as_float: bool = False,
    _purpose: str = "classification",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`n_per_class` images of each class -> (images N×3×H×W uint8 tensor, or float32 in [0,1] with `as_float`;
    labels int64 = index into `classes`). Class-major order. Each class has its own generator seeded by (seed, class
    index, domain, purpose), so sets of different sizes share their prefixes per class."""
    n_per_class = _check_count(n_per_class, "n_per_class")
    size, domain = check_size(size), check_domain(domain)
    images, labels = [], []
    for ci, spec in enumerate(classes):
        rng = _rng(seed, ci, DOMAIN_CODE[domain], SPLIT_CODE[_purpose])
        for start in range(0, n_per_class, _CHUNK):  # chunks bound the float32 temporaries
            images.append(draw_batch(spec, rng, min(_CHUNK, n_per_class - start), size, domain)[0])
        labels += [ci] * n_per_class
    return _to_tensor(images, size, as_float), torch.tensor(labels, dtype=torch.long)


def make_caption_corpus(
    n: int,
    size: int = 64,
    seed: int = 0,
    domain: str = "source",
    *,
    captions_per_image: int = 1,
    as_float: bool = False,
    return_specs: bool = False,
):
    """`n` images of random (shape, colour, texture) combinations with captions of varied phrasing.

    Returns (images N×3×H×W uint8 tensor, captions) — captions is a list of n strings when captions_per_image == 1,
    else a list of n lists of `captions_per_image` distinct phrasings (<= 6; COCO style uses 5). Phrasings mention
    colour, shape and texture, and some also size, position or background. With return_specs, a third element lists
    each image's ClassSpec."""
    n = _check_count(n, "n")
    size, domain = check_size(size), check_domain(domain)
    if not 1 <= captions_per_image <= 6:
        raise ValueError(f"captions_per_image must be in 1..6, got {captions_per_image}")
    rng = _rng(seed, DOMAIN_CODE[domain], SPLIT_CODE["captions"])
    colours = tuple(COLOURS)
    attrs = np.stack(
        [rng.integers(len(SHAPES), size=n), rng.integers(len(colours), size=n), rng.integers(len(TEXTURES), size=n)], 1
    )
    specs = [ClassSpec(SHAPES[a], colours[b], TEXTURES[c]) for a, b, c in attrs.tolist()]
    arr = np.zeros((n, 3, size, size), np.uint8)
    metas: list[dict] = [{}] * n
    groups: dict[ClassSpec, list[int]] = {}
    for i, spec in enumerate(specs):
        groups.setdefault(spec, []).append(i)
    for spec in sorted(groups, key=lambda sp: (sp.shape, sp.colour, sp.texture)):  # batch-render per combination
        idx = groups[spec]
        for start in range(0, len(idx), _CHUNK):
            part = idx[start : start + _CHUNK]
            imgs, ms = draw_batch(spec, rng, len(part), size, domain)
            arr[part] = imgs
            for i, m in zip(part, ms):
                metas[i] = m
    captions = []
    for i in range(n):
        variants = caption_variants(specs[i], metas[i])
        caps = [variants[j] for j in rng.permutation(len(variants))[:captions_per_image]]
        captions.append(caps[0] if captions_per_image == 1 else caps)
    images = torch.from_numpy(arr)
    out = (images.float().div_(255.0) if as_float else images, captions)
    return (*out, specs) if return_specs else out


def _save_png(arr: np.ndarray, path: str) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path, format="PNG", compress_level=1)


def write_image_folder(
    root: str | os.PathLike,
    classes: Sequence[ClassSpec],
    n_per_class: int,
    size: int = 32,
    seed: int = 0,
    domain: str = "source",
):
    """Write ``root/<class folder>/<i:04d>.png`` (folder = name with underscores). Returns the Samples, labelled by
    index in `classes` (note: `ImageFolderSource` labels by *sorted* folder name instead)."""
    from leanclip.data import Sample

    root = os.fspath(root)
    x, y = make_classification_set(classes, n_per_class, size, seed, domain, _purpose="folder")
    arr = x.permute(0, 2, 3, 1).numpy()
    samples = []
    for ci, spec in enumerate(classes):
        os.makedirs(os.path.join(root, spec.folder), exist_ok=True)
    for k in range(arr.shape[0]):
        ci = int(y[k])
        i = k % n_per_class if n_per_class else 0
        p = os.path.join(root, classes[ci].folder, f"{i:04d}.png")
        _save_png(arr[k], p)
        samples.append(Sample(p, ci, classes[ci].name))
    return samples


def write_split_file(
    root: str | os.PathLike,
    classes: Sequence[ClassSpec],
    n_train: int,
    n_val: int,
    n_test: int,
    size: int = 32,
    seed: int = 0,
    domain: str = "source",
    *,
    test_domain: str | None = None,
    name: str = "Synthetic",
    image_dir: str = "images",
) -> str:
    """Write a CoOp-style dataset: images at ``root/<image_dir>/<class folder>/<split>_<i:04d>.png`` and
    ``root/split_zhou_<name>.json`` (relpaths relative to ``root/<image_dir>``, labels = index in `classes`, class
    names = ``spec.name``). `test_domain` (default `domain`) renders the test split in another domain. Returns the
    split-file path; ``leanclip.data.load_dataset(root, name)`` / ``find_split_file(root, name)`` read it back."""
    from leanclip.data import Sample, write_split_json

    root = os.fspath(root)
    img_root = os.path.join(root, image_dir)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    domains = {"train": domain, "val": domain, "test": test_domain or domain}
    for spec in classes:
        os.makedirs(os.path.join(img_root, spec.folder), exist_ok=True)
    splits = {}
    for split, n in counts.items():
        n = _check_count(n, f"n_{split}")
        x, y = make_classification_set(classes, n, size, seed, domains[split], _purpose=split)
        arr = x.permute(0, 2, 3, 1).numpy()
        out = []
        for k in range(arr.shape[0]):
            ci = int(y[k])
            p = os.path.join(img_root, classes[ci].folder, f"{split}_{k % n:04d}.png")
            _save_png(arr[k], p)
            out.append(Sample(p, ci, classes[ci].name))
        splits[split] = out
    return write_split_json(os.path.join(root, f"split_zhou_{name}.json"), splits, img_root)
