"""The lean versions of timm's transformer blocks and trunk, part of the timm boundary (``leanclip.models.timm``
decides which blocks they cover, where the methods act and what the estimates count; this module runs them).

- ``LeanTimmLayerNorm``: timm's ``LayerNorm`` through ``kernels.layer_norm``;
- ``LeanTimmBlock`` / ``LeanEvaBlock`` / ``LeanEvaPostNormBlock``: ``vision_transformer.Block``, ``eva.EvaBlock`` and
  ``eva.EvaBlockPostNorm`` on ``leanclip.recompute``'s ``LeanBlockMixin`` (recompute policies none / mlp / mlp+qkv /
  block, block over chunks of samples), whose branch functions (``_LeanTimmMixin``) call ``lean_linear``
  (``kernels.frozen_linear`` for frozen weights) and apply attached ``ProjectionDelta`` s (LoRA). Gradients equal
  plain autograd under every policy;
- ``LeanEva``: the ``eva.Eva`` trunk that runs its last block at the class token alone when ``token`` pooling reads
  nothing else (``forward_rows``: q, the attention output and the MLP at row 0, k and v at every token), exactly,
  unless the block draws random numbers (dropout or drop path in training: the row computation would draw other
  masks than the full block).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:  # timm is optional for open_clip; without it no timm tower can be built, and nothing here is needed
    from timm.layers import SwiGLU, GluMlp, apply_rot_embed_cat
    from timm.layers import LayerNorm as TimmLayerNorm
    from timm.models.eva import Eva, EvaBlock, EvaBlockPostNorm
    from timm.models.vision_transformer import Block
except ImportError:  # pragma: no cover
    Block = Eva = EvaBlock = EvaBlockPostNorm = None

from leanclip import lean as _lean
from leanclip.recompute import Chunked, ckpt, frozen, mask_rows

# ----------------------------------------------------------------------------------------------------------- LayerNorm
if Block is not None:
    class LeanTimmLayerNorm(TimmLayerNorm):
        """timm ``LayerNorm`` through ``kernels.layer_norm`` (same math; output in the input dtype)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = _lean.fused_layer_norm(self, x)
            return super().forward(x) if y is None else y


# ----------------------------------------------------------------------------------------------------------- blocks
def _fused_qkv_bias(attn: nn.Module):
    """The bias of a fused qkv projection: ``qkv.bias``, or EVA's ``q_bias | k_bias (a zero buffer) | v_bias``."""
    if getattr(attn, "q_bias", None) is not None:
        return torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    return attn.qkv.bias


class _LeanTimmMixin(_lean.LeanBlockMixin):
    """The branch functions of a lean timm block. ``ctx`` (the ``mask`` argument of ``LeanBlockMixin``) is the pair
    (SDPA attention mask or None, rotary embedding or None)."""

    def _qkv(self, y: torch.Tensor):
        attn = self.attn
        b, n, _ = y.shape
        h, hd = attn.num_heads, attn.head_dim
        a = h * hd
        if attn.qkv is not None:
            qkv = self._project("in_proj", y, attn.qkv.weight, _fused_qkv_bias(attn), 0, 3 * a)
            return qkv.reshape(b, n, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
        out = []
        for i, lin in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
            t = self._project("in_proj", y, lin.weight, lin.bias, i * a, (i + 1) * a)
            out.append(t.reshape(b, n, h, hd).transpose(1, 2))
        return out

    def _attn_core(self, x, ctx, is_causal: bool):
        attn = self.attn
        mask, rope = ctx
        q, k, v = self._qkv(self._prenorm(1, x))
        q, k = attn.q_norm(q), attn.k_norm(k)
        if rope is not None:
            npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        p = attn.attn_drop.p if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal)

    def _attn_out(self, o):
        attn = self.attn
        b, h, n, hd = o.shape
        o = attn.norm(o.transpose(1, 2).reshape(b, n, h * hd))
        o = attn.proj_drop(self._project("out_proj", o, attn.proj.weight, attn.proj.bias))
        return self.drop_path1(self._scale(1, o))

    def _mlp_core(self, x):
        mlp = self.mlp
        y = self._prenorm(2, x)
        if isinstance(mlp, SwiGLU):
            h = mlp.fc1_g.out_features
            g = mlp.act(self._project("c_fc", y, mlp.fc1_g.weight, mlp.fc1_g.bias, 0, h))
            g = g * self._project("c_fc", y, mlp.fc1_x.weight, mlp.fc1_x.bias, h, 2 * h)
        elif isinstance(mlp, GluMlp):
            x1, x2 = self._project("c_fc", y, mlp.fc1.weight, mlp.fc1.bias).chunk(2, dim=-1)
            g = x1 * mlp.act(x2) if mlp.gate_last else mlp.act(x1) * x2
        else:
            g = mlp.act(self._project("c_fc", y, mlp.fc1.weight, mlp.fc1.bias))
        return mlp.norm(mlp.drop1(g))

    def _mlp_out(self, g):
        mlp = self.mlp
        y = mlp.drop2(self._project("c_proj", g, mlp.fc2.weight, mlp.fc2.bias))
        return self.drop_path2(self._scale(2, y))

    def _prenorm(self, i: int, x):
        """The branch input: ``norm1`` / ``norm2`` of the residual stream (pre-LN blocks)."""
        return (self.norm1 if i == 1 else self.norm2)(x)

    def _prenorm_part(self, i: int):
        return self.norm1 if i == 1 else self.norm2

    def _branch_parts(self) -> dict:
        attn, mlp = self.attn, self.mlp
        pre1, pre2 = self._prenorm_part(1), self._prenorm_part(2)
        core = [pre1, attn.q_norm, attn.k_norm] + [getattr(attn, n, None) for n in (
            "qkv", "q_proj", "k_proj", "v_proj", "q_bias", "v_bias")]
        return {"attn_core": core, "attn_out": [attn.proj.weight, attn.proj_drop, self._scale_part(1)],
                "attn": [pre1, attn, self._scale_part(1)],
                "mlp_core": [pre2, mlp.norm] + [getattr(mlp, n) for n in ("fc1", "fc1_g", "fc1_x")
                                                if hasattr(mlp, n)],
                "mlp_out": [mlp.fc2.weight, mlp.drop2, self._scale_part(2)],
                "mlp": [pre2, mlp, self._scale_part(2)]}

    def _needs_rng(self) -> bool:
        if not self.training:
            return False
        drops = [self.attn.attn_drop, self.attn.proj_drop, self.mlp.drop1, self.mlp.drop2]
        if any(d.p > 0 for d in drops if isinstance(d, nn.Dropout)):
            return True
        if any(getattr(d, "drop_prob", 0) > 0 for d in (self.drop_path1, self.drop_path2)):
            return True
        return any(m.needs_rng() for m in self._deltas())

    def _rows_core(self, x, ctx):
        """The block's output at the class token alone, (B, 1, D): q, the attention output and the MLP at row 0,
        k and v at every token. Row 0 is a prefix token, so the rotary embedding leaves its q as it is."""
        attn = self.attn
        mask, rope = ctx
        b, n, _ = x.shape
        h, hd = attn.num_heads, attn.head_dim
        a = h * hd
        y = self._prenorm(1, x)
        if attn.qkv is not None:
            w, bias = attn.qkv.weight, _fused_qkv_bias(attn)
            q = self._project("in_proj", y[:, :1], w[:a], None if bias is None else bias[:a], 0, a)
            kv = self._project("in_proj", y, w[a:], None if bias is None else bias[a:], a, 3 * a)
            k, v = kv.reshape(b, n, 2, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self._project("in_proj", y[:, :1], attn.q_proj.weight, attn.q_proj.bias, 0, a)
            k, v = (self._project("in_proj", y, lin.weight, lin.bias, i * a, (i + 1) * a).reshape(b, n, h, hd)
                    .transpose(1, 2) for i, lin in ((1, attn.k_proj), (2, attn.v_proj)))
        q, k = attn.q_norm(q.reshape(b, 1, h, hd).transpose(1, 2)), attn.k_norm(k)
        if rope is not None:
            npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # no dropout: forward_rows' caller checks
        x_r = x[:, :1] + self._attn_out(o)
        return x_r + self._mlp_out(self._mlp_core(x_r))

    def forward_rows(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        """``self(x, rope=rope)[:, :1]`` without computing the other rows' outputs: the last block of a trunk that
        reads the class token alone (``LeanEva``). Under ``mlp+qkv`` / ``block`` the whole row computation is
        recomputed in backward (only ``x`` is kept); ``block`` over chunks runs it a chunk of samples at a time."""
        ctx, b = (None, rope), x.shape[0]
        policy = self.leanclip_recompute
        if torch.is_grad_enabled() and policy in ("mlp+qkv", "block") and (x.requires_grad or not frozen(self)):
            chunk = self.leanclip_chunk if policy == "block" else None
            if chunk is not None and b > chunk:
                trainable = [p for p in self.parameters() if p.requires_grad]
                return Chunked.apply(lambda xc, start, stop: self._rows_core(xc, mask_rows(ctx, start, stop, b)),
                                     None, x, chunk, False, *trainable)
            return ckpt(self._rows_core, x, ctx)
        return self._rows_core(x, ctx)

    def _forward(self, x, attn_mask, rope, is_causal: bool):
        policy = self.leanclip_recompute
        ctx = (attn_mask, rope)
        if policy == "none" or not torch.is_grad_enabled():
            return self._plain(x, ctx, is_causal)
        return self._recompute(x, ctx, is_causal, policy)


if Block is not None:
    class LeanTimmBlock(_LeanTimmMixin, Block):
        """timm ``vision_transformer.Block`` on the lean engine (same parameters, names and math)."""

        def _scale(self, i: int, y):
            return (self.ls1 if i == 1 else self.ls2)(y)

        def _scale_part(self, i: int):
            return self.ls1 if i == 1 else self.ls2

        def forward(self, x, attn_mask=None, is_causal: bool = False):
            return self._forward(x, attn_mask, None, is_causal)

    class LeanEvaBlock(_LeanTimmMixin, EvaBlock):
        """timm ``eva.EvaBlock`` on the lean engine (same parameters, names and math; rotary embeddings)."""

        def _scale(self, i: int, y):
            gamma = self.gamma_1 if i == 1 else self.gamma_2
            return y if gamma is None else gamma * y

        def _scale_part(self, i: int):
            return self.gamma_1 if i == 1 else self.gamma_2

        def forward(self, x, rope=None, attn_mask=None, is_causal: bool = False):
            return self._forward(x, attn_mask, rope, is_causal)

    class LeanEvaPostNormBlock(_LeanTimmMixin, EvaBlockPostNorm):
        """timm ``eva.EvaBlockPostNorm`` (EVA02-E) on the lean engine: ``x + drop_path(norm1(attn(x)))``, then the
        same with ``norm2`` and the MLP. The branches read the residual stream itself (no pre-norm) and each
        LayerNorm takes the place of the layer scale, on the branch output after the projection and its dropout,
        so every recompute policy and the chunked block run the shared branch functions unchanged. A trainable
        norm puts its output projection inside the checkpoints (the norm's input would otherwise be kept); a
        frozen one leaves the projection outside and keeps that input (``block_units`` counts it)."""

        def _prenorm(self, i: int, x):
            return x

        def _prenorm_part(self, i: int):
            return None

        def _scale(self, i: int, y):
            return (self.norm1 if i == 1 else self.norm2)(y)

        def _scale_part(self, i: int):
            return self.norm1 if i == 1 else self.norm2

        forward = LeanEvaBlock.forward
    class LeanEva(Eva):
        """timm ``eva.Eva`` trunk (EVA02, EVA01, EVA02-E) whose forward runs its last block at the class token
        alone when that is all that is read: ``token`` pooling, no attention pooling, a lean last block drawing no
        random numbers (so every other block draws what the plain forward draws), no checkpointing or per-block
        rotary embeddings. The final norm works per token and the pool reads row 0, so the output is the plain
        forward's; otherwise timm's own forward."""

        def reads_cls_only(self) -> bool:
            last = self.blocks[-1] if len(self.blocks) else None
            return (self.global_pool == "token" and self.attn_pool is None and self.cls_token is not None
                    and not self.grad_checkpointing and not getattr(self, "rope_mixed", False)
                    and isinstance(last, _LeanTimmMixin) and not last._needs_rng())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.reads_cls_only():
                return super().forward(x)
            x = self.patch_embed(x)
            x, rope = self._pos_embed(x)
            x = self.norm_pre(x)
            for blk in self.blocks[:-1]:
                x = blk(x, rope=rope)
            return self.forward_head(self.norm(self.blocks[-1].forward_rows(x, rope)))
else:  # pragma: no cover
    LeanTimmBlock = LeanEvaBlock = LeanEvaPostNormBlock = LeanEva = None
