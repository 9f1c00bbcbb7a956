"""LoRA on the transformer blocks of both towers (CLIP-LoRA, Zanella & Ben Ayed 2024), and ``merge`` for export.

``prepare(model, "lora", rank=2, alpha=1, dropout=0.25, targets=("q", "k", "v"), tower="both")`` attaches to every
block of the selected towers a ``LoRA`` module (``<block>.lora``) holding one low-rank pair per target::

    y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T        A: (rank, in), B: (out, rank)

targets ⊆ {q, k, v (slices of attn.in_proj_weight), out (attn.out_proj), fc (mlp.c_fc), proj (mlp.c_proj)}; on timm
blocks (SigLIP, EVA02, PE-Core) q, k, v are the row thirds of a fused ``attn.qkv`` or the separate ``attn.q_proj`` /
``k_proj`` / ``v_proj``, out ``attn.proj``, fc ``mlp.fc1`` (SwiGLU: ``fc1_g`` | ``fc1_x``, one pair over both),
proj ``mlp.fc2`` (``projection_slices``). A is
kaiming-uniform (a=sqrt(5), as in CLIP-LoRA and Hugging Face peft), B is zero, so the prepared model computes
exactly what the unprepared one did. Dropout acts on the LoRA input only, in training mode; q, k and v each draw
their own mask (CLIP-LoRA's separate q/k/v layers). Parameters are named
``visual.transformer.resblocks.<i>.lora.q.A`` / ``...lora.q.B`` (text: ``transformer.resblocks.<i>.lora...``).

Trainable count: per target a d x d projection adds rank * (in + out); with the defaults (three d x d targets,
rank 2) that is 12 d per block. ViT-B-16: image 12 blocks x 12 x 768 = 110,592, text 12 x 12 x 512 = 73,728;
184,320 in all.

The frozen weights stay on the lean path: ``LoRA`` is an ``leanclip.lean.ProjectionDelta``, so the lean block computes
``kernels.frozen_linear(x, W, b)`` (no weight gradient, bf16 frozen weights allowed) plus the low-rank term, inside
the same branch functions, which every recompute policy replays exactly. timm's plain blocks apply the same terms
through forward hooks on their projections (``leanclip.delta_hooks``), so ``lean=False`` on a timm tower runs timm's
own modules (its gradient checkpointing, ``torch.compile``) with equal outputs and gradients. open_clip's plain
blocks cannot (``nn.MultiheadAttention`` reads ``in_proj_weight`` itself): there ``lora`` needs the lean modules, and
``lean=False`` is a ValueError naming the blocks.

``merge(model)`` returns a copy with ``W += (alpha / rank) B A`` folded into the frozen weights, the LoRA modules
and the lean modules removed: a plain open_clip model computing the same outputs (for export). Checkpoints stay
trainable-only (``save_trainable`` writes the A/B pairs and whatever else is trained, e.g. LayerNorms in
``ln+lora``).

On a ``transformers`` CLIP / SigLIP (``leanclip.models.transformers``) the targets are its separate projections
(``q_proj`` / ``k_proj`` / ``v_proj``, ``out_proj``, ``fc1``, ``fc2``) and the pairs live in ``leanclip.lora_linear``
(with or without the lean layers); ``merge`` then gives back the plain ``transformers`` model. An open_clip Hugging
Face text tower (``leanclip.models.hf_text``) takes its pairs the same way: BERT / RoBERTa / XLM-RoBERTa's
``attention.self.query`` / ``key`` / ``value``, ``attention.output.dense``, ``intermediate.dense``,
``output.dense``; mT5's ``SelfAttention.q`` / ``k`` / ``v`` / ``o`` and ``DenseReluDense.wo`` (its gated ``fc`` has
no single projection: refused), on the lean layers or ``transformers``' own.

Re-preparing with ``lora`` replaces earlier LoRA modules; ``prepare`` with another method leaves them in place,
frozen (``leanclip.lifecycle.strip(model, lora.ADDED)`` removes them).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from leanclip import lean as _lean
from leanclip.lifecycle import Added, strip
from leanclip.models import hf_text as _hftext
from leanclip.models import timm as _timm
from leanclip import lora_linear
from leanclip.models import transformers as _hf
from leanclip.models.openclip import tower_blocks
from leanclip.methods._options import Tower, tower_option
from leanclip.options import OptionRange, option
from leanclip.registry import MethodTraits, register_method
from leanclip.select import check_tower, require_block_tower

__all__ = ["LowRank", "LoRA", "merge", "ADDED", "lora_modules", "TARGETS"]

TARGETS = ("q", "k", "v", "out", "fc", "proj")
_IN_PROJ = ("q", "k", "v")  # output slices 0:d, d:2d, 2d:3d of attn.in_proj_weight
_SITE = {"out": "out_proj", "fc": "c_fc", "proj": "c_proj"}


class LowRank(nn.Module):
    """``x -> x A^T B^T`` with A (rank, in) kaiming-uniform and B (out, rank) zero."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B)

    def weight_delta(self) -> torch.Tensor:
        return self.B @ self.A


def projection_slices(block: nn.Module) -> dict:
    """{target: [(frozen weight or row slice of it, lo, hi), ...]}: where rows lo:hi of a target's update ``B A``
    fold in. open_clip blocks: q / k / v are the row thirds of ``attn.in_proj_weight``, out / fc / proj
    ``attn.out_proj`` / ``mlp.c_fc`` / ``mlp.c_proj``; timm blocks: ``leanclip.models.timm.projection_slices``."""
    found = _timm.projection_slices(block)
    if found is not None:
        return found
    d = block.attn.embed_dim
    w = block.attn.in_proj_weight
    out = {t: [(w[i * d:(i + 1) * d], 0, d)] for i, t in enumerate(_IN_PROJ)}
    for t, lin in (("out", block.attn.out_proj), ("fc", block.mlp.c_fc), ("proj", block.mlp.c_proj)):
        out[t] = [(lin.weight, 0, lin.out_features)]
    return out


def target_shapes(block: nn.Module) -> dict[str, tuple[int, int]]:
    """(in, out) features of each target's update on ``block``."""
    return {t: (parts[0][0].shape[1], max(hi for _, _, hi in parts)) for t, parts in projection_slices(block).items()}


class LoRA(_lean.ProjectionDelta):
    """The LoRA pairs of one block (children named after their targets), applied by the lean block. A projection
    the block computes in pieces (q / k / v of a fused qkv, SwiGLU's two input projections) asks for the output
    features [start, stop) it computes, and gets that slice of the term."""

    def __init__(self, block: nn.Module, targets, rank: int, alpha: float, dropout: float):
        super().__init__()
        shapes = target_shapes(block)
        self.targets = tuple(targets)
        self.rank, self.alpha, self.width = rank, float(alpha), shapes["q"][1]
        self.scaling = self.alpha / rank
        self.dropout = nn.Dropout(dropout)
        for t in self.targets:
            self.add_module(t, LowRank(*shapes[t], rank))

    def extra_repr(self) -> str:
        return f"targets={self.targets}, rank={self.rank}, alpha={self.alpha}"

    def sites(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys("in_proj" if t in _IN_PROJ else _SITE[t] for t in self.targets))

    def _term(self, target: str, x: torch.Tensor) -> torch.Tensor:
        pair = self._modules[target]
        return self.scaling * pair(self.dropout(x.to(pair.A.dtype)))

    def delta(self, site: str, x: torch.Tensor, start: int, stop: int):
        if site != "in_proj":
            target = next((t for t, s in _SITE.items() if s == site), None)
            if target not in self._modules:
                return None
            term = self._term(target, x)
            return term if (start, stop) == (0, term.shape[-1]) else term[..., start:stop]
        d = self.width
        parts = [t for i, t in enumerate(_IN_PROJ) if start <= i * d and (i + 1) * d <= stop]
        if not any(t in self._modules for t in parts):
            return None
        out = [self._term(t, x) if t in self._modules else x.new_zeros(*x.shape[:-1], d, dtype=torch.float32)
               for t in parts]
        return out[0] if len(out) == 1 else torch.cat(out, dim=-1)

    @torch.no_grad()
    def fold_into(self, block: nn.Module) -> None:
        """Add ``scaling * B A`` to the block's frozen weights (computed in float32, stored in the weight dtype)."""
        slices = projection_slices(block)
        for t in self.targets:
            delta = self.scaling * self._modules[t].weight_delta().float()
            for w, lo, hi in slices[t]:
                w.copy_((w.float() + delta[lo:hi].to(w.device)).to(w.dtype))


# ----------------------------------------------------------------------------------------------------------- helpers
def lora_modules(model: nn.Module) -> list[tuple[str, LoRA]]:
    """(name, module) of every attached LoRA module."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRA)]


# the LoRA pairs, children of the blocks they adapt: what ``leanclip.lifecycle.strip`` removes (without folding); on a
# ``transformers`` model the pairs live in swapped projections instead (``leanclip.lora_linear.remove_pairs``)
ADDED = Added(owns=lambda m: isinstance(m, LoRA))


def _targets(targets) -> tuple[str, ...]:
    """``targets`` as a tuple: a list/tuple of names or one comma-separated string (``"q,k,v"``)."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not isinstance(targets, (list, tuple)) or not targets:
        raise ValueError(f"targets must be a non-empty subset of {TARGETS}, got {targets!r}")
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        raise ValueError(f"unknown LoRA target(s) {bad}; valid: {', '.join(TARGETS)}")
    if len(set(targets)) != len(targets):
        raise ValueError(f"targets repeat a name: {list(targets)}")
    return tuple(targets)


# rank: above every real CLIP width (ViT-e-14's 1792 is the widest open_clip ships), so a larger one is not low-rank
# anywhere; the check then holds it to the targeted projections' own width. alpha: the pair's output is scaled by
# alpha / rank, and recipes use alpha of 1 to 2 x rank. dropout: a probability of dropping, 1 would drop everything.
LORA_RANGES = {"rank": OptionRange(int, 1, 4096), "alpha": OptionRange(float, 0.0, 1e4, lo_open=True),
               "dropout": OptionRange(float, 0.0, 1.0, hi_open=True)}


def _check_lora(model, rank=2, alpha=1.0, dropout=0.25, targets=_IN_PROJ, tower="both", **_):
    """The options' ranges are declared (``LORA_RANGES``) and checked by ``prepare`` first; here what depends on
    the towers: open_clip blocks the lean modules cover, and a rank no larger than the narrowest targeted
    projection (a pair of rank min(in, out) already spans every update of that projection)."""
    targets = _targets(targets)
    if _hf.is_transformers(model):  # separate q / k / v projections: leanclip.lora_linear
        return lora_linear.check_rank([m for *_, m in _hf.linear_sites(model, check_tower(tower), targets)], rank)
    tower, hf_text = _hftext.split_tower(model, check_tower(tower))
    if hf_text:  # a Hugging Face text tower: its nn.Linear projections (leanclip.lora_linear)
        lora_linear.check_rank([m for *_, m in _hftext.linear_sites(model, targets)], rank)
    if tower is None:
        return
    require_block_tower(model, "lora", tower, "it adds low-rank terms to the blocks' projections")
    widths = {min(min(target_shapes(blk)[t]) for t in targets) for blk in tower_blocks(model, tower)}
    if widths and rank > min(widths):
        raise ValueError(f"method 'lora': rank={rank} exceeds the width {min(widths)} of the targeted projections "
                         f"(a LoRA pair of that rank is no longer low-rank)")


# ----------------------------------------------------------------------------------------------------------- method
@dataclass(frozen=True)
class LoraOptions:
    rank: int = option(2, "the rank of each A·B pair", range=LORA_RANGES["rank"])
    alpha: float = option(1.0, "the pair's output is scaled by alpha / rank", range=LORA_RANGES["alpha"])
    dropout: float = option(0.25, "dropout on the pair's input", range=LORA_RANGES["dropout"])
    targets: tuple[Literal[TARGETS], ...] = option(_IN_PROJ, "the projections of each block that get a pair")
    tower: Tower = tower_option("whose blocks get the pairs")


@register_method("lora", check=_check_lora, options=LoraOptions, traits=MethodTraits(mergeable=True))
def _lora(model, rank=2, alpha=1.0, dropout=0.25, targets=_IN_PROJ, tower="both"):
    """CLIP-LoRA: low-rank A·B (B = 0 at start) on ``targets`` of every block of ``tower``."""
    targets = _targets(targets)
    strip(model, ADDED)
    lora_linear.remove_pairs(model)
    if _hf.is_transformers(model):
        lora_linear.attach([m for *_, m in _hf.linear_sites(model, tower, targets)], rank, alpha, float(dropout))
        return {}
    tower, hf_text = _hftext.split_tower(model, tower)
    if hf_text:
        lora_linear.attach([m for *_, m in _hftext.linear_sites(model, targets)], rank, alpha, float(dropout))
    for blk in tower_blocks(model, tower) if tower is not None else []:
        ref = projection_slices(blk)["q"][0][0]
        blk.add_module("lora", LoRA(blk, targets, rank, alpha, float(dropout)).to(ref.device))
    return {}


def merge(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every LoRA pair folded into its frozen weights (``W += alpha/rank * B A``: q/k/v
    into their ``attn.in_proj_weight`` slices, out/fc/proj into ``attn.out_proj`` / ``mlp.c_fc`` / ``mlp.c_proj``)
    and the LoRA and lean modules removed: a plain open_clip model with the same outputs, for export. ``model`` is
    left unchanged (it can keep training). Modules other methods added stay as they are; ``leanclip_info`` is
    dropped (the copy is no longer a prepared model). Frozen weights that ``prepare(frozen_dtype=...)`` kept in 16
    bits come back in the trainable parameters' dtype, since open_clip's plain modules cannot mix dtypes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"merge needs an nn.Module, got {type(model).__name__}")
    if _hf.is_transformers(model):  # a plain transformers model back
        if not lora_linear.sites(model):
            raise ValueError("merge: the model holds no LoRA modules (prepare it with 'lora' first)")
        return _hf.to_transformers(_lean.remove_lean(lora_linear.merge(model)))
    if not lora_modules(model) and not lora_linear.sites(model):
        raise ValueError("merge: the model holds no LoRA modules (prepare it with 'lora' first)")
    # pairs on plain projections (a Hugging Face text tower) fold in the copy lora_linear.merge makes
    out = lora_linear.merge(model) if lora_linear.sites(model) else copy.deepcopy(model)
    for blk in list(out.modules()):
        held = blk._modules.get("lora")
        if isinstance(held, LoRA):
            held.fold_into(blk)
            del blk._modules["lora"]
    _lean.remove_lean(out)
    if (getattr(model, "leanclip_info", None) or {}).get("options", {}).get("frozen_dtype"):
        dtype = next(p.dtype for _, m in lora_modules(model) for p in m.parameters())
        out.to(dtype)
    out.__dict__.pop("leanclip_info", None)
    return out
