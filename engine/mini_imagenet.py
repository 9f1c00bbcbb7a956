"""Mini-ImageNet episodes over an ImageNet folder, with Ravi & Larochelle's class split.

    samples, classnames = mini_imagenet_split(ROOT, "test")   # the 20 test classes of ROOT/train/<wnid>/*.JPEG
    export_split_file(ROOT, "split_mini_train.json", "train")  # the 64 training classes as a CoOp split file
    leanclip episodes --mini-imagenet ROOT --split test --ways 5 --shots 1 ...

The class lists are Ravi & Larochelle's (ICLR 2017) ``train.csv`` / ``val.csv`` / ``test.csv``: 64 / 16 / 20 WordNet
ids, the split every Mini-ImageNet few-shot result uses. They ship as ``mini_imagenet_splits.json`` beside this module
(wnid -> class name per split; the names are open_clip's ImageNet class names, the ones CLIP's zero-shot prompts use).
The csv files also pick 600 images per class, under renamed file names that do not map back to ImageNet's, so the
images here are every image of the class's ImageNet train folder: the same classes, drawn from a larger pool.

Layout: ``ROOT`` is an ImageNet folder holding ``train/<wnid>/`` (or CoOp's ``imagenet/`` folder, holding
``images/train/<wnid>/``, or the ``train`` folder itself). Only the split's class folders are listed; the others may be
absent. A ``classnames.txt`` in ``ROOT`` (CoOp's ``<wnid> <name>`` lines) replaces the shipped names, and must then
name every class of the split. Labels follow the sorted wnids. Every image must resolve inside the train folder (a
symlink leading out is refused unless ``allow_outside_root``), as for every other reader of ``leanclip.data``.

``export_split_file`` writes a split's classes as a CoOp split file for ``leanclip train --split-file`` (the LN tuning
on the 64 training classes that the "+ LN" rows start from): per class, every ``holdout``-th image of its sorted list
(the 10th, 20th, ...) is held out as val = test (CoOp's ImageNet layout, val = test), the rest is train; paths are
relative to the train folder, which is the ``--image-root`` to give.
"""
from __future__ import annotations

import functools
import json
import os

from leanclip.data import ImageFolderSource, Sample, read_classnames_file, write_split_json

__all__ = ["MINI_IMAGENET_SPLITS", "split_classes", "find_train_dir", "mini_imagenet_split", "export_split_file"]

MINI_IMAGENET_SPLITS = ("train", "val", "test")
_LISTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mini_imagenet_splits.json")
_TRAIN_DIRS = ("train", os.path.join("images", "train"))


@functools.lru_cache(maxsize=None)
def _lists() -> dict[str, dict[str, str]]:
    with open(_LISTS, encoding="utf-8") as f:
        return json.load(f)


def split_classes(split: str) -> dict[str, str]:
    """wnid -> class name of a Mini-ImageNet split (``train`` 64, ``val`` 16, ``test`` 20 classes), sorted by wnid."""
    if split not in MINI_IMAGENET_SPLITS:
        raise ValueError(f"Mini-ImageNet split must be one of {', '.join(MINI_IMAGENET_SPLITS)}, got {split!r}")
    return dict(_lists()[split])


def find_train_dir(root) -> str:
    """``root/train``, else ``root/images/train`` (CoOp's ``imagenet/`` folder), else ``root`` itself: the folder
    whose ``<wnid>/`` sub-folders hold the images; FileNotFoundError naming ``root`` when it is not a folder."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Mini-ImageNet: ImageNet folder {root!r} does not exist")
    for sub in _TRAIN_DIRS:
        if os.path.isdir(os.path.join(root, sub)):
            return os.path.join(root, sub)
    return root


def _classnames(root: str, classes: dict[str, str]) -> dict[str, str]:
    """The shipped names, or those of ``root/classnames.txt`` where that file exists (it must list every class)."""
    path = os.path.join(os.fspath(root), "classnames.txt")
    if not os.path.isfile(path):
        return classes
    names = read_classnames_file(path)
    missing = [w for w in classes if w not in names]
    if missing:
        raise ValueError(f"class-names file {path!r} does not list Mini-ImageNet class {missing[0]!r} "
                         f"({len(missing)} missing)")
    return {w: names[w] for w in classes}


def mini_imagenet_split(root, split: str = "test", *, allow_outside_root: bool = False
                        ) -> tuple[list[Sample], list[str]]:
    """(samples, class names by label) of Mini-ImageNet ``split`` over the ImageNet folder ``root`` (module
    docstring). A class folder that is missing is a FileNotFoundError naming its wnid."""
    classes = split_classes(split)
    train_dir = find_train_dir(root)
    missing = [w for w in classes if not os.path.isdir(os.path.join(train_dir, w))]
    if missing:
        raise FileNotFoundError(f"Mini-ImageNet {split} class {missing[0]!r} has no folder in {train_dir!r} "
                                f"({len(missing)} of the split's {len(classes)} missing)")
    names = _classnames(root, classes)
    others = {e.name for e in os.scandir(train_dir) if e.is_dir() and e.name not in classes}
    source = ImageFolderSource(train_dir, classname_map=names, ignore=others, allow_outside_root=allow_outside_root)
    return source.samples, source.classnames


def export_split_file(root, path, split: str = "train", *, holdout: int = 10, allow_outside_root: bool = False) -> str:
    """Write Mini-ImageNet ``split``'s classes over ``root`` as a CoOp split file at ``path`` (module docstring):
    per class, each ``holdout``-th image to val = test, the others to train. Returns the path; the images' root for
    ``--image-root`` is :func:`find_train_dir` of ``root``."""
    if isinstance(holdout, bool) or not isinstance(holdout, int) or holdout < 2:
        raise ValueError(f"holdout must be an int >= 2, got {holdout!r}")
    samples, _ = mini_imagenet_split(root, split, allow_outside_root=allow_outside_root)
    train, test, seen = [], [], {}
    for s in samples:
        seen[s.label] = seen.get(s.label, 0) + 1
        (test if seen[s.label] % holdout == 0 else train).append(s)
    return write_split_json(path, {"train": train, "val": test, "test": test}, find_train_dir(root))
