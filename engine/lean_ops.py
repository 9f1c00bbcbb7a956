"""The fused ops of the lean modules: LayerNorm through ``kernels.layer_norm``, projections through
``kernels.frozen_linear`` where the weight is frozen (``lean_linear``), and the causal-mask check that lets a lean
block hand SDPA ``is_causal=True``. Shared by the open_clip lean block (``leanclip.lean_openclip``), the timm and
Hugging Face lean layers; ``leanclip.lean`` swaps them in."""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from leanclip import kernels
from leanclip.kernels import resolve_backend as _resolve_backend
from leanclip.models.openclip import LayerNorm, LayerNormFp32

_HALF = (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------------------- LayerNorm
def _aten_path(x: torch.Tensor, *params) -> bool:
    """Whether to call ATen's own op instead of ``kernels``: where kernels runs its torch backend (chosen for a CPU
    tensor without the Triton interpreter, or asked for), in float32 / float64 with parameters of x's dtype. That
    backend runs ATen's LayerNorm and GEMM itself, so the math is the same; the direct call saves a custom op's
    per-call cost, and ATen, too, keeps no frozen linear's input."""
    return (x.dtype in (torch.float32, torch.float64) and all(p is None or p.dtype == x.dtype for p in params)
            and _resolve_backend("layer_norm", x.device, x.dtype) == "torch")


def _ln_param(p: torch.Tensor | None, x: torch.Tensor):
    """kernels.layer_norm takes affine params in x's dtype or float32 (mixed precision); cast anything else."""
    if p is None or p.dtype == x.dtype or (p.dtype == torch.float32 and x.dtype in _HALF):
        return p
    return p.to(x.dtype)


def fused_layer_norm(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor | None:
    """``ln(x)`` through ``kernels.layer_norm`` (output in x's dtype), or None where the kernel does not apply (a
    normalized shape over several dims, no affine weight): the caller then runs the module's own forward."""
    if len(ln.normalized_shape) != 1 or ln.weight is None:
        return None
    weight, bias = _ln_param(ln.weight, x), _ln_param(ln.bias, x)
    if _aten_path(x, weight, bias):
        return F.layer_norm(x, ln.normalized_shape, weight, bias, ln.eps)
    return kernels.layer_norm(x, weight, bias, ln.eps).to(x.dtype)


class LeanLayerNorm(LayerNorm):
    """open_clip ``LayerNorm`` through ``kernels.layer_norm`` (output cast back to the input dtype)."""

    def forward(self, x: torch.Tensor):
        y = fused_layer_norm(self, x)
        return super().forward(x) if y is None else y


class LeanLayerNormFp32(LayerNormFp32):
    """open_clip ``LayerNormFp32`` through ``kernels.layer_norm``: computed in float32, cast back."""

    def forward(self, x: torch.Tensor):
        if len(self.normalized_shape) != 1:
            return super().forward(x)
        orig = x.dtype
        xf = x.to(torch.float32)
        weight, bias = _ln_param(self.weight, xf), _ln_param(self.bias, xf)
        if _aten_path(xf, weight, bias):
            return F.layer_norm(xf, self.normalized_shape, weight, bias, self.eps).to(orig)
        return kernels.layer_norm(xf, weight, bias, self.eps).to(orig)


# ----------------------------------------------------------------------------------------------------------- projections
def autocast_dtype(device_type: str):
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, RuntimeError, AttributeError):  # older torch signatures
        pass
    return None


def lean_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` for a trainable weight; ``kernels.frozen_linear`` (x not saved, db fused) for a frozen one.
    x is cast to the frozen weight's dtype (bf16 frozen weights); under autocast both go to the autocast dtype."""
    if weight.requires_grad:
        return F.linear(x, weight, bias)
    ac = autocast_dtype(x.device.type)
    if ac is not None and weight.dtype != ac and weight.dtype.is_floating_point:
        weight = weight.to(ac)
    if x.dtype != weight.dtype:
        x = x.to(weight.dtype)
    if bias is not None and bias.dtype != x.dtype and not (bias.dtype == torch.float32 and x.dtype in _HALF):
        bias = bias.to(x.dtype)
    if _aten_path(x, weight, bias):
        return F.linear(x, weight, bias)
    return kernels.frozen_linear(x, weight, bias)


# ----------------------------------------------------------------------------------------------------------- masks
_CAUSAL_CACHE: dict = {}


def is_causal_mask(mask: torch.Tensor | None, length: int) -> bool:
    """Whether ``mask[:length, :length]`` is the standard additive causal mask (-inf strictly above the diagonal,
    0 elsewhere). Cached per mask object and version (no device sync after the first check). Bool masks are never
    causal here: open_clip's block casts them to the activation dtype (an additive 0/1 mask)."""
    if (mask is None or mask.dim() != 2 or mask.shape[0] < length or mask.shape[1] < length
            or not mask.is_floating_point()):
        return False
    key = (id(mask), length)
    hit = _CAUSAL_CACHE.get(key)
    if hit is not None and hit[0]() is mask and hit[1] == mask._version:
        return hit[2]
    m = mask[:length, :length]
    upper = torch.ones(length, length, dtype=torch.bool, device=m.device).triu_(1)
    ok = bool(torch.isneginf(m[upper]).all()) and bool((m[~upper] == 0).all())
    if len(_CAUSAL_CACHE) > 64:
        _CAUSAL_CACHE.clear()
    _CAUSAL_CACHE[key] = (weakref.ref(mask), mask._version, ok)
    return ok
