"""Torch side of the samples: the CLIP transform, image decoding that names an unreadable file in one line
(``BadImageError``, also from a DataLoader worker), ``check_images``, and the image / tensor datasets."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import Dataset

from leanclip.data.records import CLIP_MEAN, CLIP_STD, Sample


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
