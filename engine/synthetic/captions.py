"""Captions of a rendered instance: its class name with the position and size the render recorded, in a few
phrasings."""
from __future__ import annotations

from leanclip.synthetic.classes import ClassSpec


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


def caption_variants(spec: ClassSpec, meta: dict) -> list[str]:
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
    variants = caption_variants(spec, meta)
    return variants[variant % len(variants)]
