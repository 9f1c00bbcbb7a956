"""``adapter`` (CLIP-Adapter): a residual bottleneck MLP on the image features, mixed with the features by ``ratio``."""
from __future__ import annotations

from dataclasses import dataclass

from leanclip import heads as _heads
from leanclip.methods import houlsby
from leanclip.options import OptionRange, option
from leanclip.registry import MethodTraits, register_method
from leanclip.select import embed_dim, model_device


def _check_adapter(model, reduction=4, ratio=0.2, **_):
    _heads.check_adapter_options(embed_dim(model), reduction, ratio)


@dataclass(frozen=True)
class ClipAdapterOptions:
    reduction: int = option(4, "the bottleneck's width is the embedding's / reduction", range=houlsby.REDUCTION_RANGE)
    ratio: float = option(0.2, "the adapted features' share of the mix", range=OptionRange(float, 0.0, 1.0))


@register_method("adapter", check=_check_adapter, traits=MethodTraits(hooks={"image_features": "clip_adapter"}),
                 options=ClipAdapterOptions)
def _adapter(model, reduction=4, ratio=0.2):
    """CLIP-Adapter: residual bottleneck MLP E -> E/reduction -> E (ReLU) on image features, mixed with ``ratio``."""
    e = embed_dim(model)
    dev = model_device(model)
    return {"clip_adapter": _heads.ClipAdapter(e, reduction, ratio).to(dev)}
