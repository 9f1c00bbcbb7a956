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

The pieces live beside this module, which re-exports their public names: the fused ops in ``leanclip.lean_ops``, the
exact recompute policies (``none`` / ``mlp`` / ``mlp+qkv`` / ``block``, chunks, ``ProjectionDelta``,
``LeanBlockMixin``) in ``leanclip.recompute``, open_clip's lean block and ViT in ``leanclip.lean_openclip``; here
the swap itself (the class registry, ``apply_lean`` / ``remove_lean``, the obstacles) and the text tower.

``encode_text_lean(model, tokens)`` truncates the 77-token context to max(EOT position)+1 of the batch: attention is
causal and features are read at the EOT token, so the result is exactly that of the full context.

Only one token per sample is read after a tower (CLS for a ``tok``-pooled ViT, EOT for the text tower), so the last
block runs at that row only (``LeanResidualAttentionBlock.forward_rows``): k and v for every token, but q, the
attention, out_proj and the MLP for B rows instead of B*L - exact, and ~10/12 of a block's GEMMs saved.
``LeanVisionTransformer`` (swapped in like the blocks) does this when nothing else is read (no token outputs, no
attention pooling); ``encode_text_lean`` does it for ``argmax``/``eos`` pooling.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from leanclip import delta_hooks
from leanclip.lean_ops import LeanLayerNorm, LeanLayerNormFp32, fused_layer_norm, is_causal_mask, lean_linear
from leanclip.lean_openclip import LeanResidualAttentionBlock, LeanVisionTransformer, rows_ok
from leanclip.models import transformers as _hf
from leanclip.models import transformers_lean as _hf_lean
from leanclip.models.openclip import (
    LayerNorm, LayerNormFp32, ResidualAttentionBlock, VisionTransformer, block_supported, class_name,
    pool_index, text_global_pool, text_tower, tower_blocks,
)
from leanclip.recompute import (
    BLOCK_UNITS, POLICIES, PROJECTION_SITES, RECOMPUTE_CHOICES, SAC_CACHE_COUNTED, SDPA_OPS, LeanBlockMixin,
    ProjectionDelta, check_chunk, check_policy, deltas_of,
)

# The public names of the lean modules, wherever they live (imported as ``lean.X`` across leanclip).
__all__ = [
    "BLOCK_UNITS", "POLICIES", "PROJECTION_SITES", "RECOMPUTE_CHOICES", "SAC_CACHE_COUNTED", "SDPA_OPS",
    "LeanBlockMixin", "LeanLayerNorm", "LeanLayerNormFp32", "LeanResidualAttentionBlock", "LeanVisionTransformer",
    "ProjectionDelta", "apply_lean", "check_chunk", "check_policy", "class_name", "covered_towers",
    "encode_text_lean", "eot_length", "fused_layer_norm", "image_estimates", "is_lean", "lean_linear",
    "lean_obstacles", "plain_class", "plain_sites", "register_lean_classes", "remove_lean", "rows_ok", "set_recompute",
    "sync_delta_hooks", "text_tower",
    "tower_blocks", "tower_obstacles",
]


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
    if _hf.is_transformers(model):  # its encoder layers: leanclip.models.transformers_lean
        return _hf_lean.lean_obstacles(model)
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
        _hf_lean.apply_lean(model, recompute, chunk)
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
    _hf_lean.remove_lean(model)
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


def plain_class(cls: type) -> type:
    """The plain class a lean class was swapped from (``cls`` itself when it is not a lean class)."""
    return _UNSWAP.get(cls, cls)


def plain_sites(block: nn.Module):
    """Where ``block``'s plain form calls its projections as modules (``leanclip.delta_hooks``), or None when no
    family's plain block of that class can take a ``ProjectionDelta``."""
    for family in _PLAIN_SITES:
        found = family(block)
        if found is not None:
            return found
    return None


def sync_delta_hooks(model: nn.Module) -> None:
    """Forward hooks that add the deltas of every plain block holding one (``leanclip.delta_hooks``); a lean block
    adds its own, so it has none."""
    plain = [m for m in model.modules() if not isinstance(m, LeanBlockMixin) and deltas_of(m)]
    delta_hooks.sync(model, plain, deltas_of, plain_sites)


def is_lean(model: nn.Module) -> bool:
    return any(isinstance(m, LeanBlockMixin) for m in model.modules()) or _hf_lean.is_lean(model)


def set_recompute(model: nn.Module, policy: str, chunk: int | None = None) -> nn.Module:
    """Set the recompute policy (``"none"``, ``"mlp"``, ``"mlp+qkv"``, ``"block"``) of every lean block, and for
    ``block`` the samples per chunk of its forward and backward (None: the whole batch)."""
    check_policy(policy)
    check_chunk(policy, chunk)
    for m in model.modules():
        if isinstance(m, LeanBlockMixin):
            m.leanclip_recompute = policy
            m.leanclip_chunk = chunk
    _hf_lean.set_recompute(model, policy, chunk)
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
    if not is_causal_mask(t.attn_mask, n):
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
        return _hf_lean.encode_text_truncated(model, tokens, normalize)
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
