"""Tower geometry: what the memory estimates need to know of a transformer tower, read in one place per family.

``leanclip.saved_bytes.estimate_saved_bytes`` (bytes kept for backward) and ``leanclip.budget`` (a step's peak and the
recompute plan) both need, per tower, its blocks, tokens per sample, width, MLP hidden width, heads, element size,
whether its last block runs at the pooled rows only and whether an attention-pooling (MAP) head reads every token.
They read it here, so the two estimates cannot disagree about a tower.

open_clip towers (``VisionTransformer``, the transformer text tower) are read here; other families register a reader
(``register_family``): ``leanclip.models.timm`` for timm trunks inside open_clip's ``TimmModel`` (ViT ``Block`` /
``EvaBlock``: SigLIP / SigLIP2, EVA02, PE-Core), ``leanclip.models.transformers`` for Hugging Face CLIP / SigLIP
towers, ``leanclip.models.hf_text`` for open_clip's Hugging Face text towers (BERT / RoBERTa / XLM-R layers). A
reader also gives ``units``: the activation units (B*L*D elements) one block keeps for backward under each
recompute policy, the block's layout decided (fused or separate qkv, q/k norm or rotary, GELU, quick-GELU or gated
MLP, sub-LayerNorms, post-LN with dropouts): the budget scales the measured transient of a block's backward by
them.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch
from torch import nn

from leanclip.models.openclip import VisionTransformer, pools_at_eot, text_tower

# open_clip's block (c_fc -> GELU -> c_proj): saved units per policy at MLP ratio r = hidden / width (r = 4: 10, 6, 3,
# 1): LN1 in 1, q/k/v 3, attention out 1, LN2 in 1, GELU in r.
_FAMILIES: list = []
_FAMILY_MODULES = ("leanclip.models.timm", "leanclip.models.transformers", "leanclip.models.hf_text")


@dataclass(frozen=True)
class TowerGeometry:
    """One tower as the estimates see it. ``blocks`` bottom first; ``tokens`` per sample; ``hidden`` the MLP's hidden
    width (a gated MLP: one of its halves); ``units[policy]`` activation units (B*L*D) one block keeps under each
    recompute policy; ``rows_last``: the last block runs at the pooled row of each sample only; ``map_head``: an
    attention-pooling head reads keys and values of every token after the blocks."""
    name: str
    family: str
    blocks: tuple
    tokens: int
    width: int
    hidden: int
    gated: bool
    heads: int
    elem: int
    rows_last: bool = False
    map_head: bool = False
    units: dict = field(default_factory=dict)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def unit(self, rows: int) -> float:
        """Bytes of one activation unit over ``rows`` samples (rows * tokens * width * elem)."""
        return float(rows) * self.tokens * self.width * self.elem

    def transient_scale(self) -> float:
        """A block's units without recompute relative to open_clip's ViT block at MLP ratio 4 (10 units), the block
        the budget's transient constants were measured on."""
        return self.units["none"] / 10.0


def is_lean_block(m: nn.Module) -> bool:
    """Whether ``m`` is a lean block of any family (it carries a recompute policy)."""
    return hasattr(type(m), "leanclip_recompute") and hasattr(m, "forward")


def elem_size(dtype: torch.dtype | None, weight: torch.Tensor) -> int:
    """Bytes per activation element: ``dtype`` (the autocast / activation dtype) or the frozen weights' dtype."""
    return torch.empty((), dtype=dtype or weight.dtype).element_size()


def openclip_units(width: int, hidden: int) -> dict:
    r = hidden / width
    return {"none": 6.0 + r, "mlp": 6.0, "mlp+qkv": 3.0, "block": 1.0}


def _openclip_tower(name, blocks, tokens, width, elem, rows_last) -> TowerGeometry:
    blk = blocks[0]
    hidden = blk.mlp.c_fc.out_features
    return TowerGeometry(name, "openclip", tuple(blocks), tokens, width, hidden, False, blk.attn.num_heads, elem,
                         rows_last, False, openclip_units(width, hidden))


def _openclip(model: nn.Module, tower: str, dtype, text_len) -> TowerGeometry | None:
    if tower == "image":
        vis = getattr(model, "visual", None)
        if not isinstance(vis, VisionTransformer):
            return None
        blocks = list(vis.transformer.resblocks)
        rows = bool(getattr(vis, "reads_cls_only", lambda: False)())  # the lean tower's pooled-row last block
        return _openclip_tower("image", blocks, vis.grid_size[0] * vis.grid_size[1] + 1, vis.transformer.width,
                               elem_size(dtype, blocks[0].mlp.c_fc.weight), rows)
    t = text_tower(model)
    if t is None:
        return None
    blocks = list(t.transformer.resblocks)
    tokens = t.positional_embedding.shape[0] if text_len is None else int(text_len)
    rows = (t.cls_emb is None and not t.pad_mask and pools_at_eot(t.pool_type, t.eos_id) and len(blocks) > 0
            and hasattr(blocks[-1], "forward_rows") and getattr(t.transformer, "batch_first", True)
            and not t.transformer.grad_checkpointing)  # leanclip.lean.rows_ok: the lean text tower's EOT-row block
    return _openclip_tower("text", blocks, tokens, t.transformer.width, elem_size(dtype, blocks[0].mlp.c_fc.weight),
                           rows)


def register_family(reader) -> None:
    """Add ``reader(model, tower, dtype, text_len) -> TowerGeometry | None`` (None: not a tower of its family)."""
    if reader not in _FAMILIES:
        _FAMILIES.append(reader)


def _load_families() -> None:
    for name in _FAMILY_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # pragma: no cover - timm is optional for open_clip
            pass


def tower_geometry(model: nn.Module, tower: str, *, dtype: torch.dtype | None = None,
                   text_len: int | None = None) -> TowerGeometry | None:
    """The ``"image"`` or ``"text"`` tower of ``model`` (None: no transformer tower the estimates know). ``dtype``:
    the activation dtype (default: the frozen block weights'); ``text_len``: the text tokens per prompt (default:
    the full context)."""
    if tower not in ("image", "text"):
        raise ValueError(f"tower must be 'image' or 'text', got {tower!r}")
    found = _openclip(model, tower, dtype, text_len)
    if found is not None:
        return found if found.blocks else None
    _load_families()
    for reader in _FAMILIES:
        found = reader(model, tower, dtype, text_len)
        if found is not None:
            return found if found.blocks else None
    return None


def towers(model: nn.Module, **kw) -> list[TowerGeometry]:
    """Every tower ``tower_geometry`` knows, image first."""
    return [g for g in (tower_geometry(model, t, **kw) for t in ("image", "text")) if g is not None]
