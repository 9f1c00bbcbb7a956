"""The timm boundary: every timm internal the engine touches, in one module (as ``models/openclip.py`` is for
open_clip).

open_clip builds SigLIP / SigLIP2, EVA01 / EVA02 and PE-Core image towers as ``open_clip.timm_model.TimmModel``
around a timm trunk (``visual.trunk``); its transformer blocks are ``visual.trunk.blocks.<i>``. What lives here:

- which timm blocks the lean engine implements (``block_supported``): ``vision_transformer.Block`` (SigLIP, SigLIP2:
  fused ``Attention`` with optional q/k norm and sub-LN ``scale_norm``, ``Mlp`` / ``GluMlp`` / ``SwiGLU``,
  ``LayerScale``) and ``eva.EvaBlock`` (EVA02: ``EvaAttention`` with rotary embeddings, separate q/k/v or fused qkv
  with its q/v bias, ``SwiGLU`` with the sub-LN ``mlp.norm``; PE-Core: ``AttentionRope``, ``Mlp``) and
  ``eva.EvaBlockPostNorm`` (EVA02-E: the same attention and MLP, each branch's LayerNorm on its output before the
  residual add, no layer scale). Gated attention,
  grouped-query attention and convolutional MLPs are named as obstacles, never run half-lean;
- the lean versions of those blocks (``LeanTimmBlock``, ``LeanEvaBlock``, ``LeanEvaPostNormBlock``), of the EVA trunk
  (``LeanEva``) and of timm's ``LayerNorm``, defined in ``leanclip.models.timm_lean`` and registered here;
- the sites the in-layer methods use on a timm block: the projections LoRA adds to (``projection_slices``), where
  Houlsby / Compacter adapters go (``adapter_sites``), the LayerNorms LilT's adapters precede (``prenorms``) and
  the block ``lilt-deep`` appends (``new_block_like``: the identity at the start - zero output projections in a
  pre-LN block, zero branch norms in a post-norm one);
- tiny timm trunks built from the released model definitions (``register_tiny_models``) for the tests.

The lean blocks reuse ``leanclip.recompute``'s ``LeanBlockMixin`` (the recompute policies) on branch functions that
call ``lean_linear`` and apply attached ``ProjectionDelta`` s (LoRA); gradients equal plain autograd under every
policy (``leanclip.models.timm_lean``).

Pooling. timm's ``map`` pooling (``AttentionPoolLatent``, SigLIP / PE-Core) runs a latent query's attention over
every token of the last block, and ``avg`` reads every token too, so the pooled-row last block of open_clip towers
does not apply: every block, the last included, runs at all tokens. ``token`` pooling (EVA02, EVA01, EVA02-E) reads
the class token only: the lean trunk (``LeanEva``) runs its last block at that row (``forward_rows``: q, the
attention output and the MLP at row 0, k and v at every token), exactly, unless the block draws random numbers
(dropout or drop path in training: the row computation would draw other masks than the full block).
"""
from __future__ import annotations

import copy

from torch import nn

try:  # timm is optional for open_clip; without it no timm tower can be built, and nothing here is needed
    from timm.layers import AttentionRope, GluMlp, LayerScale, Mlp, SwiGLU
    from timm.layers import LayerNorm as TimmLayerNorm
    from timm.layers.attention import Attention
    from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
    from timm.models.vision_transformer import Block
except ImportError:  # pragma: no cover
    Block = Eva = EvaBlock = EvaBlockPostNorm = None

from leanclip import lean as _lean
from leanclip.geometry import TowerGeometry, elem_size, register_family
from leanclip.models.openclip import class_name, timm_image_tower
from leanclip.models.timm_lean import (  # noqa: F401  (the lean classes: re-exported as this boundary's)
    LeanEva, LeanEvaBlock, LeanEvaPostNormBlock, LeanTimmBlock, LeanTimmLayerNorm,
)
from leanclip.recompute import frozen

_MLPS = () if Block is None else (Mlp, GluMlp, SwiGLU)
_ATTNS = () if Block is None else (Attention, EvaAttention, AttentionRope)


# ----------------------------------------------------------------------------------------------------------- support
def _attn_obstacle(attn: nn.Module) -> str | None:
    if type(attn) not in _ATTNS:
        return f"attn {class_name(attn)}"
    if getattr(attn, "gate", None) is not None:
        return f"gated attention {class_name(attn)}"
    if getattr(attn, "num_kv_groups", 1) != 1:
        return f"grouped-query attention {class_name(attn)}"
    if attn.head_dim * attn.num_heads != attn.proj.in_features:
        return f"attention {class_name(attn)} with head_dim * heads != proj input"
    return None


def _mlp_obstacle(mlp: nn.Module) -> str | None:
    if type(mlp) not in _MLPS:
        return f"mlp {class_name(mlp)}"
    linears = [getattr(mlp, n) for n in ("fc1", "fc1_g", "fc1_x", "fc2") if hasattr(mlp, n)]
    if not all(type(m) is nn.Linear for m in linears):
        return f"mlp {class_name(mlp)} with convolutional projections"
    if isinstance(mlp, GluMlp) and mlp.chunk_dim != -1:
        return f"mlp {class_name(mlp)} chunked along dim {mlp.chunk_dim}"
    return None


def block_obstacle(blk: nn.Module) -> str | None:
    """Why the lean engine cannot run ``blk`` (one phrase naming the class), or None when it can: a timm ViT
    ``Block``, an ``EvaBlock`` or an ``EvaBlockPostNorm`` (or their lean versions) with a supported attention and
    MLP."""
    if Block is None or type(blk) not in _blocks():
        return class_name(blk)
    why = _attn_obstacle(blk.attn) or _mlp_obstacle(blk.mlp)
    if why is None and isinstance(blk, Block) and not all(
            type(m) in (nn.Identity, LayerScale) for m in (blk.ls1, blk.ls2)):
        why = f"layer scale {class_name(blk.ls1)}"
    return None if why is None else f"{class_name(blk)} with {why}"


def _blocks() -> tuple:
    """The timm block classes the lean engine runs, plain and lean (defined below)."""
    return (Block, EvaBlock, EvaBlockPostNorm, LeanTimmBlock, LeanEvaBlock, LeanEvaPostNormBlock)


def trunk_blocks(visual: nn.Module) -> list[nn.Module] | None:
    """The transformer blocks of a ``TimmModel``'s trunk (``trunk.blocks``), or None when it has none (ConvNeXt,
    FastViT and other convolutional trunks keep stages instead)."""
    blocks = getattr(getattr(visual, "trunk", None), "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        return None
    return list(blocks)


def tower_obstacles(model: nn.Module) -> list[str] | None:
    """What keeps a timm image tower from the lean engine (one line each, empty when every block is supported), or
    None when ``model.visual`` is not a timm tower."""
    v = timm_image_tower(model)
    if v is None:
        return None
    blocks = trunk_blocks(v)
    if blocks is None:
        return [f"image tower {class_name(v)} with trunk {class_name(v.trunk)} has no transformer blocks"]
    for i, blk in enumerate(blocks):
        why = block_obstacle(blk)
        if why is not None:
            return [f"image tower block {i} is {why}"]
    return []


# ----------------------------------------------------------------------------------------------------------- sites
def is_timm_block(blk: nn.Module) -> bool:
    return Block is not None and isinstance(blk, (Block, EvaBlock, EvaBlockPostNorm))


def projection_slices(blk: nn.Module) -> dict | None:
    """LoRA's targets on a timm block: {target: [(weight, lo, hi), ...]}, the frozen weight (or row slice of a fused
    one) that rows lo:hi of the target's update fold into; None for other blocks. q / k / v are the row thirds of a
    fused ``qkv.weight`` or the separate ``q_proj`` / ``k_proj`` / ``v_proj``; ``fc`` is ``mlp.fc1`` (SwiGLU: its
    ``fc1_g`` | ``fc1_x`` pair, rows 0:h and h:2h of one update), ``proj`` ``mlp.fc2``, ``out`` ``attn.proj``."""
    if not is_timm_block(blk):
        return None
    attn, mlp = blk.attn, blk.mlp
    a = attn.num_heads * attn.head_dim
    if attn.qkv is not None:
        w = attn.qkv.weight
        out = {t: [(w[i * a:(i + 1) * a], 0, a)] for i, t in enumerate(("q", "k", "v"))}
    else:
        out = {t: [(lin.weight, 0, a)] for t, lin in zip(("q", "k", "v"), (attn.q_proj, attn.k_proj, attn.v_proj))}
    out["out"] = [(attn.proj.weight, 0, attn.proj.out_features)]
    if isinstance(mlp, SwiGLU):
        h = mlp.fc1_g.out_features
        out["fc"] = [(mlp.fc1_g.weight, 0, h), (mlp.fc1_x.weight, h, 2 * h)]
    else:
        out["fc"] = [(mlp.fc1.weight, 0, mlp.fc1.out_features)]
    out["proj"] = [(mlp.fc2.weight, 0, mlp.fc2.out_features)]
    return out


def hook_sites(blk: nn.Module) -> list[tuple[nn.Module, str, int, int]] | None:
    """Where a plain timm block calls its projections as modules, for ``leanclip.delta_hooks``: ``(module, site,
    start, stop)`` with the ``leanclip.lean.PROJECTION_SITES`` name and the output features the lean block asks a
    delta for there; None for other blocks. EVA's fused qkv with separate q / v biases computes
    ``F.linear(x, qkv.weight, q_bias | k_bias | v_bias)`` unless ``qkv_bias_separate``: that flag is set here, so the
    block calls ``attn.qkv`` and adds the biases after it (the same sum)."""
    if not is_timm_block(blk):
        return None
    attn, mlp = blk.attn, blk.mlp
    a = qkv_width(blk)
    if attn.qkv is not None:
        if getattr(attn, "q_bias", None) is not None:
            attn.qkv_bias_separate = True
        out = [(attn.qkv, "in_proj", 0, 3 * a)]
    else:
        out = [(lin, "in_proj", i * a, (i + 1) * a) for i, lin in enumerate((attn.q_proj, attn.k_proj, attn.v_proj))]
    out.append((attn.proj, "out_proj", 0, attn.proj.out_features))
    if isinstance(mlp, SwiGLU):
        h = mlp.fc1_g.out_features
        out += [(mlp.fc1_g, "c_fc", 0, h), (mlp.fc1_x, "c_fc", h, 2 * h)]
    else:
        out.append((mlp.fc1, "c_fc", 0, mlp.fc1.out_features))
    return out + [(mlp.fc2, "c_proj", 0, mlp.fc2.out_features)]


def qkv_width(blk: nn.Module) -> int:
    """The width of one of q / k / v (heads x head_dim)."""
    return blk.attn.num_heads * blk.attn.head_dim


def adapter_sites(blk: nn.Module) -> list[tuple[nn.Module, int]] | None:
    """Where Houlsby / Compacter adapters go in a timm block, with the width they see: the attention's output
    dropout ``attn.proj_drop`` and the MLP's ``mlp.drop2`` (each called on its sub-layer's output, before the layer
    scale and the residual add: Houlsby's placement; in a post-norm block before the branch's LayerNorm too, as in
    Houlsby's post-LN BERT). None for other blocks."""
    if not is_timm_block(blk):
        return None
    return [(blk.attn.proj_drop, blk.attn.proj.out_features), (blk.mlp.drop2, blk.mlp.fc2.out_features)]


def prenorms(blk: nn.Module) -> list[nn.Module] | None:
    """The block LayerNorms LilT's adapters precede: ``norm1`` / ``norm2`` of a timm block; None for other blocks.
    In a pre-LN block they sit before the attention and the MLP (as open_clip's ``ln_1`` / ``ln_2``), so the
    adapter acts on the branch input. A post-norm ``EvaBlockPostNorm`` has no pre-norm: its ``norm1`` / ``norm2``
    normalise the branch outputs, and an adapter before them acts on the branch output before it is normalised and
    added - LilT's rule "before each LayerNorm of the block", as on BERT's post-LN layers. The adapter starts as the
    identity either way."""
    return [blk.norm1, blk.norm2] if is_timm_block(blk) else None


def new_block_like(visual: nn.Module, init: str) -> nn.Module:
    """A block to append to a timm trunk (``lilt-deep``): a copy of its last block (``copy``) or one initialised as
    timm initialises a ViT (``random``: linear weights truncated-normal std 0.02, biases zero, norms reset), made
    the identity so the tower computes exactly what it did: in a pre-LN block the attention's ``proj`` and the
    MLP's ``fc2`` are zero (weights and biases), so both branches add zero. In a post-norm block (EVA02-E) that
    would not do - each branch ends in its LayerNorm, and the norm of zero is its bias - so there ``norm1`` and
    ``norm2`` are zero instead (weights and biases): both branches add exactly zero, and the norms' weights still
    get a gradient (the normalised branch output), as zero projections do in a pre-LN block. ValueError naming the
    class when the last block is not a timm ViT / EVA block."""
    blocks = trunk_blocks(visual)
    last = blocks[-1] if blocks else None
    if last is None or not is_timm_block(last):
        raise ValueError(f"lilt-deep appends a timm ViT block; the image tower {class_name(visual)} ends in "
                         f"{class_name(last) if last is not None else 'no transformer block'}")
    new = copy.deepcopy(last)
    if init == "random":
        for m in new.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        for name in ("q_bias", "v_bias"):  # EVA's fused qkv bias
            if getattr(new.attn, name, None) is not None:
                nn.init.zeros_(getattr(new.attn, name))
    post = isinstance(new, EvaBlockPostNorm)
    for last_op in (new.norm1, new.norm2) if post else (new.attn.proj, new.mlp.fc2):
        nn.init.zeros_(last_op.weight)
        if last_op.bias is not None:
            nn.init.zeros_(last_op.bias)
    return new


def append_block(visual: nn.Module, block: nn.Module) -> None:
    """Append ``block`` to the trunk's ``blocks`` (``visual.trunk.blocks.<depth>``)."""
    visual.trunk.blocks.append(block)


# ----------------------------------------------------------------------------------------------------------- estimates
def _attention_core_units(blk: nn.Module, rope: bool | None) -> float:
    """Units the attention keeps from q / k / v to the sub-LN: SDPA's q, k, v and output - a fused qkv stays alive
    whole (3) while v is a view of it, and q, k made anew by q/k norm or rotary embeddings add 2 (separate
    projections: 3, and 2 more with q/k norm, whose inputs are kept); the sub-LN ``attn.norm`` input (1).
    ``rope`` None: an EVA block is taken to run rotary embeddings (the block alone does not say)."""
    attn = blk.attn
    q_norm = not isinstance(attn.q_norm, nn.Identity)
    if rope is None:
        rope = isinstance(blk, (EvaBlock, EvaBlockPostNorm))
    qkv = 3.0 + 2.0 * (q_norm or rope) if attn.qkv is not None else 3.0 + 2.0 * q_norm
    return qkv + 1.0 + float(not isinstance(attn.norm, nn.Identity))


def _frozen_post_norms(blk: nn.Module) -> tuple[float, float]:
    """For a post-norm block, whether each branch's output part (projection, its dropout and adapters, LoRA terms,
    the norm) is frozen, as 1.0 / 0.0: the lean block then runs it outside the checkpoints, where the norm keeps its
    input (one unit); (0, 0) for other blocks."""
    if not isinstance(blk, EvaBlockPostNorm):
        return 0.0, 0.0
    if isinstance(blk, _lean.LeanBlockMixin):
        parts = blk.parts_with_deltas()
        return tuple(float(frozen(*parts[k])) for k in ("attn_out", "mlp_out"))
    return tuple(float(frozen(*mods)) for mods in ((blk.attn.proj, blk.attn.proj_drop, blk.norm1),
                                                          (blk.mlp.fc2, blk.mlp.drop2, blk.norm2)))


def block_units(blk: nn.Module, policy: str, rope: bool | None = None) -> float:
    """Activation units (B*L*D elements) a lean timm block keeps for backward under ``policy`` when gradients flow
    through all of it (every ``leanclip.lean.POLICIES`` entry; measured with ``leanclip.memory`` on the tiny
    families; ``rope``: whether the trunk runs rotary embeddings, see ``_attention_core_units``). Without
    recompute: LN1's input (1); the attention core (``_attention_core_units``); LN2's input (1); the MLP's hidden
    activations at ratio r = hidden / D: GELU's input (r) or a gated MLP's three (3r), plus ``mlp.norm``'s input
    (r). ``mlp`` keeps the attention part and LN2's input, ``mlp+qkv`` the block input, the SDPA output, the
    sub-LN input and LN2's input, ``block`` the block input. A post-norm block (EVA02-E) keeps the same count: its
    norms' inputs (the branch outputs) take the place of the pre-norms' (the block input and the MLP's input are
    kept by no frozen projection); a frozen post-norm adds its input under the policies that would otherwise
    recompute it (``_frozen_post_norms``)."""
    mlp = blk.mlp
    width = blk.attn.proj.out_features
    frozen1, frozen2 = _frozen_post_norms(blk)
    sub_ln = float(not isinstance(blk.attn.norm, nn.Identity))
    if policy == "block":
        return 1.0 + frozen2
    if policy == "mlp+qkv":
        return 3.0 + sub_ln + frozen1 + frozen2
    attention = 1.0 + _attention_core_units(blk, rope)
    if policy == "mlp":
        return attention + 1.0 + frozen2
    hidden = mlp.fc2.in_features / width
    gated = isinstance(mlp, (GluMlp, SwiGLU))
    return attention + 1.0 + (3.0 if gated else 1.0) * hidden + hidden * (not isinstance(mlp.norm, nn.Identity))


def rows_units(blk: nn.Module, policy: str, rope: bool, tokens: int) -> float:
    """Units the last block keeps when it runs at the class token alone (``forward_rows``): its input under
    ``mlp+qkv`` / ``block`` (the whole row computation is recomputed); otherwise the pre-norm's input (1), k and v
    at every token (a fused projection's k | v output stays alive whole, 2, and a k made anew by rotary embeddings
    or k-norm adds 1; separate k and v projections: 2, and 1 more with a k-norm, whose input is kept) and the
    row-0 activations, one token of ``block_units``."""
    if policy in ("mlp+qkv", "block"):
        return 1.0
    attn = blk.attn
    k_norm = not isinstance(attn.k_norm, nn.Identity)
    kv = 2.0 + (k_norm or rope if attn.qkv is not None else k_norm)
    prenorm = 0.0 if isinstance(blk, EvaBlockPostNorm) else 1.0
    return prenorm + kv + block_units(blk, policy, rope) / tokens


def _entry_units(blk: nn.Module, policy: str, rope: bool) -> float:
    """Units the first block gradients reach does not keep when they enter a post-norm block after its attention
    core (the block input needs no gradient, and q / k / v, their LoRA terms and the output projection's weight are
    frozen: the first thing that trains is ``norm1`` or what follows it): under ``none`` / ``mlp`` the attention
    core keeps nothing then. 0 elsewhere (``mlp+qkv`` / ``block`` keep the block input either way)."""
    if not isinstance(blk, EvaBlockPostNorm) or policy not in ("none", "mlp"):
        return 0.0
    parts = blk.parts_with_deltas()["attn_core"] if isinstance(blk, _lean.LeanBlockMixin) else [blk.attn]
    if not frozen(*parts, blk.attn.proj.weight):
        return 0.0
    return _attention_core_units(blk, rope)


def _tokens(trunk: nn.Module) -> int:
    return int(trunk.patch_embed.num_patches) + int(getattr(trunk, "num_prefix_tokens", 0))


def estimate_image_bytes(model: nn.Module, policy: str, batch: int, dtype) -> int | None:
    """Predicted bytes a lean timm image tower keeps for backward (``leanclip.saved_bytes.estimate_saved_bytes``'s image
    part), or None when ``model.visual`` is not a covered timm tower. Every block from the first one holding a
    trainable parameter (all of them when the embeddings or ``norm_pre`` train) counts ``block_units`` - the whole
    block, an upper bound when gradients enter it midway - plus its LayerNorm statistics and the attention's
    logsumexp; after the blocks, the final norm's input and, with MAP pooling, the pooled attention's keys and
    values over every token."""
    g = image_geometry(model, "image", dtype, None)
    if g is None:
        return None
    blocks = list(g.blocks)
    names = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("visual.")]
    embeds = ("visual.trunk.patch_embed.", "visual.trunk.pos_embed", "visual.trunk.cls_token", "visual.trunk.reg_token",
              "visual.trunk.norm_pre.")
    first = 0 if any(n.startswith(embeds) for n in names) else next(
        (i for i in range(len(blocks)) if any(n.startswith(f"visual.trunk.blocks.{i}.") for n in names)), None)
    if first is None and not names:
        return 0
    rows = batch * g.tokens
    unit = g.unit(batch)
    rope = _has_rope(model.visual.trunk)
    total = 0.0
    start = first if first is not None else len(blocks)
    if start < len(blocks) and not any(n.startswith(embeds) for n in names):
        total -= _entry_units(blocks[start], policy, rope) * unit
    for i, blk in enumerate(blocks[start:], start):
        units = rows_units(blk, policy, rope, g.tokens) if g.rows_last and i == len(blocks) - 1 else \
            block_units(blk, policy, rope)
        total += units * unit + rows * (2 * 8 + blk.attn.num_heads * 4)
    total += (unit / g.tokens + batch * 8) if g.rows_last else (unit + rows * 8)  # the final norm's input
    if any(n.startswith("visual.trunk.norm_pre.") for n in names):  # PE-Core's pre-transformer norm keeps its input
        total += unit + rows * 8
    if g.map_head:
        total += 2 * unit  # the pool's keys and values over every token
    return int(total)


def _has_rope(trunk: nn.Module) -> bool:
    """Whether a timm trunk runs rotary embeddings (EVA02, PE-Core; not EVA01 or timm's EVA02-E)."""
    return getattr(trunk, "rope", None) is not None


def image_geometry(model: nn.Module, tower: str, dtype, text_len) -> TowerGeometry | None:
    """The ``leanclip.geometry`` reader of a timm image tower the estimates know (blocks the lean engine runs; None for
    anything else): tokens with the prefix tokens, width, the MLP's hidden width (SwiGLU / GluMlp: one half),
    heads, MAP pooling, and each policy's ``block_units``."""
    v = timm_image_tower(model) if tower == "image" else None
    blocks = None if v is None else trunk_blocks(v)
    if blocks is None or not all(block_obstacle(b) is None for b in blocks):
        return None
    trunk = v.trunk
    blk = trunk.blocks[0]
    mlp = blk.mlp
    return TowerGeometry("image", "timm", tuple(trunk.blocks), _tokens(trunk), blk.attn.proj.out_features,
                         mlp.fc2.in_features, isinstance(mlp, (GluMlp, SwiGLU)), blk.attn.num_heads,
                         elem_size(dtype, blk.attn.proj.weight),
                         bool(getattr(trunk, "reads_cls_only", lambda: False)()),  # LeanEva: the last block at row 0
                         getattr(trunk, "attn_pool", None) is not None,
                         {p: block_units(blk, p, _has_rope(trunk)) for p in _lean.POLICIES})


# ----------------------------------------------------------------------------------------------------------- tiny models
# Tiny trunks: the released SigLIP2 / EVA02 / EVA02-E / PE-Core model functions with width, depth, heads and image size shrunk
# (every block option - rotary embeddings, SwiGLU, sub-LN, fused / separate qkv, MAP pooling - kept).
_TINY = {"dim": 64, "depth": 2, "heads": 2, "img": 32, "patch": 8}
TINY_TIMM_MODELS = {
    "leanclip_tiny_siglip2": ("vit_base_patch16_siglip_224", {}),
    "leanclip_tiny_vit_qknorm": ("vit_base_patch16_siglip_224", {"qk_norm": True, "init_values": 0.1,
                                                                 "scale_attn_norm": True, "scale_mlp_norm": True}),
    "leanclip_tiny_eva02": ("eva02_base_patch16_clip_224", {"ref_feat_shape": (4, 4)}),
    "leanclip_tiny_eva02_fused": ("eva02_base_patch16_clip_224", {"ref_feat_shape": (4, 4), "qkv_fused": True,
                                                                  "scale_mlp": False, "init_values": 0.1}),
    "leanclip_tiny_pe_core": ("vit_pe_core_base_patch16_224", {"ref_feat_shape": (4, 4), "attn_pool_num_heads": 2}),
    "leanclip_tiny_eva02_postnorm": ("eva02_enormous_patch14_clip_224", {}),  # EVA02-E: post-norm, fused qkv, GELU
}


def register_tiny_models() -> list[str]:
    """Register the ``TINY_TIMM_MODELS`` with timm (idempotent) so open_clip's ``TimmModel`` can build them by
    name. Returns their names."""
    import timm
    from timm.models import is_model, model_entrypoint, register_model

    for name, (base, extra) in TINY_TIMM_MODELS.items():
        if is_model(name):
            continue
        kw = dict(img_size=_TINY["img"], patch_size=_TINY["patch"], embed_dim=_TINY["dim"], depth=_TINY["depth"],
                  num_heads=_TINY["heads"], **extra)

        def build(pretrained: bool = False, _base=base, _kw=kw, **kwargs):
            return model_entrypoint(_base)(pretrained=False, **{**_kw, **kwargs})

        build.__name__ = name
        build.__module__ = timm.models.vision_transformer.__name__
        register_model(build)
    return list(TINY_TIMM_MODELS)


# ----------------------------------------------------------------------------------------------------------- registration
if Block is not None:
    _lean.register_lean_classes({TimmLayerNorm: LeanTimmLayerNorm, Block: LeanTimmBlock, EvaBlock: LeanEvaBlock,
                                 EvaBlockPostNorm: LeanEvaPostNormBlock, Eva: LeanEva},
                                supported=lambda m: block_obstacle(m) is None if is_timm_block(m) else True,
                                image_tower=tower_obstacles, image_estimate=estimate_image_bytes,
                                plain_sites=hook_sites)
    register_family(image_geometry)
