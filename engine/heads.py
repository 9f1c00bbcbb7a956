"""Small trainable modules the PEFT methods add on top of a frozen open_clip model.

- ``LLUHead``      (method ``llu``): identity-initialised affine map on normalized embeddings, gated per sample by
                   the max similarity to a feature bank D (``kernels.max_sim``).
- ``PromptLearner`` (method ``coop``): learned prompt context vectors, class names appended.
- ``LinearProbe``  (method ``linear-probe``): linear classifier E -> C on normalized image features.
- ``ClipAdapter``  (method ``adapter``): CLIP-Adapter residual bottleneck MLP on image features.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from leanclip import kernels
def _check_dim(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _check_real(name: str, v, *, lo=None, hi=None, lo_open=False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    v = float(v)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v!r}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {v!r}")
    return v


def check_llu_options(beta, gamma) -> tuple[float, float]:
    """``(beta, gamma)`` of an ``LLUHead`` as floats: beta in [0, 1], gamma >= 0 (ValueError naming the option)."""
    return _check_real("beta", beta, lo=0.0, hi=1.0), _check_real("gamma", gamma, lo=0.0)


def check_adapter_options(dim, reduction, ratio) -> tuple[int, int, float]:
    """``(dim, reduction, ratio)`` of a ``ClipAdapter``: dim // reduction >= 1 hidden units, ratio in [0, 1]."""
    dim = _check_dim("dim", dim)
    reduction = _check_dim("reduction", reduction)
    if dim // reduction < 1:
        raise ValueError(f"reduction {reduction} leaves no hidden units for dim {dim}")
    return dim, reduction, _check_real("ratio", ratio, lo=0.0, hi=1.0)


def check_std(std) -> float:
    """A ``PromptLearner`` random-init standard deviation: a finite number > 0."""
    return _check_real("std", std, lo=0.0, lo_open=True)


# ----------------------------------------------------------------------------------------------------------- LLU
class LLUHead(nn.Module):
    """``g(x) = W x + b`` (W = I, b = 0 at start) applied to L2-normalized embeddings ``x`` (N, E):

        vals[n] = max_{d in D} <x[n], d>                      (kernels.max_sim: no N x M matrix)
        alpha[n] = beta * exp(-gamma * (1 - vals[n]))          (one gate per sample)
        out[n]  = normalize(alpha[n] * normalize(g(x[n])) + (1 - alpha[n]) * x[n])

    ``D`` (M, E) is the bank of (normalized) training features or cluster centres: pass it to ``forward`` or store
    it once with ``set_bank`` (kept as a buffer, saved by ``leanclip.checkpoint.save_trainable``).
    ``reg()`` = mean((W - I)^2) + mean(b^2) (the loss adds ``lam * reg()``; the authors' lambda is 1e3)."""

    def __init__(self, dim: int, beta: float = 0.5, gamma: float = 20.0):
        super().__init__()
        dim = _check_dim("dim", dim)
        self.dim = dim
        self.beta, self.gamma = check_llu_options(beta, gamma)
        self.weight = nn.Parameter(torch.eye(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("bank", None)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, beta={self.beta}, gamma={self.gamma}"

    @torch.no_grad()
    def set_bank(self, d: torch.Tensor, normalize: bool = True) -> None:
        """Store the feature bank D (M, E) as a buffer (rows L2-normalized unless ``normalize=False``)."""
        if not isinstance(d, torch.Tensor):
            raise TypeError(f"d must be a torch.Tensor, got {type(d).__name__}")
        if d.dim() != 2 or d.shape[1] != self.dim or d.shape[0] == 0:
            raise ValueError(f"d must have shape (M>=1, {self.dim}), got {tuple(d.shape)}")
        d = d.detach().to(device=self.weight.device, dtype=torch.float32)
        self.bank = F.normalize(d, dim=-1) if normalize else d.clone()

    def alpha(self, x: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample gate (N,) = beta * exp(-gamma * (1 - max_sim(x, D)))."""
        d = self._bank(d, x)
        vals, _ = kernels.max_sim(x, d.to(x.dtype))
        return self.beta * torch.exp(-self.gamma * (1.0 - vals.float()))

    def _bank(self, d, x):
        d = self.bank if d is None else d
        if d is None:
            raise ValueError("LLUHead needs a feature bank D: pass d= or call set_bank(D) first")
        if d.dim() != 2 or d.shape[1] != self.dim:
            raise ValueError(f"D must have shape (M, {self.dim}), got {tuple(d.shape)}")
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (N, {self.dim}), got {tuple(x.shape)}")
        return d

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """g(x) = W x + b (no gating)."""
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))

    def forward(self, x: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
        xf = x.float()
        a = self.alpha(xf, d).unsqueeze(-1)
        g = F.normalize(F.linear(xf, self.weight, self.bias), dim=-1)
        return F.normalize(a * g + (1.0 - a) * xf, dim=-1)

    def reg(self) -> torch.Tensor:
        """mean((W - I)^2) + mean(b^2): the authors' code (``F.mse_loss`` against I and 0), for which their
        lambda = 1e3 is a gentle pull (a non-squared norm would pin the map at identity)."""
        eye = torch.eye(self.dim, device=self.weight.device, dtype=self.weight.dtype)
        return F.mse_loss(self.weight, eye) + self.bias.square().mean()


# ----------------------------------------------------------------------------------------------------------- CoOp
class PromptLearner(nn.Module):
    """CoOp learned context: prompts ``[SOS] ctx_1 .. ctx_n <class name tokens> . [EOT]``.

    The context (n_ctx, width) is initialised from the token embeddings of ``init_text`` when it tokenizes to
    exactly ``n_ctx`` tokens (``"a photo of a"`` for n_ctx=4), else from N(0, std^2). Prompts are built for any list
    of class names at call time (base-to-new evaluation uses the same context with new names)."""

    placeholder = "X"

    def __init__(self, n_ctx: int, width: int, init_embeddings: torch.Tensor | None = None, std: float = 0.02):
        super().__init__()
        self.n_ctx = _check_dim("n_ctx", n_ctx)
        self.width = _check_dim("width", width)
        if init_embeddings is not None:
            if tuple(init_embeddings.shape) != (self.n_ctx, self.width):
                raise ValueError(f"init_embeddings must have shape ({self.n_ctx}, {self.width}), "
                                 f"got {tuple(init_embeddings.shape)}")
            ctx = init_embeddings.detach().to(torch.float32).clone()
        else:
            ctx = torch.empty(self.n_ctx, self.width).normal_(0.0, check_std(std))
        self.ctx = nn.Parameter(ctx)
        self._token_cache: dict = {}

    def extra_repr(self) -> str:
        return f"n_ctx={self.n_ctx}, width={self.width}"

    def prompt_texts(self, classnames: Sequence[str]) -> list[str]:
        prefix = " ".join([self.placeholder] * self.n_ctx)
        return [f"{prefix} {str(c).replace('_', ' ').strip()}." for c in classnames]

    def tokens(self, classnames: Sequence[str], tokenizer: Callable) -> torch.Tensor:
        """Token ids (C, context_length) of the prompts (CPU, cached per class-name list and tokenizer)."""
        key = (tuple(classnames), id(tokenizer))
        tok = self._token_cache.get(key)
        if tok is None:
            tok = torch.as_tensor(tokenizer(self.prompt_texts(classnames)))
            if tok.dim() != 2 or tok.shape[1] < self.n_ctx + 2:
                raise ValueError(f"tokenizer returned shape {tuple(tok.shape)}; expected (C, >= n_ctx + 2)")
            if len(self._token_cache) > 8:
                self._token_cache.clear()
            self._token_cache[key] = tok
        return tok

    def forward(self, token_embedding: nn.Module, classnames: Sequence[str], tokenizer: Callable,
                max_len: int | None = None):
        """``(embeddings (C, L, width), tokens (C, L))``: prompt embeddings with the learned context spliced in,
        for the first ``max_len`` positions (all when None)."""
        dev = token_embedding.weight.device
        tok = self.tokens(classnames, tokenizer)
        if max_len is not None:
            if max_len < self.n_ctx + 2:
                raise ValueError(f"max_len must be >= n_ctx + 2 = {self.n_ctx + 2}, got {max_len}")
            tok = tok[:, :max_len]
        tok = tok.to(dev)
        emb = token_embedding(tok)
        ctx = self.ctx.to(emb.dtype).unsqueeze(0).expand(emb.shape[0], -1, -1)
        out = torch.cat([emb[:, :1], ctx, emb[:, 1 + self.n_ctx:]], dim=1)
        return out, tok


# ----------------------------------------------------------------------------------------------------------- probe
class LinearProbe(nn.Module):
    """Linear classifier ``logits = x W^T + b`` on normalized image features (E -> C)."""

    def __init__(self, dim: int, num_classes: int, weight: torch.Tensor | None = None, bias: bool = True):
        super().__init__()
        self.fc = nn.Linear(_check_dim("dim", dim), _check_dim("num_classes", num_classes), bias=bias)
        with torch.no_grad():
            if weight is None:
                self.fc.weight.zero_()
            else:
                if tuple(weight.shape) != (num_classes, dim):
                    raise ValueError(f"weight must have shape ({num_classes}, {dim}), got {tuple(weight.shape)}")
                self.fc.weight.copy_(weight)
            if self.fc.bias is not None:
                self.fc.bias.zero_()

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.to(self.fc.weight.dtype))


# ----------------------------------------------------------------------------------------------------------- adapter
class ClipAdapter(nn.Module):
    """CLIP-Adapter (Gao et al.): ``out = ratio * mlp(x) + (1 - ratio) * x`` with
    ``mlp = Linear(E, E/r, no bias) -> ReLU -> Linear(E/r, E, no bias) -> ReLU`` on (unnormalized) image features."""

    def __init__(self, dim: int, reduction: int = 4, ratio: float = 0.2):
        super().__init__()
        dim, reduction, self.ratio = check_adapter_options(dim, reduction, ratio)
        self.fc = nn.Sequential(
            nn.Linear(dim, dim // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(dim // reduction, dim, bias=False),
            nn.ReLU(inplace=True),
        )

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.fc[0].weight.dtype)
        return self.ratio * self.fc(x) + (1.0 - self.ratio) * x
