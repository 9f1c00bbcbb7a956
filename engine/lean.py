"""Lean open_clip modules: fused ops, SDPA attention, exact recompute, EOT truncation.

``apply_lean(model, recompute)`` swaps, in place and keeping every parameter name and value:

- open_clip ``LayerNorm`` / ``LayerNormFp32`` -> ``LeanLayerNorm`` / ``LeanLayerNormFp32`` (``kernels.layer_norm``;
  same dtype semantics: output in the input dtype, the Fp32 variant computes in float32);
- every default ``ResidualAttentionBlock`` -> ``LeanResidualAttentionBlock``: the attention uses
  ``attn.in_proj_weight/bias`` and ``attn.out_proj`` directly with ``F.scaled_dot_product_attention`` (a causal
  text mask becomes ``is_causal=True``), projections whose weight is frozen (``attn`` in/out, ``mlp.c_fc``,
  ``mlp.c_proj``) run through ``kernels.frozen_linear`` (input not saved, db fused); a trainable weight (``full``)
  keeps ``F.linear``. ``ls_1``/``ls_2`` and ``batch_first`` behave as in open_clip 3.3.

Methods that change a block's projections (LoRA) attach a ``ProjectionDelta`` child to the block: the lean block adds
its term to each frozen projection (``in_proj``, ``out_proj``, ``c_fc``, ``c_proj``) inside the same branch functions,
so the frozen GEMM keeps ``kernels.frozen_linear`` and every recompute policy stays exact.

The swap is a ``__class__`` change (``remove_lean`` undoes it), so ``state_dict`` names, ``deepcopy`` and open_clip's
own forward code (``encode_image``, ``encode_text``) keep working. timm image towers (SigLIP / SigLIP2, EVA02,
PE-Core: ``vision_transformer.Block`` and ``eva.EvaBlock``) get lean blocks from ``leanclip.models.timm``, which
registers them here (``register_lean_classes``) and shares the recompute policies (``LeanBlockMixin``); open_clip's
Hugging Face text towers of BERT / RoBERTa / XLM-RoBERTa layers get lean layers from ``leanclip.models.hf_text``. It
is never a silent no-op: a tower, block or attention class it does not know (ModifiedResNet, ConvNeXt and other
convolutional timm trunks, Hugging Face text towers of other layers such as mT5's ``MT5Block``, open_clip's
``CustomResidualAttentionBlock``, an attention that is not ``nn.MultiheadAttention``) is named by
``tower_obstacles`` and ``apply_lean`` raises before changing anything; ``leanclip.prepare`` with the default
``lean=None`` then makes the other tower lean (``apply_lean(towers=...)``) and names the class that stays on its own
modules in one line.

Recompute policies (per lean block, set with ``set_recompute``), all exact (bit-identical math, no compression):

    none      keep what eager PyTorch keeps: per block ~10 units of B*L*D (LN1 in 1, q/k/v 3, attn out 1, LN2 in 1,
              GELU in 4)
    mlp       checkpoint ln_2 -> c_fc -> gelu (c_proj stays outside: a frozen projection saves nothing): the MLP
              keeps only its LN2 input                                                        ~6 units
    mlp+qkv   also checkpoint ln_1 -> in_proj -> SDPA with a selective-checkpoint policy that MUST_SAVEs the SDPA
              outputs (output + logsumexp): backward recomputes LN1 and the qkv GEMM, never the attention
              (out_proj stays outside)                                                              ~3 units
    block     keep only the block input (LN1, qkv, attention, out_proj, LN2, c_fc, GELU recomputed; c_proj
              again left outside)                                                                   1 unit

``block`` with a chunk (``set_recompute(model, "block", chunk=C)``) also bounds what the backward holds at once.
Unchunked, a block's backward recomputes the whole batch's activations (~10 units) before it can differentiate them;
that transient, not what is kept, sets the step's peak. The tower's weights are frozen, so there is no weight
gradient that needs the whole batch, and attention mixes tokens only within a sample: the forward and the backward
of the block can run over chunks of C samples (``_Chunked``). The block keeps its input (1 unit), and the
transient is one chunk's activations plus the incoming and outgoing gradients. The trainable parameters inside the
block (LayerNorm, biases, LoRA, adapters) receive the sum of their chunks' gradients: exact in float64, equal to
float32 rounding in float32 (the sum is taken in another order). Dropout is replayed per chunk from its RNG state.

Measured (``leanclip.memory.saved_activation_bytes``; ViT-B-16, batch 8, fp32, ``ln`` on both towers, 8 class prompts):
plain open_clip 710.5 MiB; lean none 545.5 (0.77x: EOT truncation, pooled-row last blocks), mlp 335.3 (0.47x),
mlp+qkv 167.8 (0.24x), block 62.0 (0.09x).

Checkpointed branches use non-reentrant ``torch.utils.checkpoint`` so trainable LayerNorm parameters inside them get
their gradients; a branch no gradient flows through is never checkpointed. Gradients under every policy are
bit-identical to ``none``. ``leanclip.saved_bytes.estimate_saved_bytes`` predicts the saved bytes of a training forward; ``leanclip.budget``
predicts a step's peak from it and plans, per block, the policy and chunk that fit a budget
(``prepare(..., recompute="auto", memory_budget=...)``).

``encode_text_lean(model, tokens)`` truncates the 77-token context to max(EOT position)+1 of the batch: attention is
causal and features are read at the EOT token, so the result is exactly that of the full context.

Only one token per sample is read after a tower (CLS for a ``tok``-pooled ViT, EOT for the text tower), so the last
block runs at that row only (``LeanResidualAttentionBlock.forward_rows``): k and v for every token, but q, the
attention, out_proj and the MLP for B rows instead of B*L - exact, and ~10/12 of a block's GEMMs saved.
``LeanVisionTransformer`` (swapped in like the blocks) does this when nothing else is read (no token outputs, no
attention pooling); ``encode_text_lean`` does it for ``argmax``/``eos`` pooling.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from leanclip import delta_hooks, kernels
from leanclip.kernels._backend import resolve as _resolve_backend
from leanclip.models import transformers as _hf
from leanclip.models.openclip import (  # noqa: F401  (text_tower, tower_blocks, class_name: re-exported)
    LayerNorm, LayerNormFp32, ResidualAttentionBlock, Transformer, VisionTransformer, block_supported, class_name,
    pool_index, pools_at_eot, text_global_pool, text_tower, tower_blocks, tower_class,
)

POLICIES = ("none", "mlp", "mlp+qkv", "block")  # fastest first
RECOMPUTE_CHOICES = POLICIES + ("auto",)
# Saved activation units (B*L*D elements) per frozen-weight block for each policy (see module docstring).
BLOCK_UNITS = {"none": 10, "mlp": 6, "mlp+qkv": 3, "block": 1}
_HALF = (torch.bfloat16, torch.float16)


def check_policy(policy, *, allow_auto: bool = False) -> str:
    valid = RECOMPUTE_CHOICES if allow_auto else POLICIES
    if policy not in valid:
        raise ValueError(f"unknown recompute policy {policy!r}; valid: {', '.join(repr(p) for p in valid)}")
    return policy


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
def _autocast_dtype(device_type: str):
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
    ac = _autocast_dtype(x.device.type)
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


def _is_causal_mask(mask: torch.Tensor | None, length: int) -> bool:
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


def _sdpa_mask(mask: torch.Tensor | None, batch: int, heads: int, length: int, dtype: torch.dtype):
    """An open_clip block mask (2-D (L', L') with L' >= L, or 3-D (N*H, L, L)) as an SDPA additive mask in
    ``dtype``. Like open_clip's ``ResidualAttentionBlock.attention`` the mask is cast to the activation dtype first
    (so a bool mask acts as an additive 0/1 mask there too)."""
    if mask is None:
        return None
    mask = mask.to(dtype)
    if mask.dim() == 2:
        mask = mask[:length, :length]
    elif mask.dim() == 3:
        mask = mask.reshape(batch, heads, length, length)
    return mask


# ----------------------------------------------------------------------------------------------------------- SAC policy
def _sdpa_ops() -> frozenset:
    names = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_fused_attention_overrideable")
    ops = set()
    for n in names:
        pkt = getattr(torch.ops.aten, n, None)
        if pkt is not None and hasattr(pkt, "default"):
            ops.add(pkt.default)
    return frozenset(ops)


SDPA_OPS = _sdpa_ops()


def _save_sdpa_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in SDPA_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_SAC_CONTEXT = functools.partial(create_selective_checkpoint_contexts, _save_sdpa_policy)
# Route SAC-cached tensors through outer saved_tensors_hooks (save_on_cpu, leanclip.memory's counter) where supported.
_CKPT_KW = ({"respect_saved_tensors_hooks": True}
            if "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters else {})
# Whether leanclip.memory's counter sees what mlp+qkv's selective checkpoint caches (not on torch 2.11's checkpoint)
SAC_CACHE_COUNTED = bool(_CKPT_KW)


def _ckpt(fn, *args, rng: bool = False, sac: bool = False):
    kw = dict(_CKPT_KW) if sac else {}
    if sac:
        kw["context_fn"] = _SAC_CONTEXT
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=rng, **kw)


def _frozen(*mods_or_params) -> bool:
    for m in mods_or_params:
        if isinstance(m, nn.Module):
            if any(p.requires_grad for p in m.parameters()):
                return False
        elif m is not None and m.requires_grad:
            return False
    return True


# ----------------------------------------------------------------------------------------------------------- deltas
PROJECTION_SITES = ("in_proj", "out_proj", "c_fc", "c_proj")


class ProjectionDelta(nn.Module):
    """A module a method attaches to a lean block (as a child, under any name) to add a trainable term to the
    block's frozen projections: the block computes ``lean_linear(x, W, b) + delta(site, x, start, stop)`` for each
    site of ``PROJECTION_SITES`` (``in_proj`` packs q | k | v, ``start``/``stop`` select output features of it: the
    last block's pooled rows compute q and k|v apart). ``delta`` returns None where it adds nothing. The frozen
    weight stays on ``kernels.frozen_linear`` (no weight gradient), and because the term is computed inside the same
    branch functions as the projection, every recompute policy recomputes it exactly (the RNG state is preserved
    when ``needs_rng()``). A plain block applies it only where its family says where it calls its projections
    (timm's blocks: ``leanclip.delta_hooks``); ``remove_lean`` refuses any other block that holds one."""

    def delta(self, site: str, x: torch.Tensor, start: int, stop: int) -> torch.Tensor | None:
        raise NotImplementedError

    def sites(self) -> tuple[str, ...]:
        """The ``PROJECTION_SITES`` this module adds to (default: all of them): where its trainable parameters sit
        in the block, for the recompute policies' choice of what to checkpoint."""
        return PROJECTION_SITES

    def needs_rng(self) -> bool:
        """Whether the forward draws random numbers (dropout in training mode): recompute must replay them."""
        return self.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.modules())


# ----------------------------------------------------------------------------------------------------------- chunks
def _mask_rows(mask, start: int, stop: int, batch: int):
    """An SDPA mask for samples [start, stop): per-sample masks (B, H, L, L) are sliced, shared ones broadcast. A
    tuple (a timm block's mask and rotary embedding) is sliced item by item; a per-sample rotary embedding is
    (B, L, D)."""
    if isinstance(mask, tuple):
        return tuple(_mask_rows(m, start, stop, batch) for m in mask)
    if isinstance(mask, torch.Tensor) and mask.dim() >= 3 and mask.shape[0] == batch:
        return mask[start:stop]
    return mask


def _rng_states(device: torch.device) -> tuple:
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _replayed_rng(states, device: torch.device):
    """A context in which the RNG draws what it drew when ``states`` were taken (and is left as it was after)."""
    if states is None:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def replay():
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.set_rng_state(states[0])
            if states[1] is not None:
                torch.cuda.set_rng_state(states[1], device)
            yield
    return replay()


class _Chunked(torch.autograd.Function):
    """``forward(xc, start, stop)`` over chunks of ``chunk`` samples of ``x``, keeping only ``x``; the backward
    recomputes and differentiates one chunk at a time. ``recompute(xc, start, stop, grad_yc) -> (outputs,
    grad_outputs)`` (optional) gives the tensors to differentiate for a chunk and their incoming gradients, when that
    is cheaper than re-running ``forward`` (a frozen last projection: its input's gradient needs no forward GEMM).
    ``params`` are the trainable parameters ``forward`` reads (children included: LoRA, adapters), passed in so
    that autograd returns their gradients, summed over the chunks."""

    @staticmethod
    def forward(ctx, forward, recompute, x, chunk, rng, *params):
        batch = x.shape[0]
        y = None
        ctx.rng_states = []
        for start in range(0, batch, chunk):
            stop = min(start + chunk, batch)
            ctx.rng_states.append(_rng_states(x.device) if rng else None)
            yc = forward(x[start:stop], start, stop)
            if y is None:
                y = yc.new_empty((batch, *yc.shape[1:]))
            y[start:stop] = yc
        ctx.fns, ctx.chunk = (forward, recompute), chunk
        ctx.save_for_backward(x, *params)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, *params = ctx.saved_tensors
        forward, recompute = ctx.fns
        need_x = ctx.needs_input_grad[2]
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[5:]) if need]
        grad_x = torch.empty_like(x) if need_x else None
        grad_params = [None] * len(wanted)
        for i, start in enumerate(range(0, x.shape[0], ctx.chunk)):
            stop = min(start + ctx.chunk, x.shape[0])
            xc = x[start:stop].detach().requires_grad_(need_x)
            with torch.enable_grad(), _replayed_rng(ctx.rng_states[i], x.device):
                if recompute is None:
                    outs, grad_outs = [forward(xc, start, stop)], [grad_y[start:stop]]
                else:
                    outs, grad_outs = recompute(xc, start, stop, grad_y[start:stop])
            grads = torch.autograd.grad(outs, ([xc] if need_x else []) + wanted, grad_outs, allow_unused=True)
            if need_x:
                grad_x[start:stop] = grads[0]
                grads = grads[1:]
            for j, g in enumerate(grads):
                if g is not None:
                    grad_params[j] = g if grad_params[j] is None else grad_params[j] + g
        it = iter(grad_params)
        per_param = [next(it) if need else None for need in ctx.needs_input_grad[5:]]
        return (None, None, grad_x, None, None, *per_param)


# ----------------------------------------------------------------------------------------------------------- block
class LeanBlockMixin:
    """The recompute policies of a lean pre-LN transformer block, over branch functions the block defines:

    ``_attn_core(x, mask, is_causal)`` LN1 -> q/k/v -> SDPA output; ``_attn_out(o)`` the rest of the attention branch
    (output projection, layer scale); ``_mlp_core(x)`` LN2 -> first MLP projection -> activation; ``_mlp_out(g)`` the
    last MLP projection and layer scale; ``_branch_parts()`` the modules / parameters of each piece (``attn_core``,
    ``attn_out``, ``attn``, ``mlp_core``, ``mlp_out``, ``mlp``: whether a piece holds a trainable parameter decides
    what is checkpointed, and a frozen output projection stays outside the checkpoints); ``_needs_rng()``.
    ``mask`` is passed through untouched (open_clip's blocks: an SDPA mask; timm's: the pair (mask, rotary
    embedding)). ``leanclip.models.timm`` implements the same branches for timm blocks."""

    leanclip_recompute = "none"
    leanclip_chunk = None  # samples per chunk under "block" (None: the whole batch at once)

    # -- projections: frozen GEMM + the deltas of attached ProjectionDelta modules --
    def _deltas(self) -> list:
        return [m for m in self._modules.values() if isinstance(m, ProjectionDelta)]

    def _project(self, site: str, x, weight, bias, start: int = 0, stop: int | None = None):
        """``lean_linear(x, weight, bias)`` plus every attached delta for output features [start, stop) of
        ``site`` (``weight`` holds exactly those features)."""
        y = lean_linear(x, weight, bias)
        stop = start + weight.shape[0] if stop is None else stop
        for m in self._deltas():
            d = m.delta(site, x, start, stop)
            if d is not None:
                y = y + d.to(y.dtype)
        return y

    def _attn(self, x, mask, is_causal: bool):
        return self._attn_out(self._attn_core(x, mask, is_causal))

    def _parts_with_deltas(self) -> dict:
        """``_branch_parts`` with each attached delta counted in the pieces whose projections it adds to (a LoRA
        pair is a child of the block, not of the projection: without this its trainable parameters would not make
        their branch checkpointed, and the branch would keep eager PyTorch's activations)."""
        parts = {k: list(v) for k, v in self._branch_parts().items()}
        where = {"in_proj": ("attn_core", "attn"), "out_proj": ("attn_out", "attn"), "c_fc": ("mlp_core", "mlp"),
                 "c_proj": ("mlp_out", "mlp")}
        for m in self._deltas():
            for site in m.sites():
                for key in where[site]:
                    parts[key].append(m)
        return parts

    def _mlp(self, x):
        return self._mlp_out(self._mlp_core(x))

    def _plain(self, x, mask, is_causal: bool):
        x = x + self._attn(x, mask, is_causal)
        return x + self._mlp(x)

    def _block_head(self, x, mask, is_causal: bool):
        x1 = x + self._attn(x, mask, is_causal)
        return x1, self._mlp_core(x1)

    def _recompute(self, x, mask, is_causal: bool, policy: str):
        """Forward under a recompute policy. A branch is checkpointed only when gradients flow through it (its input
        needs grad or it holds a trainable parameter): elsewhere nothing is saved anyway and checkpointing would
        only add work (and keep its input). Projections with a frozen weight (and frozen LayerScale) stay outside
        the checkpoints: they save nothing, so recomputing them would be wasted."""
        parts = self._parts_with_deltas()
        rng = self._needs_rng()
        out_proj_outside = _frozen(*parts["attn_out"])
        c_proj_outside = _frozen(*parts["mlp_out"])
        if policy == "block":
            inside = parts["attn"] + parts["mlp_core"] + ([] if c_proj_outside else parts["mlp"])
            if not (x.requires_grad or not _frozen(*inside)):
                return self._plain(x, mask, is_causal)
            if self.leanclip_chunk is not None and x.shape[0] > self.leanclip_chunk:
                return self._chunked(x, mask, is_causal, rng, skip_mlp_out=c_proj_outside)
            if c_proj_outside:
                x1, g = _ckpt(self._block_head, x, mask, is_causal, rng=rng)
                return x1 + self._mlp_out(g)
            return _ckpt(self._plain, x, mask, is_causal, rng=rng)
        # attention branch
        if policy == "mlp+qkv":
            core = parts["attn_core"]
            if out_proj_outside:
                if x.requires_grad or not _frozen(*core):
                    a = self._attn_out(_ckpt(self._attn_core, x, mask, is_causal, rng=rng, sac=True))
                else:
                    a = self._attn(x, mask, is_causal)
            elif x.requires_grad or not _frozen(*core, *parts["attn"]):
                a = _ckpt(self._attn, x, mask, is_causal, rng=rng, sac=True)
            else:
                a = self._attn(x, mask, is_causal)
        else:
            a = self._attn(x, mask, is_causal)
        x = x + a
        # MLP branch
        if c_proj_outside:
            if x.requires_grad or not _frozen(*parts["mlp_core"]):
                return x + self._mlp_out(_ckpt(self._mlp_core, x, rng=rng))
            return x + self._mlp(x)
        if x.requires_grad or not _frozen(*parts["mlp"]):
            return x + _ckpt(self._mlp, x, rng=rng)
        return x + self._mlp(x)


    # -- chunks of samples (``block`` with ``leanclip_chunk``) --
    def _mlp_out_input_grad(self, grad_y: torch.Tensor, g: torch.Tensor) -> torch.Tensor | None:
        """d loss / d g for ``y = x1 + _mlp_out(g)`` where the last MLP projection and its layer scale are frozen,
        from ``grad_y`` and the weight alone (no forward GEMM), or None where the block does not provide it (a
        chunk's recompute then runs ``_mlp_out`` too)."""
        return None

    def _chunked(self, x, mask, is_causal: bool, rng: bool, skip_mlp_out: bool):
        """The block over chunks of ``leanclip_chunk`` samples (``_Chunked``): the transient of its backward is one
        chunk's activations. Where the last MLP projection is frozen (``skip_mlp_out``) and the block gives its input
        gradient, a chunk's recompute stops at that projection's input: its output is needed by no gradient."""
        batch = x.shape[0]

        def forward(xc, start, stop):
            return self._plain(xc, _mask_rows(mask, start, stop, batch), is_causal)

        def recompute(xc, start, stop, grad_yc):
            x1, g = self._block_head(xc, _mask_rows(mask, start, stop, batch), is_causal)
            dg = self._mlp_out_input_grad(grad_yc, g)
            if dg is None:
                return (x1 + self._mlp_out(g),), (grad_yc,)
            return (x1, g), (grad_yc, dg)

        trainable = [p for p in self.parameters() if p.requires_grad]
        return _Chunked.apply(forward, recompute if skip_mlp_out else None, x, self.leanclip_chunk, rng, *trainable)


class LeanResidualAttentionBlock(LeanBlockMixin, ResidualAttentionBlock):
    """open_clip ``ResidualAttentionBlock`` with SDPA attention, fused frozen projections and a recompute policy
    (``self.leanclip_recompute``). Parameters, names and math are those of the original block."""
    lean_block = True  # the layout leanclip.models.openclip.block_supported accepts

    def _proj(self, site: str, x, weight, bias, start: int = 0, stop: int | None = None):
        """``_project`` over output features [start, stop) of the full projection ``weight`` of ``site``."""
        stop = weight.shape[0] if stop is None else stop
        if (start, stop) != (0, weight.shape[0]):
            weight, bias = weight[start:stop], None if bias is None else bias[start:stop]
        return self._project(site, x, weight, bias, start, stop)

    def _needs_rng(self) -> bool:
        return self.training and (self.attn.dropout > 0 or any(m.needs_rng() for m in self._deltas()))

    def _branch_parts(self) -> dict:
        attn, mlp = self.attn, self.mlp
        return {"attn_core": [self.ln_1, attn.in_proj_weight, attn.in_proj_bias],
                "attn_out": [attn.out_proj.weight, self.ls_1], "attn": [self.ln_1, attn, self.ls_1],
                "mlp_core": [self.ln_2, mlp.c_fc], "mlp_out": [mlp.c_proj.weight, self.ls_2],
                "mlp": [self.ln_2, mlp, self.ls_2]}

    # -- branches (x is (B, L, D) batch-first) --
    def _attn_core(self, x, mask, is_causal: bool):
        attn = self.attn
        b, n, d = x.shape
        h = attn.num_heads
        qkv = self._proj("in_proj", self.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        if mask is not None:
            mask = mask.to(q.dtype)
        p = attn.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal)

    def _attn_out(self, o):
        b, h, n, hd = o.shape
        o = o.transpose(1, 2).reshape(b, n, h * hd)
        return self.ls_1(self._proj("out_proj", o, self.attn.out_proj.weight, self.attn.out_proj.bias))

    def _mlp_core(self, x):
        return self.mlp.gelu(self._proj("c_fc", self.ln_2(x), self.mlp.c_fc.weight, self.mlp.c_fc.bias))

    def _mlp_out(self, g):
        return self.ls_2(self._proj("c_proj", g, self.mlp.c_proj.weight, self.mlp.c_proj.bias))

    def _mlp_out_input_grad(self, grad_y: torch.Tensor, g: torch.Tensor) -> torch.Tensor | None:
        """The product autograd's backward of ``lean_linear`` forms for c_proj's input (in the dtype the forward's
        GEMM ran in): c_proj's bias frozen too, ls_2 an Identity or a LayerScale, and no delta on c_proj."""
        ls = self.ls_2
        if not _frozen(self.mlp.c_proj.bias) or any("c_proj" in m.sites() for m in self._deltas()):
            return None
        if not (isinstance(ls, nn.Identity) or isinstance(getattr(ls, "gamma", None), torch.Tensor)):
            return None
        gy = grad_y if isinstance(ls, nn.Identity) else grad_y * ls.gamma
        w = self.mlp.c_proj.weight
        ac = _autocast_dtype(gy.device.type)
        if ac is not None and w.dtype != ac and w.dtype.is_floating_point:
            w = w.to(ac)
        return (gy.to(w.dtype) @ w).to(g.dtype)

    # -- the last block, at one query position per sample --
    def _rows_core(self, x, rows, mask):
        """Block output (B, D) at position ``rows[b]`` of each sample. Exact: other positions reach it only through
        their keys and values, so q, attention, out_proj and the MLP run on B rows instead of B*L."""
        attn = self.attn
        b, n, d = x.shape
        h = attn.num_heads
        w, bias = attn.in_proj_weight, attn.in_proj_bias
        y = self.ln_1(x)
        pick = torch.arange(b, device=x.device), rows
        q = self._proj("in_proj", y[pick], w, bias, 0, d).reshape(b, h, 1, d // h)
        kv = self._proj("in_proj", y, w, bias, d, 3 * d)
        k, v = kv.reshape(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        p = attn.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p).reshape(b, d)
        x_r = x[pick] + self.ls_1(self._proj("out_proj", o, attn.out_proj.weight, attn.out_proj.bias))
        return x_r + self._mlp(x_r)

    def forward_rows(self, x: torch.Tensor, rows: torch.Tensor | None = None, attn_mask=None) -> torch.Tensor:
        """``self(x, attn_mask=attn_mask)[arange(B), rows]`` (batch-first x; ``rows`` (B,) positions, default 0:
        the CLS token) without computing the other L-1 outputs: a tower's last block when only the pooled token is
        read. Under ``mlp+qkv``/``block`` the whole row computation is recomputed in backward (keeps only x)."""
        b, n, _ = x.shape
        if rows is None:
            rows = torch.zeros(b, dtype=torch.long, device=x.device)
        if _is_causal_mask(attn_mask, n):
            mask = (torch.arange(n, device=x.device)[None, :] <= rows[:, None])[:, None, None, :]
        else:
            mask = _sdpa_mask(attn_mask, b, self.attn.num_heads, n, x.dtype)
            if mask is not None and mask.dim() == 2:
                mask = mask[rows][:, None, None, :]
            elif mask is not None:
                mask = mask[torch.arange(b, device=x.device), :, rows][:, :, None, :]
        attn = self.attn
        big = x.requires_grad or not _frozen(self.ln_1, attn.in_proj_weight, attn.in_proj_bias)
        if torch.is_grad_enabled() and big and self.leanclip_recompute in ("mlp+qkv", "block"):
            chunk = self.leanclip_chunk if self.leanclip_recompute == "block" else None
            if chunk is not None and b > chunk:  # the recompute's k, v and their gradients: one chunk at a time
                trainable = [p for p in self.parameters() if p.requires_grad]
                return _Chunked.apply(lambda xc, start, stop: self._rows_core(xc, rows[start:stop],
                                                                              _mask_rows(mask, start, stop, b)),
                                      None, x, chunk, self._needs_rng(), *trainable)
            return _ckpt(self._rows_core, x, rows, mask, rng=self._needs_rng())
        return self._rows_core(x, rows, mask)

    # -- forward --
    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None, is_causal: bool | None = None):
        if k_x is not None or v_x is not None or hasattr(self, "ln_1_kv"):
            return super().forward(q_x, k_x, v_x, attn_mask)
        batch_first = getattr(self.attn, "batch_first", True)
        x = q_x if batch_first else q_x.transpose(0, 1)
        b, n, _ = x.shape
        if is_causal is None:
            is_causal = _is_causal_mask(attn_mask, n)
        mask = None if is_causal else _sdpa_mask(attn_mask, b, self.attn.num_heads, n, x.dtype)
        policy = self.leanclip_recompute
        grad = torch.is_grad_enabled()
        if policy == "none" or not grad:
            y = self._plain(x, mask, is_causal)
        else:
            y = self._recompute(x, mask, is_causal, policy)
        return y if batch_first else y.transpose(0, 1)


def rows_ok(transformer: Transformer) -> bool:
    """Whether a tower's last block can run at the pooled rows only (``forward_rows``)."""
    blocks = transformer.resblocks
    return (len(blocks) > 0 and isinstance(blocks[-1], LeanResidualAttentionBlock)
            and getattr(transformer, "batch_first", True) and not transformer.grad_checkpointing)


class LeanVisionTransformer(VisionTransformer):
    """open_clip ``VisionTransformer`` whose forward runs the last block at the CLS token only when that is all
    that is read (``pool_type="tok"``, no attention pooling, no token outputs); otherwise open_clip's forward."""

    def reads_cls_only(self) -> bool:
        return (self.attn_pool is None and self.pool_type == "tok" and not self.output_tokens
                and rows_ok(self.transformer))

    def forward(self, x: torch.Tensor):
        if not self.reads_cls_only():
            return super().forward(x)
        x = self._embeds(x)
        blocks = self.transformer.resblocks
        for blk in blocks[:-1]:
            x = blk(x)
        pooled = self.ln_post(blocks[-1].forward_rows(x))  # ln_post is per token: before or after pooling alike
        return pooled @ self.proj if self.proj is not None else pooled


def _block_obstacles(where: str, transformer: nn.Module) -> list[str]:
    blocks = getattr(transformer, "resblocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        return [f"{where} {class_name(transformer)} has no resblocks"]
    for i, blk in enumerate(blocks):
        if not block_supported(blk):
            return [f"{where} block {i} is {class_name(blk)} with attn {class_name(getattr(blk, 'attn', None))}"]
    return []


# Other model families register their lean classes here (``leanclip.models.timm``): plain class -> lean class, a
# predicate a module must pass to be swapped, and a function naming what keeps an image tower of theirs from the lean
# modules (None: not their tower).
_SUPPORTED: list = []
_IMAGE_TOWERS: list = []
_IMAGE_ESTIMATES: list = []
_PLAIN_SITES: list = []
_TEXT_TOWERS: list = []
# imported on first use: each imports this module to register itself
_FAMILIES = ("leanclip.models.timm", "leanclip.models.hf_text")


def _load_families() -> None:
    for name in _FAMILIES:
        importlib.import_module(name)


def image_estimates() -> tuple:
    """The saved-bytes estimates of image towers of other families (``register_lean_classes(image_estimate=)``):
    each ``fn(model, policy, batch, dtype) -> bytes | None`` (None: not its tower)."""
    _load_families()
    return tuple(_IMAGE_ESTIMATES)


def register_lean_classes(swap: dict, *, supported=None, image_tower=None, image_estimate=None,
                          text_tower=None, plain_sites=None) -> None:
    """Add ``swap`` (plain class -> lean class, a ``__class__`` swap keeping names and parameters) to what
    ``apply_lean`` swaps and ``remove_lean`` undoes (called again with more classes, as a family loads them);
    ``supported(module)`` must hold for a module to be swapped,
    ``image_tower(model)`` / ``text_tower(model)`` return the obstacles of an image / text tower of this family
    (empty: covered) or None (not its tower), and ``image_estimate(model, policy, batch, dtype)`` its
    ``leanclip.saved_bytes.estimate_saved_bytes`` part (None: not its tower). A swapped module with a
    ``leanclip_after_swap`` method gets it called (a lean layer moving its own children to the lean ops).
    ``plain_sites(block)``: where a plain block of this family calls its projections as modules
    (``leanclip.delta_hooks``: such a block takes a ``ProjectionDelta`` without the lean modules), None for other
    blocks."""
    _SWAP.update(swap)
    _UNSWAP.update({v: k for k, v in swap.items()})
    for found, fn in ((_SUPPORTED, supported), (_IMAGE_TOWERS, image_tower), (_IMAGE_ESTIMATES, image_estimate),
                      (_TEXT_TOWERS, text_tower), (_PLAIN_SITES, plain_sites)):
        if fn is not None:
            found.append(fn)


def tower_obstacles(model: nn.Module, tower: str) -> list[str]:
    """What keeps the ``"image"`` or ``"text"`` tower of a CLIP-style model from the lean modules, one line each
    naming the class; empty when they cover it: an open_clip ``VisionTransformer`` or transformer text tower of
    default ``ResidualAttentionBlock`` s, or a timm tower of blocks ``leanclip.models.timm`` implements."""
    _load_families()
    if tower == "image":
        vis = model.visual
        if isinstance(vis, VisionTransformer):
            return _block_obstacles("image tower", vis.transformer)
        for family in _IMAGE_TOWERS:
            found = family(model)
            if found is not None:
                return found
        return [f"image tower {class_name(vis)} (not an open_clip VisionTransformer or a timm transformer)"]
    t = text_tower(model)
    if t is None:
        for family in _TEXT_TOWERS:
            found = family(model)
            if found is not None:
                return found
        src = getattr(model, "text", None)
        return [f"text tower {class_name(src if src is not None else model)} (not an open_clip transformer text "
                f"tower)"]
    return _block_obstacles("text tower", t.transformer)


def covered_towers(model: nn.Module) -> list[str]:
    """The towers of a CLIP-style model the lean modules cover (``tower_obstacles`` empty), image first."""
    return [t for t in ("image", "text") if not tower_obstacles(model, t)]


def lean_obstacles(model: nn.Module) -> list[str]:
    """What keeps ``model`` from running on the lean modules, one line each; empty when ``apply_lean`` covers it.

    A CLIP-style model (one with ``visual``) needs both towers covered (``tower_obstacles``): anything else
    (ModifiedResNet, convolutional timm trunks, Hugging Face text encoders of other than BERT-style layers, open_clip's
    ``CustomResidualAttentionBlock``, a block or attention class a newer release brings) is named here rather than
    skipped, because a half-swapped tower would run slower paths silently and break the memory estimates.
    ``apply_lean(model, towers=...)`` makes the covered towers lean on their own. Outside the towers (CoCa's
    decoder), blocks the swap does not know keep open_clip's forward by design."""
    if _hf.is_transformers(model):  # its encoder layers: leanclip.models.transformers
        return _hf.lean_obstacles(model)
    out = []
    if hasattr(model, "visual"):
        return tower_obstacles(model, "image") + tower_obstacles(model, "text")
    if type(model) in (ResidualAttentionBlock, LeanResidualAttentionBlock) and not block_supported(model):
        if not hasattr(model, "ln_1_kv"):  # a cross-attention block keeps open_clip's forward by design
            out.append(f"{class_name(model)} with attn {class_name(getattr(model, 'attn', None))}")
    for name, m in model.named_modules():  # a tower or a transformer on its own
        if isinstance(getattr(m, "resblocks", None), nn.ModuleList):
            out += _block_obstacles(f"{class_name(m)} {name or '<root>'}", m)
    return out


_SWAP = {LayerNorm: LeanLayerNorm, LayerNormFp32: LeanLayerNormFp32, ResidualAttentionBlock: LeanResidualAttentionBlock,
         VisionTransformer: LeanVisionTransformer}
_UNSWAP = {v: k for k, v in _SWAP.items()}


def _tower_modules(model: nn.Module, towers) -> list[nn.Module]:
    """The modules of the selected towers (None: the whole model)."""
    if towers is None:
        return list(model.modules())
    out = []
    if "image" in towers:
        out += list(model.visual.modules())
    if "text" in towers:
        t = text_tower(model)
        if t is None:  # a text tower of another family (Hugging Face): the whole model.text
            roots = [model.text]
        else:
            roots = [t.module] if t.module is not model else [t.transformer, t.ln_final]
        out += [m for r in roots for m in r.modules()]
    return out


def _swappable(m: nn.Module) -> bool:
    if type(m) is ResidualAttentionBlock and not block_supported(m):
        return False
    return all(ok(m) for ok in _SUPPORTED)


def apply_lean(model: nn.Module, recompute: str = "none", chunk: int | None = None, towers=None) -> nn.Module:
    """Swap open_clip LayerNorms and default residual blocks (and the timm classes ``leanclip.models.timm``
    registers) for their lean versions (in place; names, parameters and buffers unchanged) and set the recompute
    policy (and the chunk of ``block``, :func:`set_recompute`). ``towers`` (a list of ``"image"`` / ``"text"``)
    swaps those towers only, each of which must be covered; None: the whole model. Returns ``model``.

    Never a silent no-op: ValueError naming the class when ``lean_obstacles`` (``tower_obstacles`` for ``towers``)
    finds a tower, block or attention the swap does not know, or when there is nothing to swap at all. Nothing is
    changed before that check."""
    check_policy(recompute)
    check_chunk(recompute, chunk)
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_lean needs an nn.Module, got {type(model).__name__}")
    _load_families()
    if towers is not None and (not towers or not set(towers) <= {"image", "text"} or not hasattr(model, "visual")):
        raise ValueError(f"towers must name 'image' and / or 'text' of a CLIP-style model, got {towers!r}")
    obstacles = lean_obstacles(model) if towers is None else [o for t in towers for o in tower_obstacles(model, t)]
    if obstacles:
        raise ValueError(f"cannot make {class_name(model)} lean: {'; '.join(obstacles)} (the lean modules cover "
                         f"open_clip ViT and transformer text towers of ResidualAttentionBlocks with "
                         f"nn.MultiheadAttention, timm ViT / EVA blocks and Hugging Face BERT / RoBERTa / "
                         f"XLM-RoBERTa text layers); use lean=False")
    if _hf.is_transformers(model):
        _hf.apply_lean(model, recompute, chunk)
        return model
    todo = [m for m in _tower_modules(model, towers) if type(m) in _SWAP or type(m) in _UNSWAP]
    if not todo:
        raise ValueError(f"found nothing to make lean in {class_name(model)} (no open_clip LayerNorm, "
                         f"ResidualAttentionBlock or VisionTransformer)")
    for m in todo:
        if type(m) in _SWAP and _swappable(m):
            m.__class__ = _SWAP[type(m)]
            if hasattr(m, "leanclip_after_swap"):
                m.leanclip_after_swap()
    set_recompute(model, recompute, chunk)
    sync_delta_hooks(model)
    return model


def remove_lean(model: nn.Module) -> nn.Module:
    """Undo ``apply_lean`` (back to open_clip's plain modules). Returns ``model``. ValueError (nothing changed) when
    a block holds a ``ProjectionDelta``: open_clip's block would silently ignore it (``leanclip.merge`` folds LoRA in
    first)."""
    held = [f"{n}.{c} ({class_name(d)})" for n, m in model.named_modules() if plain_sites(m) is None
            for c, d in m._modules.items() if isinstance(d, ProjectionDelta)]
    if held:
        raise ValueError(f"the lean blocks hold projection deltas that open_clip's plain blocks would ignore: "
                         f"{', '.join(held[:3])}{', ...' if len(held) > 3 else ''} (they need lean=True or the "
                         f"automatic lean; leanclip.merge folds LoRA into a plain model)")
    _hf.remove_lean(model)
    for m in model.modules():
        cls = type(m)
        if cls in _UNSWAP:
            for attr in ("leanclip_recompute", "leanclip_chunk"):
                m.__dict__.pop(attr, None)
            m.__class__ = _UNSWAP[cls]
    for attr in ("leanclip_recompute", "leanclip_chunk"):
        model.__dict__.pop(attr, None)
    sync_delta_hooks(model)
    return model


def plain_sites(block: nn.Module):
    """Where ``block``'s plain form calls its projections as modules (``leanclip.delta_hooks``), or None when no
    family's plain block of that class can take a ``ProjectionDelta``."""
    for family in _PLAIN_SITES:
        found = family(block)
        if found is not None:
            return found
    return None


def _deltas(block: nn.Module) -> list:
    return [m for m in block._modules.values() if isinstance(m, ProjectionDelta)]


def sync_delta_hooks(model: nn.Module) -> None:
    """Forward hooks that add the deltas of every plain block holding one (``leanclip.delta_hooks``); a lean block
    adds its own, so it has none."""
    plain = [m for m in model.modules() if not isinstance(m, LeanBlockMixin) and _deltas(m)]
    delta_hooks.sync(model, plain, _deltas, plain_sites)


def is_lean(model: nn.Module) -> bool:
    return any(isinstance(m, LeanBlockMixin) for m in model.modules()) or _hf.is_lean(model)


def check_chunk(policy: str, chunk) -> int | None:
    """``chunk`` (samples per chunk of a ``block`` recompute) checked: None, or a positive int with ``block``."""
    if chunk is None:
        return None
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"recompute chunk must be a positive number of samples, got {chunk!r}")
    if policy != "block":
        raise ValueError(f"a recompute chunk runs a block's backward over samples; it needs recompute='block', "
                         f"got {policy!r}")
    return chunk


def set_recompute(model: nn.Module, policy: str, chunk: int | None = None) -> nn.Module:
    """Set the recompute policy (``"none"``, ``"mlp"``, ``"mlp+qkv"``, ``"block"``) of every lean block, and for
    ``block`` the samples per chunk of its forward and backward (None: the whole batch)."""
    check_policy(policy)
    check_chunk(policy, chunk)
    for m in model.modules():
        if isinstance(m, LeanBlockMixin):
            m.leanclip_recompute = policy
            m.leanclip_chunk = chunk
    _hf.set_recompute(model, policy, chunk)
    model.leanclip_recompute = policy
    model.leanclip_chunk = chunk
    return model


# ----------------------------------------------------------------------------------------------------------- text tower
def eot_length(model: nn.Module, tokens: torch.Tensor) -> int:
    """The context length ``encode_text_lean`` runs for ``tokens``: max(EOT position)+1 of the batch for causal
    towers pooled at the EOT token (``argmax``/``eos``), else the full length."""
    t = text_tower(model)
    n = tokens.shape[-1]
    if t is None or t.cls_emb is not None or t.pad_mask or t.attn_mask is None or tokens.numel() == 0:
        return n
    if not _is_causal_mask(t.attn_mask, n):
        return n
    idx = pool_index(tokens, t.pool_type, t.eos_id)
    if idx is None:
        return n
    return int(idx.max().item()) + 1


def encode_text_lean(model: nn.Module, tokens: torch.Tensor, *, prompt_embeddings: torch.Tensor | None = None,
                     normalize: bool = False, truncate: bool = True) -> torch.Tensor:
    """open_clip ``encode_text`` with the context truncated to max(EOT)+1 (exact; see ``eot_length``).

    ``prompt_embeddings`` (B, L, width) replaces the token embedding lookup (CoOp); ``tokens`` still give the EOT
    positions. Works on plain and lean models; ``truncate=False`` runs the full context."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError(f"tokens must be a 2-D LongTensor (B, L), got "
                         f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
    t = text_tower(model)
    if _hf.is_transformers(model) and prompt_embeddings is None and truncate:
        return _hf.encode_text_truncated(model, tokens, normalize)
    if t is None or t.cls_emb is not None or t.pad_mask:
        if prompt_embeddings is not None:
            raise ValueError("prompt_embeddings need a standard open_clip text tower (no CLS token / pad mask)")
        return model.encode_text(tokens, normalize=normalize)
    n = tokens.shape[1]
    if n > t.positional_embedding.shape[0]:
        raise ValueError(f"tokens have {n} positions but the model's context length is "
                         f"{t.positional_embedding.shape[0]}")
    if prompt_embeddings is not None and (prompt_embeddings.dim() != 3 or prompt_embeddings.shape[:2] != tokens.shape):
        raise ValueError(f"prompt_embeddings must have shape {tuple(tokens.shape)} + (width,), got "
                         f"{tuple(prompt_embeddings.shape)}")
    length = eot_length(model, tokens) if truncate else n
    tokens = tokens[:, :length]
    cast_dtype = t.transformer.get_cast_dtype()
    x = prompt_embeddings[:, :length] if prompt_embeddings is not None else t.token_embedding(tokens)
    x = x.to(cast_dtype) + t.positional_embedding[:length].to(cast_dtype)
    mask = t.attn_mask
    if mask is not None and not isinstance(t.transformer.resblocks[0], LeanResidualAttentionBlock):
        mask = mask[:length, :length]  # plain blocks need an (L, L) mask; lean ones slice and detect causality
    rows = pool_index(tokens, t.pool_type, t.eos_id)
    if rows is not None and rows_ok(t.transformer):  # the last block only at the EOT rows
        blocks = t.transformer.resblocks
        for blk in blocks[:-1]:
            x = blk(x, attn_mask=mask)
        x = t.ln_final(blocks[-1].forward_rows(x, rows, attn_mask=mask))
    else:
        x = t.ln_final(t.transformer(x, attn_mask=mask))
        x = text_global_pool(x, tokens, t.pool_type, eos_token_id=t.eos_id)
    if t.text_projection is not None:
        if isinstance(t.text_projection, nn.Linear):
            x = t.text_projection(x)
        else:
            proj = t.text_projection
            x = x.to(proj.dtype) @ proj if proj.requires_grad else x @ proj.to(x.dtype)
    return F.normalize(x, dim=-1) if normalize else x
