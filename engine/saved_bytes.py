"""What one training forward saves for backward, estimated from the towers' geometry and the trainable parameters.

``estimate_saved_bytes(model, policy, batch)`` predicts the bytes autograd keeps for backward under a recompute
policy (``leanclip.lean.POLICIES``) without running anything: per block the units of B*L*D*elem that policy keeps
(``leanclip.lean.BLOCK_UNITS``), counted from where gradients enter the tower. ``leanclip.memory.saved_activation_bytes``
measures the same thing, and ``leanclip.budget`` builds the step's peak on it.
"""
from __future__ import annotations

import torch
from torch import nn

from leanclip import geometry as _geometry
from leanclip.lean import check_policy, image_estimates
from leanclip.models import hf_text as _hftext
from leanclip.models import transformers as _hf
from leanclip.models.openclip import text_tower
from leanclip.registry import method_hooks
from leanclip.select import trainable_parameters


# Where gradients enter a block decides what its first grad-carrying block saves: (units, LN-stat pairs, lse?)
# per policy, by the earliest trainable piece. Stage 0 (ln_1, or an input that needs grad) is the full table.
_STAGES = (("ln_1.",), ("attn.in_proj",), ("attn.out_proj.", "ls_1."), ("ln_2.",), ("mlp.c_fc.",),
           ("mlp.c_proj.", "ls_2."))
_STAGE_COST = {
    "none":    ((10, 2, 1), (9, 1, 1), (5, 1, 0), (5, 1, 0), (4, 0, 0), (0, 0, 0)),
    "mlp":     ((6, 1, 1), (5, 0, 1), (1, 0, 0), (1, 0, 0), (1, 0, 0), (0, 0, 0)),
    "mlp+qkv": ((3, 0, 1), (3, 0, 1), (1, 0, 0), (1, 0, 0), (1, 0, 0), (0, 0, 0)),
    "block":   ((1, 0, 0), (1, 0, 0), (1, 0, 0), (1, 0, 0), (1, 0, 0), (0, 0, 0)),
}


def _grad_layout(trainable: list[str], blocks_prefix: str, n_blocks: int, input_grad: bool):
    """(index of the first block gradients flow through or None, the stage where they enter it)."""
    if input_grad:
        return 0, 0
    for i in range(n_blocks):
        inside = [n[len(f"{blocks_prefix}{i}."):] for n in trainable if n.startswith(f"{blocks_prefix}{i}.")]
        if inside:
            stage = min(next((k for k, pre in enumerate(_STAGES) if n.startswith(pre)), 0) for n in inside)
            return i, stage
    return None, None


def _block_extra_units(blocks, policy: str, first: int) -> float:
    """Extra units for blocks whose projection weights are trainable (F.linear saves their inputs; out_proj's
    input is a view of the saved SDPA output - SDPA returns a (B, L, H, hd)-ordered tensor - so it is free)."""
    extra = 0.0
    for blk in blocks[first:]:
        attn, mlp = blk.attn, blk.mlp
        if policy == "none":
            extra += attn.in_proj_weight.requires_grad + mlp.c_fc.weight.requires_grad + 4 * mlp.c_proj.weight.requires_grad
        elif policy == "mlp":
            extra += attn.in_proj_weight.requires_grad
    return extra


def _rows_block_units(blk, policy: str, stage: int) -> tuple[float, int, int]:
    """(units, LN-stat pairs, row units of B*D) a ``forward_rows`` last block keeps: x for LN1 and k, v for the
    attention, plus q, the attention output, LN2's input and the GELU input of the B rows - unless the row
    computation is checkpointed (x only) or gradients enter after the attention (row-sized tensors only)."""
    if stage >= 2:
        return 0.0, 0, (0, 0, 5, 5, 4, 0)[stage]
    if policy in ("mlp+qkv", "block"):
        return 1.0, 0, 0
    trainable_w = float(blk.attn.in_proj_weight.requires_grad)  # F.linear keeps LN1's output
    return (3.0 if stage == 0 else 2.0) + trainable_w, int(stage == 0), 7


def _tower_bytes(blocks, policy, first, stage, post_units, batch, length, width, heads, elem,
                 rows_last: bool = False) -> int:
    if batch == 0:
        return 0
    bl = batch * length
    unit = bl * width * elem
    blocks = list(blocks)
    full = blocks[:-1] if rows_last else blocks
    total = 0.0
    if first is not None:
        for i in range(first, len(full)):
            units, stats, lse = _STAGE_COST[policy][stage if i == first else 0]
            total += units * unit + stats * 8 * bl + lse * bl * heads * 4
        if first < len(full):
            total += _block_extra_units(full, policy, first) * unit
        if rows_last:
            units, stats, row_units = _rows_block_units(blocks[-1], policy, stage if first == len(full) else 0)
            total += units * unit + stats * 8 * bl + row_units * batch * width * elem
    # with rows_last the final LN (and projection) see B rows only
    total += post_units * ((batch if rows_last else bl) * (width * elem + 8))
    return int(total)


def _trainable_names(model: nn.Module, prefix: str) -> list[str]:
    return [n for n, _ in trainable_parameters(model) if n.startswith(prefix)]


def _top(names: list[str], prefix: str) -> set:
    return {n[len(prefix):].split(".")[0] for n in names}


def estimate_saved_bytes(model: nn.Module, policy: str, batch_size: int, *, text_batch_size: int | None = None,
                         text_len: int | None = None, dtype: torch.dtype | None = None) -> int:
    """Predicted bytes saved for backward by one training forward of both towers under ``policy``.

    Per block: ``BLOCK_UNITS[policy]`` units of B*L*D*elem (+ LN statistics and the attention logsumexp) for every
    block gradients flow through - from the first block holding a trainable parameter (counting only the part of
    it after that parameter), or all blocks when the tower input needs grad (CoOp prompts, trainable ln_pre or
    embeddings) - plus, outside the blocks, the ln_pre input (image, when on the grad path) and the ln_post /
    ln_final input; trainable projection weights (``full``) add the inputs F.linear keeps. The image batch is
    ``batch_size`` with L = patches+1; the text batch is ``text_batch_size`` (default ``batch_size``; the number of
    class prompts for classification) with L = ``text_len`` (default: the full context, an upper bound: EOT
    truncation shortens it). ``dtype`` is the activation dtype (default: that of the frozen block weights, i.e.
    bf16 with ``frozen_dtype=torch.bfloat16``). Matches ``leanclip.memory.saved_activation_bytes`` within a few %."""
    check_policy(policy)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"batch_size must be a non-negative int, got {batch_size!r}")
    tb = batch_size if text_batch_size is None else text_batch_size
    if isinstance(tb, bool) or not isinstance(tb, int) or tb < 0:
        raise ValueError(f"text_batch_size must be a non-negative int, got {text_batch_size!r}")
    if text_len is not None and (isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < 1):
        raise ValueError(f"text_len must be a positive int, got {text_len!r}")
    total = 0
    vis = getattr(model, "visual", None)
    g = _geometry.tower_geometry(model, "image", dtype=dtype)
    if g is not None and g.family == "openclip":
        blocks, length, elem, rows = g.blocks, g.tokens, g.elem, g.rows_last
        names = _trainable_names(model, "visual.")
        top = _top(names, "visual.")
        input_grad = bool(top & {"conv1", "class_embedding", "positional_embedding", "ln_pre"})
        first, stage = _grad_layout(names, "visual.transformer.resblocks.", len(blocks), input_grad)
        on_path = first is not None or bool(top & {"ln_post", "proj"})
        pre = first is not None and not isinstance(vis.ln_pre, nn.Identity) and (
            input_grad and "conv1" in top or "ln_pre" in top)
        total += _tower_bytes(blocks, policy, first, stage, on_path + (0 if rows else pre), batch_size, length,
                              g.width, g.heads, elem, rows_last=rows)
        if rows and pre:  # ln_pre's input is full-length either way
            total += batch_size * length * (vis.transformer.width * elem + 8)
        if "conv1" in top:  # the patch conv keeps its input images
            total += batch_size * 3 * vis.image_size[0] * vis.image_size[1] * elem
        if "proj" in top:  # pooled @ proj keeps the pooled token (a view of the whole ln_post output unless rows)
            total += batch_size * (1 if rows else length) * vis.transformer.width * elem
        if on_path:  # features are L2-normalized in fp32
            total += batch_size * (vis.output_dim * 4 + 8)
    elif _hf.is_transformers(model):  # both towers: leanclip.models.transformers
        return _hf.estimate_saved_bytes(model, policy, batch_size, tb, text_len, dtype)
    else:  # a tower of another family (timm), when it has an estimate
        total += next((b for b in (f(model, policy, batch_size, dtype) for f in image_estimates()) if b is not None), 0)
    t = text_tower(model)
    tg = _geometry.tower_geometry(model, "text", dtype=dtype, text_len=text_len)
    if t is not None and tg is not None:
        blocks, elem, length, rows = tg.blocks, tg.elem, tg.tokens, tg.rows_last
        names = _trainable_names(model, t.prefix)
        top = _top(names, t.prefix)
        hooks = method_hooks(model)
        learner = hooks.get("prompts", hooks.get("image_prompts"))
        input_grad = bool(top & {"token_embedding", "positional_embedding"}) or (
            learner is not None and any(p.requires_grad for p in learner.parameters()))
        first, stage = _grad_layout(names, f"{t.prefix}transformer.resblocks.", len(blocks), input_grad)
        on_path = first is not None or bool(top & {"ln_final", "text_projection"})
        total += _tower_bytes(blocks, policy, first, stage, int(on_path), tb, length, tg.width, tg.heads, elem,
                              rows_last=rows)
        if "token_embedding" in top:
            total += tb * length * 8  # the embedding backward keeps the token ids
        if "text_projection" in top:
            total += tb * t.transformer.width * elem
        if on_path:  # features are L2-normalized in fp32
            proj = t.text_projection
            out_dim = proj.out_features if isinstance(proj, nn.Linear) else (
                proj.shape[1] if proj is not None else t.transformer.width)
            total += tb * (out_dim * 4 + 8)
    elif t is None:  # a Hugging Face text tower (HFTextEncoder), when it has an estimate
        total += _hftext.estimate_text_bytes(model, policy, tb, text_len, dtype) or 0
    return int(total)
