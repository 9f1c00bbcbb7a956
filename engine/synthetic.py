"""Procedural image data: coloured, textured shapes on a background, with captions. No downloads, numpy only.

A class is a (colour, texture, shape) triple, e.g. ``ClassSpec("triangle", "red", "striped")`` named
"red striped triangle" ("plain" is left out of names: "red triangle"). Each image draws one instance at a random
position, scale and rotation with a little colour jitter.

Domains (for few-shot / domain-shift experiments):
  - ``"source"``:  dark grey-blue background with a smooth gradient and faint noise.
  - ``"shifted"``: light, pastel background with a checker or stripe pattern, then global colour jitter (brightness,
    contrast, per-channel gain) and Gaussian pixel noise. Shape, colour and texture keep their meaning.

API::

    classes = make_classes(10, seed=0)                      # list[ClassSpec], .name / .folder
    img = render(classes[0], rng, size=64, domain="source") # uint8 H×W×3
    x, y = make_classification_set(classes, 16, size=32, seed=0)       # uint8 N×3×H×W tensor, int64 labels
    x, caps = make_caption_corpus(500, size=64, seed=0)                # captions: list[str] (or list[list[str]])
    samples = write_image_folder(root, classes, 8)                     # root/<folder>/<i>.png
    split = write_split_file(root, classes, 8, 2, 4)                   # CoOp tree + root/split_zhou_Synthetic.json
    root = cached_split_dataset(cache_dir(), 10, 32, 16, 4, 20)        # the same, built once and hash-checked

Cache: `cache_dir` is leanclip's per-user cache folder ($LEANCLIP_CACHE_DIR, else $XDG_CACHE_HOME/leanclip, else
~/.cache/leanclip); `private_dir` creates a folder 0700 and refuses one that another user owns or others may write.
`cached_split_dataset` publishes a built dataset with one atomic rename, with a manifest of the sha256 of every file,
and checks the files against it before each use (`manifest_problem`).

Everything is deterministic for a seed (independent numpy Generators seeded from SeedSequence; global RNG state is
never touched). Speed: ~0.2 ms per 64×64 image on one CPU core.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

__all__ = [
    "SHAPES",
    "COLOURS",
    "TEXTURES",
    "DOMAINS",
    "ClassSpec",
    "make_classes",
    "render",
    "render_with_meta",
    "caption_for",
    "make_classification_set",
    "make_caption_corpus",
    "write_image_folder",
    "write_split_file",
    "CACHE_ENV",
    "cache_dir",
    "private_dir",
    "write_manifest",
    "manifest_problem",
    "cached_split_dataset",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "star", "diamond", "hexagon")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (145, 60, 205),
    "orange": (250, 140, 20),
    "white": (240, 240, 240),
    "cyan": (40, 210, 225),
    "pink": (250, 135, 195),
    "brown": (140, 85, 40),
}
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted")
DOMAINS: tuple[str, ...] = ("source", "shifted")
_DOMAIN_CODE = {d: i for i, d in enumerate(DOMAINS)}
_SPLIT_CODE = {"classification": 0, "train": 1, "val": 2, "test": 3, "folder": 4, "captions": 5}


@dataclass(frozen=True)
class ClassSpec:
    shape: str
    colour: str
    texture: str = "plain"

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {', '.join(SHAPES)}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; known: {', '.join(COLOURS)}")
        if self.texture not in TEXTURES:
            raise ValueError(f"unknown texture {self.texture!r}; known: {', '.join(TEXTURES)}")

    @property
    def name(self) -> str:
        """"red striped triangle"; plain texture is omitted: "red triangle"."""
        parts = [self.colour] + ([self.texture] if self.texture != "plain" else []) + [self.shape]
        return " ".join(parts)

    @property
    def folder(self) -> str:
        return self.name.replace(" ", "_")


def make_classes(
    n_classes: int,
    seed: int = 0,
    *,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    textures: Sequence[str] = TEXTURES,
) -> list[ClassSpec]:
    """`n_classes` distinct (shape, colour, texture) classes, a seeded random draw from the product, in draw order
    (so a CoOp base/new split of them mixes attributes). ValueError when more are asked than the product holds."""
    combos = [ClassSpec(s, c, t) for s in shapes for c in colours for t in textures]
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive int, got {n_classes!r}")
    if n_classes > len(combos):
        raise ValueError(f"n_classes={n_classes} > {len(combos)} available shape×colour×texture combinations")
    order = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFF, 7919]).permutation(len(combos))[:n_classes]
    return [combos[i] for i in order]


# ----------------------------------------------------------------------------------------------------------------------
# Rendering


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(size, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(c, c, indexing="ij")
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


_SQ3 = math.sqrt(3.0)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Shape of radius ~1 in its own frame (u right, v up)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(au, av) <= 0.8
    if shape == "triangle":
        return (v >= -0.5) & (_SQ3 * au + v <= 1.0)
    if shape == "cross":
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.36)
    if shape == "star":
        r = np.sqrt(u * u + v * v)
        th = np.arctan2(v, u)
        return r <= 0.42 + 0.58 * np.abs(np.cos(2.5 * th)) ** 3
    if shape == "diamond":
        return au * 0.8 + av <= 1.0
    if shape == "hexagon":
        return (av <= 0.866) & (_SQ3 * au + av <= _SQ3)
    raise ValueError(f"unknown shape {shape!r}")


def _texture_mask(texture: str, u: np.ndarray, v: np.ndarray) -> np.ndarray | None:
    if texture == "plain":
        return None
    if texture == "striped":
        return (np.floor(u * 4.0) % 2) == 0
    if texture == "dotted":
        fu = u * 3.2 - np.round(u * 3.2)
        fv = v * 3.2 - np.round(v * 3.2)
        return fu * fu + fv * fv <= 0.07
    raise ValueError(f"unknown texture {texture!r}")


def _check_domain(domain: str) -> str:
    if domain not in _DOMAIN_CODE:
        raise ValueError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")
    return domain


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    return int(size)


def _draw_batch(spec: ClassSpec, rng: np.random.Generator, n: int, size: int, domain: str):
    """n images of one class -> (uint8 n×3×H×W, list of meta dicts). All randomness from `rng`, in a fixed order.

    Channel-first float32 work on n×H×W planes (the 3-channel arrays are built once, by the composite)."""
    f32 = np.float32
    yy, xx = _grid(size)
    col3 = (n, 1, 1)
    # geometry
    cxy = rng.uniform(0.3, 0.7, (n, 2))
    rel_r = rng.uniform(0.2, 0.32, n)
    th = rng.uniform(0, 2 * math.pi, n)
    fg = np.clip(np.asarray(COLOURS[spec.colour], f32) + rng.normal(0, 10, (n, 3)), 0, 255).astype(f32)
    inv_r = (1.0 / (rel_r * size)).astype(f32).reshape(col3)
    c = np.cos(th).astype(f32).reshape(col3)
    s = np.sin(th).astype(f32).reshape(col3)
    dx = (xx - (cxy[:, 0] * size).astype(f32).reshape(col3)) * inv_r
    dy = ((cxy[:, 1] * size).astype(f32).reshape(col3) - yy) * inv_r  # v axis points up
    u = c * dx + s * dy
    v = c * dy - s * dx
    mask = _shape_mask(spec.shape, u, v)
    tex = _texture_mask(spec.texture, u, v)
    shade = None if tex is None else np.where(tex, f32(0.35), f32(1.0))
    # background: per-channel offset + one shared plane (source) or pattern × per-channel amplitude (shifted)
    if domain == "source":
        base = (rng.uniform(25, 75, (n, 1)) + rng.normal(0, 8, (n, 3))).astype(f32)
        g = rng.uniform(-30, 30, (n, 2)).astype(f32) / f32(size)
        plane = g[:, 0].reshape(col3) * (yy - size / 2) + g[:, 1].reshape(col3) * (xx - size / 2)
        plane += rng.standard_normal((n, size, size), dtype=f32) * f32(3.0)
        amp = np.ones((n, 3), f32)
    else:
        base = rng.uniform(130, 215, (n, 3)).astype(f32)
        period = rng.uniform(3.0, 9.0, col3).astype(f32)
        checker = rng.random(n) < 0.5
        a = rng.uniform(0, math.pi, col3).astype(f32)
        amp = rng.uniform(12, 30, (n, 3)).astype(f32)
        inv_p = 1.0 / period
        plane = np.empty((n, size, size), f32)
        ck, st = checker, ~checker  # checkerboard or oblique stripes, each computed only where used
        plane[ck] = np.floor(yy * inv_p[ck]) + np.floor(xx * inv_p[ck])
        plane[st] = np.floor((np.cos(a[st]) * xx + np.sin(a[st]) * yy) * inv_p[st])
        plane %= 2
        plane *= 2
        plane -= 1
    img = np.empty((n, 3, size, size), f32)
    for ch in range(3):
        bg = plane * amp[:, ch].reshape(col3) + base[:, ch].reshape(col3)
        fgc = fg[:, ch].reshape(col3)
        np.copyto(img[:, ch], np.where(mask, fgc if shade is None else fgc * shade, bg))
    if domain == "shifted":  # global colour jitter (contrast about the mean, brightness, channel gain) + noise
        mean = img.mean(axis=(1, 2, 3)).astype(f32).reshape(n, 1, 1, 1)
        contrast = rng.uniform(0.7, 1.3, (n, 1, 1, 1)).astype(f32)
        bright = rng.uniform(0.75, 1.2, (n, 1, 1, 1)).astype(f32)
        gain = rng.uniform(0.88, 1.12, (n, 3, 1, 1)).astype(f32)
        img *= contrast * gain
        img += (mean * (bright - contrast)) * gain
        img += rng.standard_normal(img.shape, dtype=f32) * f32(10.0)
    img += f32(0.5)
    out = np.clip(img, 0, 255, out=img).astype(np.uint8)
    metas = [
        dict(cx=float(cxy[i, 0]), cy=float(cxy[i, 1]), radius=float(rel_r[i]), angle=float(th[i]), domain=domain)
        for i in range(n)
    ]
    return out, metas


def _draw(spec: ClassSpec, rng: np.random.Generator, size: int, domain: str) -> tuple[np.ndarray, dict]:
    """One image, uint8 H×W×3."""
    imgs, metas = _draw_batch(spec, rng, 1, size, domain)
    return np.ascontiguousarray(imgs[0].transpose(1, 2, 0)), metas[0]


def _as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy Generator or an int seed, got {type(rng).__name__}")


def render(spec: ClassSpec, rng: np.random.Generator | int, size: int = 64, domain: str = "source") -> np.ndarray:
    """One image of class `spec` as uint8 H×W×3 (H = W = size). `rng`: a numpy Generator (advanced) or an int seed."""
    return _draw(spec, _as_rng(rng), _check_size(size), _check_domain(domain))[0]


def render_with_meta(spec: ClassSpec, rng, size: int = 64, domain: str = "source") -> tuple[np.ndarray, dict]:
    """`render` plus its geometry: cx, cy, radius (fractions of the size), angle (rad), domain."""
    return _draw(spec, _as_rng(rng), _check_size(size), _check_domain(domain))


# ----------------------------------------------------------------------------------------------------------------------
# Captions


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


_WITH_TEX = {"plain": "", "striped": " with stripes", "dotted": " with dots"}


def _where(meta: dict) -> str:
    h = "left" if meta["cx"] < 0.43 else "right" if meta["cx"] > 0.57 else ""
    v = "top" if meta["cy"] < 0.43 else "bottom" if meta["cy"] > 0.57 else ""
    if not h and not v:
        return "in the middle"
    return "on the " + " ".join(x for x in (v, h) if x)  # "on the top left", "on the right"


def _size_word(meta: dict) -> str:
    return "small" if meta["radius"] < 0.24 else "large" if meta["radius"] > 0.28 else ""


def _caption_variants(spec: ClassSpec, meta: dict) -> list[str]:
    tex_adj = "" if spec.texture == "plain" else spec.texture + " "
    size = _size_word(meta)
    bg = "dark" if meta["domain"] == "source" else "light patterned"
    sized = (size + " " if size else "") + f"{spec.colour} {tex_adj}{spec.shape}"
    return [
        _a(spec.name),
        f"a photo of {_a(spec.colour)} {spec.shape}{_WITH_TEX[spec.texture]}",
        f"{_a(sized)} on a {bg} background",
        f"{_a(spec.name)} {_where(meta)}",
        f"there is {_a(tex_adj + spec.shape)} coloured {spec.colour}",
        f"{spec.colour} {spec.shape}{_WITH_TEX[spec.texture]}, {_where(meta)}",
    ]


def caption_for(spec: ClassSpec, meta: dict | None = None, variant: int = 0) -> str:
    """Caption `variant` (0..5) of an image; variant 0 is "a red striped triangle" and needs no `meta`."""
    if meta is None:
        if variant != 0:
            raise ValueError("caption variants other than 0 need the image's meta (render_with_meta)")
        return _a(spec.name)
    variants = _caption_variants(spec, meta)
    return variants[variant % len(variants)]


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
    size, domain = _check_size(size), _check_domain(domain)
    images, labels = [], []
    for ci, spec in enumerate(classes):
        rng = _rng(seed, ci, _DOMAIN_CODE[domain], _SPLIT_CODE[_purpose])
        for start in range(0, n_per_class, _CHUNK):  # chunks bound the float32 temporaries
            images.append(_draw_batch(spec, rng, min(_CHUNK, n_per_class - start), size, domain)[0])
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
    size, domain = _check_size(size), _check_domain(domain)
    if not 1 <= captions_per_image <= 6:
        raise ValueError(f"captions_per_image must be in 1..6, got {captions_per_image}")
    rng = _rng(seed, _DOMAIN_CODE[domain], _SPLIT_CODE["captions"])
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
            imgs, ms = _draw_batch(spec, rng, len(part), size, domain)
            arr[part] = imgs
            for i, m in zip(part, ms):
                metas[i] = m
    captions = []
    for i in range(n):
        variants = _caption_variants(specs[i], metas[i])
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
    from .data import Sample

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
    from .data import Sample, write_split_json

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


# ----------------------------------------------------------------------------------------------------------------------
# Per-user cache of written datasets

CACHE_ENV = "LEANCLIP_CACHE_DIR"
MANIFEST = "manifest.json"
_CACHE_FORMAT = 2  # part of the cache key: bump when the written layout or the manifest changes


def cache_dir() -> str:
    """leanclip's per-user cache folder: ``$LEANCLIP_CACHE_DIR``, else ``$XDG_CACHE_HOME/leanclip``, else
    ``~/.cache/leanclip`` (the XDG default). Not created here."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = xdg if xdg and os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "leanclip")


def private_dir(path: str | os.PathLike, what: str = "cache folder") -> str:
    """Create `path` (and its parents) with mode 0700 if missing -> its path; ValueError naming it when it exists but
    another user owns it or group / others may write to it (someone else could then swap the data a run reads)."""
    path = os.fspath(path)
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    getuid = getattr(os, "getuid", None)  # POSIX only; elsewhere the folder's ACLs are the user's business
    if getuid is not None and st.st_uid != getuid():
        raise ValueError(f"{what} {path!r} belongs to another user (uid {st.st_uid}); refusing to use it")
    if getuid is not None and st.st_mode & 0o022:
        raise ValueError(f"{what} {path!r} is writable by group or others (mode {st.st_mode & 0o777:o}); "
                         f"refusing to use it (chmod go-w it, or choose another folder)")
    return path


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files_under(root: str) -> dict[str, str]:
    """relative path ('/'-separated) -> absolute path of every entry below `root` except the manifest; folders are
    walked, anything else (symlinks included) is listed so that the manifest check sees it."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        names = filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in sorted(names):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if rel != MANIFEST:
                out[rel] = full
    return out


def write_manifest(root: str | os.PathLike) -> str:
    """Write ``root/manifest.json`` = {"format", "files": {relpath: sha256}} over every file below `root`."""
    from .utils import atomic_write_json

    root = os.fspath(root)
    files = {rel: _sha256_file(full) for rel, full in _files_under(root).items()}
    path = os.path.join(root, MANIFEST)
    atomic_write_json(path, {"format": _CACHE_FORMAT, "files": files}, indent=None)
    return path


def manifest_problem(root: str | os.PathLike) -> str | None:
    """None when the files below `root` are exactly those its manifest lists, with the recorded sha256; otherwise
    the first difference found, in words."""
    root = os.fspath(root)
    try:
        with open(os.path.join(root, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
        recorded = manifest["files"]
        if manifest.get("format") != _CACHE_FORMAT or not isinstance(recorded, dict):
            return "the manifest has another format"
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        return f"no readable manifest ({type(e).__name__})"
    present = _files_under(root)
    if set(present) != set(recorded):
        extra, gone = sorted(set(present) - set(recorded)), sorted(set(recorded) - set(present))
        return f"files differ from the manifest (unlisted {extra[:3]}, missing {gone[:3]})"
    for rel, full in present.items():
        if os.path.islink(full) or not os.path.isfile(full):
            return f"{rel!r} is not a regular file"
        if _sha256_file(full) != recorded[rel]:
            return f"{rel!r} does not match its recorded sha256"
    return None


def cached_split_dataset(
    base: str | os.PathLike, n_classes: int, size: int, n_train: int, n_val: int, n_test: int, *, seed: int = 0
) -> str:
    """Folder under `base` holding the `write_split_file` dataset of ``make_classes(n_classes, seed)`` (read it
    with ``leanclip.data.load_dataset(root, "Synthetic")``), built on first use and checked on every use.

    The folder name hashes the arguments. A dataset is built in a temp folder, given a manifest (`write_manifest`)
    and published with one rename, so readers never see half a dataset. Before use, the files are checked against
    the manifest; on any difference (an interrupted older layout, a corrupted or edited file) the dataset is rebuilt
    and swapped in the same way. Rebuilding rather than refusing: the content is a pure function of the arguments,
    cheap to regenerate, and the rebuilt copy is exactly what the run asked for, so there is nothing for the user
    to decide. `base` is used as given (the caller picks a private folder; see `private_dir`).
    """
    base = os.fspath(base)
    key = hashlib.sha256(json.dumps([_CACHE_FORMAT, n_classes, size, n_train, n_val, n_test, seed]).encode())
    root = os.path.join(base, f"synthetic-{key.hexdigest()[:12]}")
    if os.path.isdir(root) and manifest_problem(root) is None:
        return root
    classes = make_classes(n_classes, seed=seed)
    os.makedirs(base, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-synthetic-", dir=base)
    try:
        write_split_file(tmp, classes, n_train, n_val, n_test, size=size, seed=seed)
        write_manifest(tmp)
        _publish_dir(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _publish_dir(tmp: str, root: str) -> None:
    """Move the finished folder `tmp` to `root`: a plain rename, or, when `root` holds a stale copy, rename that
    aside first and remove it after. A concurrent builder that published a valid copy first wins."""
    try:
        os.rename(tmp, root)
        return
    except OSError:
        if os.path.isdir(root) and manifest_problem(root) is None:
            return  # another process published the same dataset meanwhile
    stale = os.path.join(os.path.dirname(root), f".stale-{uuid.uuid4().hex}")
    try:
        os.rename(root, stale)
    except FileNotFoundError:
        pass
    try:
        os.rename(tmp, root)
    except OSError:
        if not (os.path.isdir(root) and manifest_problem(root) is None):
            raise
    finally:
        shutil.rmtree(stale, ignore_errors=True)
