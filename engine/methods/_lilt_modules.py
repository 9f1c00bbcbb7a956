"""The modules LilT adds to a tower (``leanclip.methods.lilt``): bottleneck adapters before the LayerNorms of every
block (``lilt-adapter``) and the extra block appended to a tower (``lilt-deep``), each an exact identity at the start
(see ``leanclip.methods.lilt``), and ``ADDED``, what ``leanclip.lifecycle.strip`` removes of them."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from leanclip import lean
from leanclip.lifecycle import Added, strip
from leanclip.models import hf_text as _hftext
from leanclip.models import timm as _timm
from leanclip.models import transformers as _hf
from leanclip.models.openclip import (
    ResidualAttentionBlock, class_name, custom_tower_blocks, hf_text_tower, is_vit_image_tower, text_tower,
    timm_image_tower,
)
from leanclip.select import require_open_clip_tower, tower_class

DEEP_INITS = ("copy", "random")


# ----------------------------------------------------------------------------------------------------------- adapter
class Adapter(nn.Module):
    """Bottleneck adapter ``x + up(gelu(down(x)))`` with ``down: d -> d/reduction``, ``up: d/reduction -> d``;
    ``up`` is zero-initialised (exact identity at the start)."""

    def __init__(self, dim: int, reduction: int = 4):
        super().__init__()
        reduction = check_reduction(reduction, dim)
        self.dim, self.reduction = int(dim), reduction
        hidden = dim // reduction
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, reduction={self.reduction}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.gelu(self.down(x)))


def check_reduction(reduction, dim: int) -> int:
    if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
        raise ValueError(f"reduction must be a positive int, got {reduction!r}")
    if dim % reduction:
        raise ValueError(f"reduction={reduction} does not divide the width {dim} (the adapter bottleneck is "
                         f"width / reduction)")
    return reduction


def _adapter_pre_hook(module: nn.Module, args):
    """Forward pre-hook on a LayerNorm holding ``module.adapter``: ``ln(x)`` becomes ``ln(adapter(x))``.
    Module-level (not a closure) so ``copy.deepcopy`` and pickling keep pointing at the copy's own adapter."""
    adapter = module._modules.get("adapter")
    if adapter is None or not args:
        return None
    return (adapter(args[0]),) + tuple(args[1:])


# ----------------------------------------------------------------------------------------------------------- towers
def _towers(model: nn.Module, tower: str) -> list[tuple[str, nn.Module]]:
    """[(name prefix, open_clip Transformer)] of the selected towers."""
    out = []
    if tower in ("image", "both"):
        out.append(("visual.transformer.", model.visual.transformer))
    if tower in ("text", "both"):
        t = text_tower(model)
        if t is None:
            raise ValueError("LilT methods need an open_clip transformer text tower")
        out.append((f"{t.prefix}transformer.", t.transformer))
    return out


def adapters(model: nn.Module) -> list[tuple[str, Adapter]]:
    """(name, adapter) of every inserted adapter."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Adapter) and n.endswith(".adapter")]


def deep_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of every appended LilT block."""
    return [(n, m) for n, m in model.named_modules() if getattr(m, "leanclip_lilt_deep", False)]


def _is_adapter(module: nn.Module) -> bool:
    return isinstance(module, Adapter)


# the adapters (and the LayerNorm pre-hook that runs each) and the appended blocks: what ``strip`` removes (a
# ``transformers`` tower config then counts its layers again)
ADDED = Added(owns=lambda m: _is_adapter(m) or getattr(m, "leanclip_lilt_deep", False),
              hooks={_adapter_pre_hook: _is_adapter}, after=_hf.sync_layer_counts)


def adapter_layernorms(model: nn.Module, tower: str) -> list[nn.Module]:
    """The LayerNorms an adapter goes before, in ``tower``: ``ln_1`` / ``ln_2`` of every open_clip block; on a timm
    image tower the pre-norms ``norm1`` / ``norm2`` of each block (as open_clip's; not EVA's sub-LNs or q/k norms); on
    a Hugging Face text tower every LayerNorm inside each transformer block (BERT: ``attention.output.LayerNorm`` /
    ``output.LayerNorm``, post-LN: there the adapter acts on the residual sum the LayerNorm normalises)."""
    out = []
    for t in ("image", "text") if tower == "both" else (tower,):
        if (t == "image" and is_vit_image_tower(model)) or (t == "text" and text_tower(model) is not None):
            for _, tr in _towers(model, t):
                for blk in tr.resblocks:
                    for ln_name in ("ln_1", "ln_2"):
                        ln = getattr(blk, ln_name, None)
                        if not isinstance(ln, nn.LayerNorm) or len(ln.normalized_shape) != 1:
                            raise ValueError(f"lilt-adapter needs LayerNorm {ln_name} in every block (got "
                                             f"{type(ln).__name__})")
                        out.append(ln)
            continue
        blocks = _hf.tower_layers(model, t) if _hf.is_transformers(model) else custom_tower_blocks(model, t)
        lns = [_timm.prenorms(blk) or [m for m in blk.modules() if isinstance(m, nn.LayerNorm)
                                       and len(m.normalized_shape) == 1] for _, blk in blocks]
        if not blocks or not all(lns):
            raise ValueError(f"method 'lilt-adapter' needs transformer blocks with LayerNorms (an open_clip tower, a "
                             f"timm ViT or a Hugging Face encoder); the {t} tower is {tower_class(model, t)}")
        out += [ln for group in lns for ln in group]
    return out


def add_adapters(model: nn.Module, reduction: int = 4, tower: str = "both") -> list[Adapter]:
    """Insert an adapter before ``ln_1`` and ``ln_2`` of every block of ``tower`` (in place; on timm / Hugging Face
    towers before every LayerNorm of each block); returns them."""
    added = []
    todo = adapter_layernorms(model, tower)
    for ln in todo:
        check_reduction(reduction, ln.normalized_shape[0])  # validate everything before changing anything
    for ln in todo:
        p = ln.weight if ln.weight is not None else next(iter(ln.parameters()), None)
        ad = Adapter(ln.normalized_shape[0], reduction)
        if p is not None:
            ad = ad.to(p.device)
        ln.add_module("adapter", ad)
        ln.register_forward_pre_hook(_adapter_pre_hook)
        added.append(ad)
    return added


def _new_block_like(blk: nn.Module, init: str) -> nn.Module:
    if init == "copy":
        new = copy.deepcopy(blk)
    else:
        width = blk.attn.embed_dim
        heads = blk.attn.num_heads
        mlp_ratio = blk.mlp.c_fc.out_features / width
        ls = getattr(blk.ls_1, "gamma", None)
        new = ResidualAttentionBlock(width, heads, mlp_ratio, ls_init_value=None if ls is None else float(ls.mean()),
                                     act_layer=type(blk.mlp.gelu), norm_layer=_base_ln_class(blk.ln_1),
                                     batch_first=getattr(blk.attn, "batch_first", True))
        attn_std = width ** -0.5
        fc_std = (2 * width) ** -0.5
        nn.init.normal_(new.attn.in_proj_weight, std=attn_std)
        nn.init.zeros_(new.attn.in_proj_bias)
        nn.init.normal_(new.mlp.c_fc.weight, std=fc_std)
        nn.init.zeros_(new.mlp.c_fc.bias)
        ref = blk.mlp.c_fc.weight
        new = new.to(device=ref.device, dtype=torch.float32)
    for mod in (new.attn.out_proj, new.mlp.c_proj):
        nn.init.zeros_(mod.weight)
        if mod.bias is not None:
            nn.init.zeros_(mod.bias)
    new.float()
    strip(new, ADDED)  # a copy of a block that carried adapters must not keep them
    new.leanclip_lilt_deep = True
    return new


def _base_ln_class(ln: nn.Module):
    return lean.plain_class(type(ln))


def check_deep_towers(model: nn.Module, tower: str) -> None:
    """ValueError naming the class unless every tower of ``tower`` takes an appended block: an open_clip transformer
    tower, a timm ViT / EVA trunk, a Hugging Face BERT-style text tower or a ``transformers`` CLIP / SigLIP tower."""
    for t in ("image", "text") if tower == "both" else (tower,):
        if t == "image" and timm_image_tower(model) is not None:
            last = (_timm.trunk_blocks(model.visual) or [None])[-1]
            if last is None or not _timm.is_timm_block(last):
                raise ValueError(f"method 'lilt-deep' appends a timm ViT block; the image tower "
                                 f"{tower_class(model, 'image')} ends in {class_name(last)}")
        elif _hf.is_transformers(model):
            _hf.check_deep_tower(model, t)
        elif t == "text" and hf_text_tower(model) is not None:
            last = (_hftext.layers(model) or [(None, None)])[-1][1]
            if not _hftext.is_bert_layer(last):
                raise ValueError(f"method 'lilt-deep' appends a BERT-style encoder layer; the text tower "
                                 f"{tower_class(model, 'text')} is made of {class_name(last)}")
        else:
            require_open_clip_tower(model, "lilt-deep", t, "it appends an open_clip transformer block to the "
                                    "tower; timm ViT and Hugging Face BERT-style towers take a block of their own")


def _append_deep(model: nn.Module, which: str, init: str) -> nn.Module:
    """Append the tower's extra block (``add_deep_blocks``) to the ``which`` tower; returns it."""
    if _hf.is_transformers(model):
        new = _hf.new_layer_like(model, which, init)
        strip(new, ADDED)
        new.leanclip_lilt_deep = True
        _hf.append_layer(model, which, new)
    elif which == "image" and timm_image_tower(model) is not None:
        new = _timm.new_block_like(model.visual, init)
        strip(new, ADDED)
        _timm.append_block(model.visual, new)
    elif which == "text" and hf_text_tower(model) is not None:
        new = _hftext.new_layer_like(model, init)
        strip(new, ADDED)
        _hftext.append_layer(model, new)
    else:
        (_, tr), = _towers(model, which)
        base = [b for b in tr.resblocks if not getattr(b, "leanclip_lilt_deep", False)]
        if not base:
            raise ValueError("lilt-deep needs a tower with at least one block")
        new = _new_block_like(base[-1], init)
        tr.resblocks.append(new)
    new.leanclip_lilt_deep = True
    new.requires_grad_(True)
    return new


def add_deep_blocks(model: nn.Module, tower: str = "both", init: str = "copy") -> list[nn.Module]:
    """Append one block to each selected tower; returns the new blocks. open_clip, timm and ``transformers`` CLIP /
    SigLIP towers (pre-LN) get a block whose output projections are zero, the identity; a Hugging Face BERT-style tower (post-LN) a copy of its
    last layer or a freshly initialised one (``leanclip.models.hf_text.new_layer_like``), which changes its output."""
    if init not in DEEP_INITS:
        raise ValueError(f"deep_init must be one of {DEEP_INITS}, got {init!r}")
    check_deep_towers(model, tower)
    return [_append_deep(model, t, init) for t in (("image", "text") if tower == "both" else (tower,))]
