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


LLU_GATES = ("exp", "dirac", "none")
# The gate beta * exp(-gamma * d) reads cosine distances d that fp32 resolves to about 2.4e-7 (a sample's distance to
# itself comes out anywhere in +-2.4e-7). Up to gamma 1e4 that rounding moves the gate by under 0.3%; far beyond it the
# gate measures rounding noise, and past about 3.7e8 exp() of a rounded-negative distance overflows to inf (NaN in
# the blend), as gamma itself does in fp32 past 3.4e38. The papers' gamma is a few tens.
LLU_GAMMA_MAX = 1e4
LLU_INITS = ("identity", "random")
LLU_REGS = ("mse", "norm")
# blend: "normalized" mixes normalize(g(x)) with x (the default: two unit vectors); "paper" mixes g(x) itself, as the
# paper's eq. 4 writes it
LLU_BLENDS = ("normalized", "paper")


def _check_choice(name: str, v, choices) -> str:
    if v not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {v!r}")
    return v


def check_llu_options(beta, gamma, gate="exp", threshold=0.1, init="identity", reg="mse",
                      init_seed=0, blend="normalized") -> tuple[float, float]:
    """Validate the options of an ``LLUHead`` (ValueError naming the option); returns ``(beta, gamma)`` as floats:
    beta in [0, 1], gamma in [0, ``LLU_GAMMA_MAX``], gate / init / reg / blend one of their choices, threshold a
    cosine distance in [0, 2], init_seed an int >= 0."""
    _check_choice("gate", gate, LLU_GATES)
    _check_choice("blend", blend, LLU_BLENDS)
    _check_choice("init", init, LLU_INITS)
    _check_choice("reg", reg, LLU_REGS)
    _check_real("threshold", threshold, lo=0.0, hi=2.0)
    if isinstance(init_seed, bool) or not isinstance(init_seed, int) or init_seed < 0:
        raise ValueError(f"init_seed must be an int >= 0, got {init_seed!r}")
    return _check_real("beta", beta, lo=0.0, hi=1.0), _check_real("gamma", gamma, lo=0.0, hi=LLU_GAMMA_MAX)


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
    """``g(x) = W x + b`` applied to L2-normalized embeddings ``x`` (N, E), blended with ``x`` by a per-sample gate:

        vals[n] = max_{d in D} <x[n], d>                      (kernels.max_sim: no N x M matrix)
        alpha[n] = beta * exp(-gamma * (1 - vals[n]))          gate="exp" (the method)
                 = 1 if 1 - vals[n] <= threshold else 0         gate="dirac" (ablation: a hard mask, beta/gamma unused)
                 = 1                                            gate="none" (ablation: no gate, no bank needed)
        out[n]  = normalize(alpha[n] * normalize(g(x[n])) + (1 - alpha[n]) * x[n])   blend="normalized" (default)
                = normalize(alpha[n] * g(x[n]) + (1 - alpha[n]) * x[n])              blend="paper" (eq. 4)

    ``blend="normalized"`` (the default) puts g(x) back on the sphere before the blend, so alpha weighs two unit
    vectors. ``blend="paper"`` is eq. 4 as printed, the blend of g(x) itself (its norm then shifts the weight
    between the two); the outer normalize is CLIP's own cosine, not part of the blend. With W = I, b = 0 both give x.

    ``init="identity"`` starts at W = I, b = 0 (the output is then x for any gate); ``init="random"`` (ablation)
    draws W and b from U(-1/sqrt(E), 1/sqrt(E)) (``nn.Linear``'s default) with ``generator``. ``gate="none"`` with
    ``init="random"`` is the paper's "linear" ablation. ``tie_to(other)`` shares W and b with another head (the
    shared-map ablation g_I = g_T); each head keeps its own bank.

    ``D`` (M, E) is the bank of (normalized) training features or cluster centres: pass it to ``forward`` or store
    it once with ``set_bank`` (kept as a buffer, saved by ``leanclip.checkpoint.save_trainable``).
    ``reg()`` is the regulariser the loss weights by lambda, always measured from (I, 0):
    ``reg="mse"``: mean((W - I)^2) + mean(b^2), the authors' code (``F.mse_loss``; their lambda 1e3 is a gentle pull
    at this scale); ``reg="norm"``: ||W - I||_F + ||b||_2, the paper's formula (subgradient 0 at the identity)."""

    def __init__(self, dim: int, beta: float = 0.5, gamma: float = 20.0, *, gate: str = "exp",
                 threshold: float = 0.1, init: str = "identity", reg: str = "mse", blend: str = "normalized",
                 generator: torch.Generator | None = None):
        super().__init__()
        dim = _check_dim("dim", dim)
        self.dim = dim
        self.beta, self.gamma = check_llu_options(beta, gamma, gate, threshold, init, reg, blend=blend)
        self.gate, self.threshold, self.init, self.reg_form = gate, float(threshold), init, reg
        self.blend = blend
        self.tied = False
        if init == "identity":
            w, b = torch.eye(dim), torch.zeros(dim)
        else:
            bound = 1.0 / math.sqrt(dim)
            w = torch.empty(dim, dim).uniform_(-bound, bound, generator=generator)
            b = torch.empty(dim).uniform_(-bound, bound, generator=generator)
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(b)
        self.register_buffer("bank", None)

    def extra_repr(self) -> str:
        gate = {"exp": f"beta={self.beta}, gamma={self.gamma}", "dirac": f"dirac threshold={self.threshold}",
                "none": "no gate"}[self.gate]
        return (f"dim={self.dim}, {gate}, init={self.init}, reg={self.reg_form}, blend={self.blend}"
                + (", tied" if self.tied else ""))

    def tie_to(self, other: "LLUHead") -> "LLUHead":
        """Share ``other``'s W and b (one set of parameters, counted and saved once under ``other``'s name)."""
        if not isinstance(other, LLUHead) or other.dim != self.dim:
            raise ValueError("tie_to needs an LLUHead of the same dim")
        self.weight, self.bias = other.weight, other.bias
        self.tied = True
        return self

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
        """Per-sample gate (N,) of ``self.gate`` (see the class docstring)."""
        if self.gate == "none":
            if x.dim() != 2 or x.shape[1] != self.dim:
                raise ValueError(f"x must have shape (N, {self.dim}), got {tuple(x.shape)}")
            return torch.ones(x.shape[0], device=x.device, dtype=torch.float32)
        d = self._bank(d, x)
        vals, _ = kernels.max_sim(x, d.to(x.dtype))
        dist = (1.0 - vals.float()).clamp_min(0.0)  # a cosine distance; below 0 only by rounding
        if self.gate == "dirac":
            return (dist <= self.threshold).float()
        return self.beta * torch.exp(-self.gamma * dist)

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
        g = F.linear(xf, self.weight, self.bias)
        if self.blend == "normalized":
            g = F.normalize(g, dim=-1)
        return F.normalize(a * g + (1.0 - a) * xf, dim=-1)

    def reg(self) -> torch.Tensor:
        """The regulariser of ``reg_form`` (class docstring): distance of (W, b) from (I, 0)."""
        eye = torch.eye(self.dim, device=self.weight.device, dtype=self.weight.dtype)
        if self.reg_form == "norm":
            return torch.linalg.matrix_norm(self.weight - eye) + torch.linalg.vector_norm(self.bias)
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
