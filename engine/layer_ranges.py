"""Layer ranges: which transformer blocks of a tower a method option names (LilT's Fig. 5, LayerNorms unlocked in the
top half of one tower and the bottom half of the other).

    parse_layers("6-11", "image_layers")            # (6, 7, 8, 9, 10, 11)
    parse_layers("0-2,5", "text_layers")            # (0, 1, 2, 5); also an int (5) or a list of ints
    check_layers(model, "image_layers", "6-11", "image")    # ValueError naming the option and the tower's depth
    selected_layernorms(model, "both", {"image": "6-11", "text": "all"})  # LayerNorm parameter names

A spec is ``A-B`` (inclusive), a single ``N``, or a comma list of those; blocks are numbered from 0 at the input, as
the tower's own module list numbers them (open_clip ``transformer.resblocks``, timm ``trunk.blocks``, Hugging Face
encoder layers). A tower given a range unlocks the LayerNorms inside those blocks only: the LayerNorms outside every
block (open_clip's ``ln_pre`` / ``ln_post`` / ``ln_final``, a timm trunk's final ``norm``) belong to no block and stay
locked. A block named twice or a reversed range is refused: both are more likely a typo than a wish.
"""
from __future__ import annotations

import re

from torch import nn

from leanclip.models import transformers as _hf
from leanclip.models.openclip import custom_tower_blocks, is_vit_image_tower, text_tower
from leanclip.select import layernorm_names, tower_class

__all__ = ["ALL", "parse_layers", "tower_block_names", "check_layers", "selected_layernorms"]

ALL = "all"  # the spec that names no range: every LayerNorm of the tower, those outside the blocks included

_PART = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_layers(spec, option: str) -> tuple[int, ...]:
    """Block indices (sorted) of ``spec``: ``"A-B"`` / ``"N"`` / a comma list of those, an int, or a list / tuple of
    ints. ValueError naming ``option`` for anything else, a reversed range or a block named twice."""
    if isinstance(spec, bool):
        raise ValueError(f"{option} must be a block range such as 6-11, 3 or 0-2,5; got {spec!r}")
    if isinstance(spec, int):
        spec = str(spec)
    elif isinstance(spec, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        spec = ",".join(str(i) for i in spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{option} must be a block range such as 6-11, 3 or 0-2,5; got {spec!r}")
    out: list[int] = []
    for part in spec.replace(" ", "").split(","):
        m = _PART.match(part)
        if not m:
            raise ValueError(f"{option}={spec}: {part!r} is not a block index N or an inclusive range A-B")
        lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if hi < lo:
            raise ValueError(f"{option}={spec}: the range {part} runs backwards (write {hi}-{lo})")
        out += range(lo, hi + 1)
    twice = sorted({i for i in out if out.count(i) > 1})
    if twice:
        raise ValueError(f"{option}={spec}: block {twice[0]} is named twice")
    return tuple(sorted(out))


def tower_block_names(model: nn.Module, tower: str) -> list[str]:
    """Module names of the transformer blocks of the ``"image"`` or ``"text"`` tower, input first; empty for a tower
    of no blocks leanclip can number (e.g. a ModifiedResNet)."""
    if _hf.is_transformers(model):
        return [n for n, _ in _hf.tower_layers(model, tower)]
    custom = [n for n, _ in custom_tower_blocks(model, tower)]
    if custom:
        return custom
    if tower == "image" and is_vit_image_tower(model):
        return [f"visual.transformer.resblocks.{i}" for i in range(len(model.visual.transformer.resblocks))]
    t = text_tower(model) if tower == "text" else None
    return [f"{t.prefix}transformer.resblocks.{i}" for i in range(len(t.transformer.resblocks))] if t else []


def check_layers(model: nn.Module, option: str, spec, tower: str) -> tuple[int, ...]:
    """:func:`parse_layers`, then each index against the depth of ``tower``: ValueError naming the option, the tower
    class and its depth when a block is out of range."""
    idx = parse_layers(spec, option)
    depth = len(tower_block_names(model, tower))
    if depth == 0:
        raise ValueError(f"{option}: the {tower} tower {tower_class(model, tower)} has no transformer blocks to "
                         f"number")
    if idx[-1] >= depth:
        raise ValueError(f"{option}={spec}: the {tower} tower has {depth} blocks (0-{depth - 1}), so block "
                         f"{idx[-1]} does not exist")
    return idx


def selected_layernorms(model: nn.Module, tower: str, layers: dict) -> list[str]:
    """LayerNorm parameter names of ``tower`` (image, text or both): for a tower with a range in ``layers``
    (``{"image": spec, "text": ...}``) those inside the named blocks; for one without (``ALL``, or None / absent)
    every LayerNorm of the tower."""
    out = []
    for t in ("image", "text") if tower == "both" else (tower,):
        names = layernorm_names(model, t)
        spec = layers.get(t)
        if spec not in (None, ALL):
            blocks = tower_block_names(model, t)
            prefixes = tuple(f"{blocks[i]}." for i in check_layers(model, f"{t}_layers", spec, t))
            names = [n for n in names if n.startswith(prefixes)]
        out += names
    return out
