"""The folder datasets CoOp reads without a split file (ImageNet and its variants, FGVC-Aircraft), class-name
files, and ``load_dataset``, the one entry that returns the train / val / test samples of any supported dataset."""
from __future__ import annotations

import os
from collections.abc import Sequence

from leanclip.data.fewshot import classnames_from_samples
from leanclip.data.records import DATASET_INFO, IMG_EXTENSIONS, SPLITS, Sample, MAX_REPORTED, canonical_or_none
from leanclip.data.sources import ImageFolderSource, ImageRoot, list_images, read_lines, require_dir, require_file
from leanclip.data.splits import locate_split, no_split_file, parse_split, short_repr


def read_classnames_file(path: str | os.PathLike) -> dict[str, str]:
    """ImageNet-style ``classnames.txt``: lines "<folder> <class name with spaces>" -> ordered {folder: name}.

    ValueError naming the file and line for a line without a name, a folder listed twice, or no line at all."""
    path = os.fspath(path)
    require_file(path, "class-names file")
    out: dict[str, str] = {}
    for n, line in read_lines(path, "class-names file"):
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise ValueError(f"class-names file {path!r} line {n}: expected '<folder> <class name>', got "
                             f"{short_repr(line)}")
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
    require_dir(image_dir, "image folder")
    folders = sorted(e.name for e in os.scandir(image_dir) if e.is_dir() and not e.name.startswith("."))
    unknown = [f for f in folders if f not in names]
    if unknown:
        raise ValueError(
            f"{len(unknown)} folder(s) of {image_dir!r} are missing from class-names file "
            f"{os.fspath(classnames_file)!r}: {', '.join(unknown[:MAX_REPORTED])}"
        )
    return ImageFolderSource(image_dir, classname_map=names, allow_outside_root=allow_outside_root).samples


def _read_imagenet_v2(image_dir: str, classnames_file: str, allow_outside_root: bool = False) -> list[Sample]:
    """ImageNetV2 (matched-frequency format): folders "0".."999" = labels in classnames.txt order."""
    names = list(read_classnames_file(classnames_file).values())
    require_dir(image_dir, "image folder")
    guard = ImageRoot(image_dir, f"image folder {image_dir!r}", allow_outside_root)
    samples = []
    for label, name in enumerate(names):
        folder = os.path.join(image_dir, str(label))
        if os.path.isdir(folder):
            samples.extend(Sample(p, label, name) for p in list_images(folder, IMG_EXTENSIONS, guard))
    if not samples:
        raise ValueError(f"no images under {image_dir!r} (expected folders 0..{len(names) - 1})")
    return samples


def _read_fgvc_variants(d: str) -> list[str]:
    vfile = os.path.join(d, "variants.txt")
    require_file(vfile, "FGVCAircraft class list")
    classnames = [line for _, line in read_lines(vfile, "FGVCAircraft class list")]
    if not classnames:
        raise ValueError(f"FGVCAircraft class list {vfile!r} is empty")
    if len(set(classnames)) != len(classnames):
        twice = sorted({c for c in classnames if classnames.count(c) > 1})
        raise ValueError(f"FGVCAircraft class list {vfile!r} lists {twice[:MAX_REPORTED]} more than once")
    return classnames


def read_fgvc_aircraft(
    dataset_dir: str | os.PathLike, *, check_exists: bool = True, allow_outside_root: bool = False
) -> dict[str, list[Sample]]:
    """CoOp's FGVCAircraft reader: ``variants.txt`` gives labels (line order), ``images_variant_<split>.txt`` holds
    "<image id> <variant>" lines, images at ``images/<id>.jpg``. Image ids must resolve inside ``images/`` unless
    `allow_outside_root` (see `read_split_file`)."""
    d = os.fspath(dataset_dir)
    require_dir(d, "FGVCAircraft folder")
    name2label = {c: i for i, c in enumerate(_read_fgvc_variants(d))}
    out: dict[str, list[Sample]] = {}
    missing: list[str] = []
    for split in SPLITS:
        lst = os.path.join(d, f"images_variant_{split}.txt")
        require_file(lst, "FGVCAircraft split list")
        root = ImageRoot(os.path.join(d, "images"), f"FGVCAircraft split list {lst!r}", allow_outside_root)
        samples = []
        for n, line in read_lines(lst, "FGVCAircraft split list"):
            parts = line.split(" ", 1)
            if len(parts) != 2 or parts[1] not in name2label or "\x00" in parts[0]:
                raise ValueError(f"FGVCAircraft split list {lst!r} line {n}: unknown variant in {short_repr(line)}")
            p = root.join(parts[0] + ".jpg", f"line {n}")
            if check_exists and not os.path.isfile(p):
                missing.append(p)
            samples.append(Sample(p, name2label[parts[1]], parts[1]))
        out[split] = samples
    if missing:
        raise FileNotFoundError(
            f"FGVCAircraft lists {len(missing)} missing image(s), e.g. " + ", ".join(map(repr, missing[:MAX_REPORTED]))
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
    require_dir(data_root, "data root")
    canonical = canonical_or_none(dataset)
    info = DATASET_INFO.get(canonical) if canonical else None
    if info is None or info.split_name is not None:
        found, tried = locate_split(data_root, dataset)
        if found is None:
            raise no_split_file(dataset, data_root, tried)
        path, image_root, raw = found
        splits = parse_split(raw, path, image_root, check_exists, allow_outside_root)
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
