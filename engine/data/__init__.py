"""Data layer: image sources, CoOp split files, few-shot sampling, base-to-new splits, datasets and loaders.

Everything here is plain Python / torch (no Dassl). The protocols follow CoOp / CoCoOp, which CLIPFit and LLU reuse.
One module per concern, every public name re-exported here: ``records`` (``Sample``, the dataset registry),
``sources`` (image folders and list files), ``splits`` (CoOp split files), ``readers`` (folder datasets,
``load_dataset``), ``fewshot`` (sampling, its cache, base / new), ``images`` (transform, decoding, datasets),
``loaders`` (seeded loading).

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

from leanclip.data.records import (  # noqa: F401
    CLIP_MEAN, CLIP_STD, DATASET_INFO, DatasetInfo, IMG_EXTENSIONS, SPLITS, Sample,
)
from leanclip.data.sources import (  # noqa: F401
    ImageFolderSource, ImageRoot,
)
from leanclip.data.splits import (  # noqa: F401
    find_split_file, read_split_file, write_split_json,
)
from leanclip.data.readers import (  # noqa: F401
    load_dataset, read_classnames_file, read_fgvc_aircraft, read_imagenet_folders,
)
from leanclip.data.fewshot import (  # noqa: F401
    check_classes, classnames_from_samples, few_shot, few_shot_cache_path, few_shot_cached, subsample_classes,
)
from leanclip.data.images import (  # noqa: F401
    BadImageError, ImageDataset, TensorImageDataset, check_images, clip_transform,
)
from leanclip.data.loaders import (  # noqa: F401
    ItemSeeds, make_loader, seeded_dataset,
)

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
