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

Modules, every public name re-exported here: ``classes`` (the vocabulary, ``ClassSpec``), ``render`` (one instance on
a background), ``captions``, ``sets`` (tensors, corpora, image folders and split trees), ``cache`` (the per-user cache
and the published, hash-checked dataset).

Everything is deterministic for a seed (independent numpy Generators seeded from SeedSequence; global RNG state is
never touched). Speed: ~0.2 ms per 64×64 image on one CPU core.
"""
from __future__ import annotations

from leanclip.synthetic.classes import (  # noqa: F401
    COLOURS, ClassSpec, DOMAINS, SHAPES, TEXTURES, make_classes,
)
from leanclip.synthetic.render import (  # noqa: F401
    render, render_with_meta,
)
from leanclip.synthetic.captions import (  # noqa: F401
    caption_for,
)
from leanclip.synthetic.sets import (  # noqa: F401
    make_caption_corpus, make_classification_set, write_image_folder, write_split_file,
)
from leanclip.synthetic.cache import (  # noqa: F401
    CACHE_ENV, MANIFEST, cache_dir, cached_split_dataset, manifest_problem, private_dir, write_manifest,
)

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
