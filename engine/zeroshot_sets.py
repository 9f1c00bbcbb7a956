"""The zero-shot classification sets LilT reports after alignment, and its prompts.

LilT scores the aligned model with one prompt per class, ``"a photo of {}"`` (``"a photo of the number {}"`` for
SVHN), not CoOp's per-dataset template: :func:`lilt_templates`. The sets come from three places:

- a CoOp-layout data root (``leanclip.data.load_dataset``; ImageNet-V2 and the CoOp datasets);
- a CoOp split JSON (``leanclip.data.read_split_file``), its images next to it;
- torchvision's on-disk layouts of CIFAR-100 (``cifar-100-python/{train,test,meta}``, pickled dicts of uint8
  arrays) and SVHN (``{train,test,extra}_32x32.mat``: ``X`` 32x32x3xN, ``y`` Nx1 with digit 0 stored as 10), read
  here without torchvision's download / md5 machinery so that any copy of those files (or a test's tiny fake one)
  reads the same. The pickles are read by an unpickler that admits numpy arrays and nothing else: a data file may
  not run code.
"""
from __future__ import annotations

import os
import pickle
import re

import numpy as np
import torch

LILT_TEMPLATE = "a photo of {}"
LILT_NUMBER_TEMPLATE = "a photo of the number {}"
TORCHVISION_SETS = ("cifar100", "svhn")


def _key(name) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name or "").lower())


def lilt_templates(dataset) -> list[str]:
    """LilT's prompt for ``dataset``: the number prompt for SVHN, ``"a photo of {}"`` for any other."""
    return [LILT_NUMBER_TEMPLATE if _key(dataset) == "svhn" else LILT_TEMPLATE]


def torchvision_set(dataset) -> str | None:
    """``"cifar100"`` / ``"svhn"`` when ``dataset`` names one of torchvision's layouts read here, else None."""
    key = _key(dataset)
    return key if key in TORCHVISION_SETS else None


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays; any other global is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR file")
        return super().find_class(module, name)


def _unpickle(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CIFAR-100: no file {path!r} (torchvision's layout: ROOT/cifar-100-python/"
                                f"train, test, meta)")
    try:
        with open(path, "rb") as f:
            out = _ArraysOnly(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise ValueError(f"CIFAR-100: {path!r} is not a CIFAR pickle ({e})") from None
    if not isinstance(out, dict):
        raise ValueError(f"CIFAR-100: {path!r} holds a {type(out).__name__}, not a dict")
    return out


def read_cifar100(root, split: str = "test") -> tuple[torch.Tensor, list[int], list[str]]:
    """(N x 3 x 32 x 32 uint8 images, fine labels, the 100 fine class names) of ``root/cifar-100-python/split``."""
    folder = os.path.join(os.fspath(root), "cifar-100-python")
    entry, meta = _unpickle(os.path.join(folder, split)), _unpickle(os.path.join(folder, "meta"))
    data, labels, names = entry.get("data"), entry.get("fine_labels"), meta.get("fine_label_names")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels is None \
            or len(labels) != data.shape[0] or not names:
        raise ValueError(f"CIFAR-100: {folder!r}/{split} lacks 'data' (N x 3072), 'fine_labels' or the meta file's "
                         f"'fine_label_names'")
    labels = [int(v) for v in labels]
    if min(labels) < 0 or max(labels) >= len(names):
        raise ValueError(f"CIFAR-100: {folder!r}/{split}: a label lies outside the {len(names)} class names")
    images = torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
    return images, labels, [n.replace("_", " ") for n in names]


def read_svhn(root, split: str = "test") -> tuple[torch.Tensor, list[int], list[str]]:
    """(N x 3 x 32 x 32 uint8 images, labels 0-9, the names "0" ... "9") of ``root/{split}_32x32.mat``; the file
    stores digit 0 as label 10, as torchvision's SVHN reads it."""
    from scipy.io import loadmat

    path = os.path.join(os.fspath(root), f"{split}_32x32.mat")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SVHN: no file {path!r} (torchvision's layout: ROOT/{{train,test,extra}}_32x32.mat)")
    try:
        mat = loadmat(path)
    except Exception as e:  # scipy raises several kinds for a file that is not a MATLAB file
        raise ValueError(f"SVHN: {path!r} is not a MATLAB file ({e})") from None
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
        raise ValueError(f"SVHN: {path!r} lacks 'X' (32 x 32 x 3 x N) or 'y' (N labels)")
    labels = [int(v) % 10 for v in y.reshape(-1)]
    images = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)), dtype=np.uint8))
    return images, labels, [str(d) for d in range(10)]


def read_torchvision_set(root, dataset: str, split: str = "test"):
    """:func:`read_cifar100` or :func:`read_svhn` for ``dataset`` (see :func:`torchvision_set`)."""
    reader = {"cifar100": read_cifar100, "svhn": read_svhn}[torchvision_set(dataset)]
    if not os.path.isdir(os.fspath(root)):
        raise NotADirectoryError(f"--zeroshot-data {os.fspath(root)!r} is not a directory")
    return reader(root, split)
