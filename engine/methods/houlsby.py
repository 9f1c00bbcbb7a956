"""Houlsby adapters (Houlsby et al. 2019): residual bottlenecks after the attention and after the MLP of every block,
and the placement they share with ``leanclip.methods.compacter``.

``prepare(model, "houlsby", reduction=8, tower="both")`` gives every block of the selected towers two adapters::

    x = x + ls_1(adapter_attn(attention(ln_1(x))))      adapter(h) = h + up(gelu(down(h)))
    x = x + ls_2(adapter_mlp(mlp(ln_2(x))))             down: d -> d/reduction, up: d/reduction -> d

(the sub-layer output passes the adapter before the residual add, as in the paper; ``ls_*`` is open_clip's LayerScale,
an identity in CLIP's configs). ``up`` starts at zero (weight and bias), so the prepared model computes exactly what
the unprepared one did; ``down`` has nn.Linear's default init. Only the adapters are trained (combine with ``ln``
for the study's LN + adapter rows). Trainable count: 2 (2 d^2/r + d/r + d) per block; ViT-B-16 with the default
reduction 8 (bottleneck 96 on the 768-wide image tower, 64 on the 512-wide text tower): 3,559,680 + 1,586,688 =
5,146,368.

Default ``reduction=8``: Houlsby et al. sweep bottleneck sizes 8 to 256 for BERT widths of 768 / 1024 and Kim &
Pathak do not fix one for CLIP in anything at hand, so 8 (the width / 8 bottleneck) is this engine's choice, kept
the same for ``compacter`` so the two rows differ only in how the projections are parameterised.

On a ``transformers`` CLIP / SigLIP (``leanclip.models.transformers``) the same two sites are the attention's
``out_proj`` and the MLP's ``fc2`` (their outputs are the sub-layer outputs): the adapter is their child
(``...layers.<i>.self_attn.out_proj.houlsby``) run by a forward hook on them. On an open_clip Hugging Face text tower
(``leanclip.models.hf_text``) they are the dropouts after each sub-layer's output projection (BERT-style:
``attention.output.dropout`` / ``output.dropout``, before the residual add and the post-LN, as in Houlsby et al.'s
BERT code; mT5: ``layer.0.dropout`` / ``layer.1.dropout``), hooked the same way.

Placement (timm blocks: ``attn.proj_drop`` / ``mlp.drop2`` in place of ``ls_1`` / ``ls_2``, ``adapter_sites``): an
adapter is a child of the block's ``ls_1`` / ``ls_2`` module (``...resblocks.<i>.ls_1.houlsby``) with
a forward pre-hook on that module, so it runs wherever the block calls ``ls_1(...)``: open_clip's plain block and the
lean block alike (``lean=False`` works), every recompute policy included (the lean block checkpoints ``ls_1`` /
``ls_2`` with the branch once it holds trainable parameters, so the adapters are recomputed exactly). The frozen
projections stay on ``kernels.frozen_linear``. Re-preparing with ``houlsby`` replaces earlier Houlsby adapters;
another method leaves them in place, frozen (``leanclip.lifecycle.strip(model, houlsby.added())`` removes
them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leanclip.lifecycle import Added, strip
from leanclip.methods import lilt as _lilt
from leanclip.models import hf_text as _hftext
from leanclip.models import timm as _timm
from leanclip.models import transformers as _hf
from leanclip.models.openclip import class_name, tower_blocks
from leanclip.models.openclip_config import CONFIG_WIDTH_MAX
from leanclip.methods._options import Tower, tower_option
from leanclip.options import OptionRange, option
from leanclip.registry import register_method
from leanclip.select import check_tower, model_device, require_block_tower

__all__ = ["bottleneck", "is_adapter", "Bottleneck", "HoulsbyAdapter", "add_adapters", "added", "inlayer_adapters", "block_widths"]

SITES = ("ls_1", "ls_2")  # after the attention, after the MLP
# the bottleneck is width / reduction: no reduction beyond the widest tower a model config may have divides a width
REDUCTION_RANGE = OptionRange(int, 1, CONFIG_WIDTH_MAX)


def bottleneck(h: torch.Tensor, down: nn.Module, up: nn.Module) -> torch.Tensor:
    """``h + up(gelu(down(h)))`` in float32 (the frozen stream may be bf16), result in the input dtype."""
    return h + up(F.gelu(down(h.float()))).to(h.dtype)


def is_adapter(module: nn.Module) -> bool:
    """Whether ``module`` is an in-layer adapter (class attribute ``inlayer_adapter = True``: a module with ``down``
    and ``up`` whose forward is ``bottleneck``; ``leanclip.methods.compacter`` defines one without importing this class)."""
    return getattr(type(module), "inlayer_adapter", False) is True


class Bottleneck(nn.Module):
    """Base of in-layer adapters: subclasses set ``down`` and ``up`` (d -> m and m -> d, ``up`` zero at start)."""

    inlayer_adapter = True

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return bottleneck(h, self.down, self.up)


class HoulsbyAdapter(Bottleneck):
    def __init__(self, dim: int, reduction: int):
        super().__init__()
        hidden = dim // _lilt.check_reduction(reduction, dim)
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)


def _run_adapters(module: nn.Module, args):
    """Forward pre-hook on ``ls_1`` / ``ls_2``: its input passes every in-layer adapter child first (in insertion
    order). Module-level (not a closure) so ``copy.deepcopy`` and pickling keep pointing at the copy's adapters."""
    if not args:
        return None
    h = args[0]
    for child in module._modules.values():
        if is_adapter(child):
            h = child(h)
    return (h,) + tuple(args[1:])


def _run_adapters_after(module: nn.Module, args, output):
    """Forward hook on a projection whose output is a sub-layer's output (``leanclip.models.transformers``
    ``adapter_sites``): the output passes the projection's in-layer adapter children."""
    return _run_adapters(module, (output,))[0]


# ----------------------------------------------------------------------------------------------------------- placement
def adapter_sites(blk: nn.Module) -> list[tuple[nn.Module, int]]:
    """(module, width) of the two places an adapter goes in ``blk``: ``ls_1`` / ``ls_2`` of an open_clip block, the
    attention's ``proj_drop`` and the MLP's ``drop2`` of a timm block (``leanclip.models.timm.adapter_sites``: each
    sees its sub-layer's output before the layer scale and the residual add, Houlsby's placement); ValueError
    naming the class when the block has neither."""
    found = _timm.adapter_sites(blk)
    if found is not None:
        return found
    if not all(isinstance(getattr(blk, s, None), nn.Module) for s in SITES):
        raise ValueError(f"in-layer adapters need ls_1 / ls_2 in every block; got {class_name(blk)}")
    return [(getattr(blk, s), blk.attn.embed_dim) for s in SITES]


def block_widths(model: nn.Module, method: str, tower: str) -> list[int]:
    """The residual widths of the selected towers' blocks, after checking that they are transformer towers the lean
    engine implements (open_clip's, timm ViT / EVA) with adapter sites, or a ``transformers`` model (its sites:
    ``leanclip.models.transformers.adapter_sites``); the method's check uses it."""
    if _hf.is_transformers(model):
        return [width for *_, width in _hf.adapter_sites(model, check_tower(tower))]
    tower, hf_text = _hftext.split_tower(model, check_tower(tower))
    widths = [width for *_, width in _hftext.adapter_sites(model)] if hf_text else []
    if tower is None:
        return widths
    require_block_tower(model, method, tower, "it inserts adapters into the transformer blocks")
    return widths + [width for blk in tower_blocks(model, tower) for _, width in adapter_sites(blk)]


def _add_after(sites, name: str, make, device) -> list[nn.Module]:
    """``make(width)`` as child ``name`` of each site module, run on its output by a forward hook."""
    added = []
    for _, site, width in sites:
        site.add_module(name, make(width).to(device))
        if _run_adapters_after not in site._forward_hooks.values():
            site.register_forward_hook(_run_adapters_after)
        added.append(site._modules[name])
    return added


def add_adapters(model: nn.Module, tower: str, name: str, make) -> list[nn.Module]:
    """Insert ``make(width)`` as child ``name`` of both adapter sites of every block of ``tower`` (replacing one
    already there) and hook it in. Returns the adapters."""
    if _hf.is_transformers(model):  # on the sub-layers' output projections, after them
        return _add_after(_hf.adapter_sites(model, tower), name, make, model_device(model))
    tower, hf_text = _hftext.split_tower(model, tower)
    # a Hugging Face text tower: after each sub-layer's output dropout
    added = _add_after(_hftext.adapter_sites(model), name, make, model_device(model)) if hf_text else []
    for blk in tower_blocks(model, tower) if tower is not None else []:
        ref = next(blk.parameters())
        for site, width in adapter_sites(blk):
            site.add_module(name, make(width).to(ref.device))
            if _run_adapters not in site._forward_pre_hooks.values():
                site.register_forward_pre_hook(_run_adapters)
            added.append(site._modules[name])
    return added


def inlayer_adapters(model: nn.Module, cls: type | None = None) -> list[tuple[str, nn.Module]]:
    """(name, adapter) of every in-layer adapter (of class ``cls`` when given)."""
    return [(n, m) for n, m in model.named_modules() if is_adapter(m) and (cls is None or isinstance(m, cls))]


def added(cls: type | None = None) -> Added:
    """The in-layer adapters (of class ``cls`` when given) for ``leanclip.lifecycle.strip``; the ``ls_*`` pre-hook
    (and on a ``transformers`` model the projections' forward hook) goes once a module holds no adapter of any
    class."""
    return Added(owns=lambda m: is_adapter(m) and (cls is None or isinstance(m, cls)),
                 hooks={_run_adapters: is_adapter, _run_adapters_after: is_adapter})


# ----------------------------------------------------------------------------------------------------------- method
def _check_houlsby(model, reduction=8, tower="both", **_):
    for width in block_widths(model, "houlsby", tower):
        _lilt.check_reduction(reduction, width)


@dataclass(frozen=True)
class HoulsbyOptions:
    reduction: int = option(8, "the bottleneck is the block's width / reduction", range=REDUCTION_RANGE)
    tower: Tower = tower_option("that gets the adapters")


@register_method("houlsby", check=_check_houlsby, options=HoulsbyOptions)
def _houlsby(model, reduction=8, tower="both"):
    """Houlsby bottleneck adapters (d -> d/reduction -> d, GELU, zero-init up) after the attention and the MLP of
    every block of ``tower``."""
    strip(model, added(HoulsbyAdapter))
    add_adapters(model, tower, "houlsby", lambda width: HoulsbyAdapter(width, reduction))
    return {}
