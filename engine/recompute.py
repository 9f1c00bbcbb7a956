"""The exact recompute machinery of a lean pre-LN block: policies, checkpointing, chunks, projection deltas.

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
of the block can run over chunks of C samples (``Chunked``). The block keeps its input (1 unit), and the
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

``LeanBlockMixin`` implements the policies over branch functions a block defines (the open_clip block in
``leanclip.lean_openclip``, the timm blocks in ``leanclip.models.timm``); ``ckpt`` and ``Chunked`` are shared with
the Hugging Face layers."""
from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from leanclip.lean_ops import lean_linear

POLICIES = ("none", "mlp", "mlp+qkv", "block")  # fastest first
RECOMPUTE_CHOICES = POLICIES + ("auto",)
# Saved activation units (B*L*D elements) per frozen-weight block for each policy (see module docstring).
BLOCK_UNITS = {"none": 10, "mlp": 6, "mlp+qkv": 3, "block": 1}


def check_policy(policy, *, allow_auto: bool = False) -> str:
    valid = RECOMPUTE_CHOICES if allow_auto else POLICIES
    if policy not in valid:
        raise ValueError(f"unknown recompute policy {policy!r}; valid: {', '.join(repr(p) for p in valid)}")
    return policy



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


def ckpt(fn, *args, rng: bool = False, sac: bool = False):
    kw = dict(_CKPT_KW) if sac else {}
    if sac:
        kw["context_fn"] = _SAC_CONTEXT
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=rng, **kw)


def frozen(*mods_or_params) -> bool:
    """Whether none of these modules' parameters (or these parameters; None skipped) needs a gradient."""
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


def deltas_of(block: nn.Module) -> list:
    """The ``ProjectionDelta`` children of ``block``, the terms its projections add (lean or hooked plain)."""
    return [m for m in block._modules.values() if isinstance(m, ProjectionDelta)]


# ----------------------------------------------------------------------------------------------------------- chunks
def mask_rows(mask, start: int, stop: int, batch: int):
    """An SDPA mask for samples [start, stop): per-sample masks (B, H, L, L) are sliced, shared ones broadcast. A
    tuple (a timm block's mask and rotary embedding) is sliced item by item; a per-sample rotary embedding is
    (B, L, D)."""
    if isinstance(mask, tuple):
        return tuple(mask_rows(m, start, stop, batch) for m in mask)
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


class Chunked(torch.autograd.Function):
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
        return deltas_of(self)

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

    def parts_with_deltas(self) -> dict:
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
        parts = self.parts_with_deltas()
        rng = self._needs_rng()
        out_proj_outside = frozen(*parts["attn_out"])
        c_proj_outside = frozen(*parts["mlp_out"])
        if policy == "block":
            inside = parts["attn"] + parts["mlp_core"] + ([] if c_proj_outside else parts["mlp"])
            if not (x.requires_grad or not frozen(*inside)):
                return self._plain(x, mask, is_causal)
            if self.leanclip_chunk is not None and x.shape[0] > self.leanclip_chunk:
                return self._chunked(x, mask, is_causal, rng, skip_mlp_out=c_proj_outside)
            if c_proj_outside:
                x1, g = ckpt(self._block_head, x, mask, is_causal, rng=rng)
                return x1 + self._mlp_out(g)
            return ckpt(self._plain, x, mask, is_causal, rng=rng)
        # attention branch
        if policy == "mlp+qkv":
            core = parts["attn_core"]
            if out_proj_outside:
                if x.requires_grad or not frozen(*core):
                    a = self._attn_out(ckpt(self._attn_core, x, mask, is_causal, rng=rng, sac=True))
                else:
                    a = self._attn(x, mask, is_causal)
            elif x.requires_grad or not frozen(*core, *parts["attn"]):
                a = ckpt(self._attn, x, mask, is_causal, rng=rng, sac=True)
            else:
                a = self._attn(x, mask, is_causal)
        else:
            a = self._attn(x, mask, is_causal)
        x = x + a
        # MLP branch
        if c_proj_outside:
            if x.requires_grad or not frozen(*parts["mlp_core"]):
                return x + self._mlp_out(ckpt(self._mlp_core, x, rng=rng))
            return x + self._mlp(x)
        if x.requires_grad or not frozen(*parts["mlp"]):
            return x + ckpt(self._mlp, x, rng=rng)
        return x + self._mlp(x)


    # -- chunks of samples (``block`` with ``leanclip_chunk``) --
    def _mlp_out_input_grad(self, grad_y: torch.Tensor, g: torch.Tensor) -> torch.Tensor | None:
        """d loss / d g for ``y = x1 + _mlp_out(g)`` where the last MLP projection and its layer scale are frozen,
        from ``grad_y`` and the weight alone (no forward GEMM), or None where the block does not provide it (a
        chunk's recompute then runs ``_mlp_out`` too)."""
        return None

    def _chunked(self, x, mask, is_causal: bool, rng: bool, skip_mlp_out: bool):
        """The block over chunks of ``leanclip_chunk`` samples (``Chunked``): the transient of its backward is one
        chunk's activations. Where the last MLP projection is frozen (``skip_mlp_out``) and the block gives its input
        gradient, a chunk's recompute stops at that projection's input: its output is needed by no gradient."""
        batch = x.shape[0]

        def forward(xc, start, stop):
            return self._plain(xc, mask_rows(mask, start, stop, batch), is_causal)

        def recompute(xc, start, stop, grad_yc):
            x1, g = self._block_head(xc, mask_rows(mask, start, stop, batch), is_causal)
            dg = self._mlp_out_input_grad(grad_yc, g)
            if dg is None:
                return (x1 + self._mlp_out(g),), (grad_yc,)
            return (x1, g), (grad_yc, dg)

        trainable = [p for p in self.parameters() if p.requires_grad]
        return Chunked.apply(forward, recompute if skip_mlp_out else None, x, self.leanclip_chunk, rng, *trainable)
