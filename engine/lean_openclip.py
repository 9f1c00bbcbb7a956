"""open_clip's lean modules: ``LeanResidualAttentionBlock`` (SDPA attention, fused frozen projections, the recompute
policies of ``LeanBlockMixin``, the last block at the pooled rows only) and ``LeanVisionTransformer`` (runs that last
block at the CLS token when nothing else is read). ``leanclip.lean`` swaps them in by a ``__class__`` change."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanclip.lean_ops import autocast_dtype, is_causal_mask
from leanclip.models.openclip import ResidualAttentionBlock, Transformer, VisionTransformer
from leanclip.recompute import Chunked, LeanBlockMixin, ckpt, frozen, mask_rows


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
        if not frozen(self.mlp.c_proj.bias) or any("c_proj" in m.sites() for m in self._deltas()):
            return None
        if not (isinstance(ls, nn.Identity) or isinstance(getattr(ls, "gamma", None), torch.Tensor)):
            return None
        gy = grad_y if isinstance(ls, nn.Identity) else grad_y * ls.gamma
        w = self.mlp.c_proj.weight
        ac = autocast_dtype(gy.device.type)
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
        if is_causal_mask(attn_mask, n):
            mask = (torch.arange(n, device=x.device)[None, :] <= rows[:, None])[:, None, None, :]
        else:
            mask = _sdpa_mask(attn_mask, b, self.attn.num_heads, n, x.dtype)
            if mask is not None and mask.dim() == 2:
                mask = mask[rows][:, None, None, :]
            elif mask is not None:
                mask = mask[torch.arange(b, device=x.device), :, rows][:, :, None, :]
        attn = self.attn
        big = x.requires_grad or not frozen(self.ln_1, attn.in_proj_weight, attn.in_proj_bias)
        if torch.is_grad_enabled() and big and self.leanclip_recompute in ("mlp+qkv", "block"):
            chunk = self.leanclip_chunk if self.leanclip_recompute == "block" else None
            if chunk is not None and b > chunk:  # the recompute's k, v and their gradients: one chunk at a time
                trainable = [p for p in self.parameters() if p.requires_grad]
                return Chunked.apply(lambda xc, start, stop: self._rows_core(xc, rows[start:stop],
                                                                             mask_rows(mask, start, stop, b)),
                                     None, x, chunk, self._needs_rng(), *trainable)
            return ckpt(self._rows_core, x, rows, mask, rng=self._needs_rng())
        return self._rows_core(x, rows, mask)

    # -- forward --
    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None, is_causal: bool | None = None):
        if k_x is not None or v_x is not None or hasattr(self, "ln_1_kv"):
            return super().forward(q_x, k_x, v_x, attn_mask)
        batch_first = getattr(self.attn, "batch_first", True)
        x = q_x if batch_first else q_x.transpose(0, 1)
        b, n, _ = x.shape
        if is_causal is None:
            is_causal = is_causal_mask(attn_mask, n)
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
