"""A training step's peak memory, predicted, and the recompute plan that fits a budget for it.

What a step adds on top of the weights, the optimizer state and its inputs (``bench step`` measures the same thing:
peak RSS on CPU, ``max_memory_allocated`` on CUDA):

    peak = gradients of the trainable parameters
         + max over towers T of [ saved(other tower)
                                  + max over T's blocks i, from the top (the backward's order), of
                                    ( saved(T's blocks 0..i) + saved(T outside its blocks) + transient_i ) ]

``saved`` is what the forward keeps for backward (``leanclip.saved_bytes.estimate_saved_bytes``, per tower and policy).
When the backward reaches block i, the blocks above it have freed what they kept, and block i holds a transient:
its recomputed activations and their gradients over its rows (the batch, or one chunk of ``block`` over chunks),
plus the gradient entering and the one leaving the block over the whole batch:

    transient_i = TRANSIENT_UNITS[policy_i] * rows_i * L * D * elem + GRADIENT_UNITS * B * L * D * elem

A tower's geometry (tokens, width, its blocks' activation units per policy) comes from ``leanclip.geometry``, the
reader ``estimate_saved_bytes`` uses too; for timm and Hugging Face blocks (SwiGLU, quick-GELU, sub-LayerNorms,
rotary q/k) the transient is scaled by the block's units without recompute against the open_clip block's 10.
The constants come from CPU measurements (``leanclip bench step --isolate``, glibc's mmap threshold lowered so RSS
follows live tensors; ViT-B-16 image tower, LayerNorm tuning, batch 16, fp32); docs/MEASURED.md lists the
estimate beside the measured peak for ViT-B-16 and ViT-L-14. A budget is a step peak: bytes, or a fraction of plain
open_clip's predicted peak for the same model and batch.

The planner (``plan_recompute``) looks at plans of one shape: the first k blocks of every tower (the same fraction of
each tower) under a heavier policy, the blocks above under a lighter one, and for ``block`` a chunk of samples. Blocks
are alike, so which blocks carry the heavier policy only matters for the peak: the bottom ones, whose transient comes
after the blocks above have freed what they kept. It returns the plan with the least recompute work whose predicted
peak fits, so a budget plain open_clip's step fits always gets the fastest lean plan (``none``: no recompute). Work
is counted in multiply-adds per token, in units of D^2: a block's step (forward, and a backward with input gradients
only: frozen weights need no weight gradient) is 2 * (24 + 4L/D); recompute adds ``mlp`` 8 (c_fc), ``mlp+qkv`` 14
(c_fc and the qkv projection), ``block`` 16 + 4L/D (everything but the frozen c_proj, which recompute skips).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from leanclip import geometry as _geometry
from leanclip import lean as _lean
from leanclip.saved_bytes import estimate_saved_bytes
from leanclip.select import trainable_parameters
from leanclip.utils import parse_bytes

# Transient of a block's backward in units of rows * L * D * elem, per policy; and the gradients in and out (batch).
TRANSIENT_UNITS = {"none": 6.0, "mlp": 8.0, "mlp+qkv": 10.0, "block": 15.0}
GRADIENT_UNITS = 2.0
# Recompute work per token per block (units of D^2; ``_L_D`` stands for the attention's 4 L / D).
_EXTRA_WORK = {"none": (0.0, 0.0), "mlp": (8.0, 0.0), "mlp+qkv": (14.0, 0.0), "block": (16.0, 1.0)}


@dataclass(frozen=True)
class TowerShape:
    """What the estimate needs of a tower (``leanclip.geometry`` reads it): its lean blocks (bottom first), tokens per
    sample, width, element size, the batch it runs at in a step (images, or class prompts for the text tower), the
    scale of its blocks' transients against the open_clip block the constants were measured on, and whether its
    last block runs at the pooled rows only."""
    name: str
    blocks: tuple
    length: int
    width: int
    elem: int
    batch: int
    scale: float = 1.0
    one_row: bool = False

    def unit(self, rows: int) -> float:
        return float(rows) * self.length * self.width * self.elem


@dataclass(frozen=True)
class RecomputePlan:
    """Per tower, the policy of each block (bottom first), and the chunk of the ``block`` policy (None: the batch)."""
    policies: dict
    chunk: int | None = None
    peak: int = 0
    work: float = 0.0
    notes: dict = field(default_factory=dict)

    def describe(self) -> str:
        parts = []
        for tower, pols in self.policies.items():
            counts = {p: pols.count(p) for p in _lean.POLICIES if p in pols}
            parts.append(f"{tower}: " + ", ".join(
                f"{p}{'/' + str(self.chunk) if p == 'block' and self.chunk else ''} x{n}" for p, n in counts.items()))
        return "; ".join(parts) if parts else "no lean blocks"

    def as_record(self) -> dict:
        return {"policies": {t: list(p) for t, p in self.policies.items()}, "chunk": self.chunk,
                "predicted_peak_bytes": int(self.peak), "summary": self.describe(), **self.notes}

# The last block of a tower that reads one row per sample (``forward_rows``) recomputes far less: k and v for every
# token and their gradients, the rest on B rows.
ROWS_TRANSIENT_UNITS = {"none": 1.0, "mlp": 1.0, "mlp+qkv": 6.0, "block": 6.0}


def _with_backward(shapes, saved_none: dict) -> list:
    """The towers a step back-propagates through (they keep something for backward without recompute)."""
    return [s for s in shapes if saved_none[s.name] > 0]


def tower_shapes(model: nn.Module, batch_size: int, *, text_batch_size: int | None = None,
                 text_len: int | None = None, dtype: torch.dtype | None = None,
                 lean_only: bool = True) -> list[TowerShape]:
    """The towers of ``model`` as the estimate sees them (image first; open_clip, timm and Hugging Face towers, see
    ``leanclip.geometry``), with their lean blocks (``lean_only``) or all their blocks; a tower without such blocks,
    or that runs at batch 0, is left out (nothing of it is recomputed)."""
    shapes = []
    for g in _geometry.towers(model, dtype=dtype, text_len=text_len):
        blocks = tuple(b for b in g.blocks if not lean_only or _geometry.is_lean_block(b))
        batch = batch_size if g.name == "image" or text_batch_size is None else text_batch_size
        if blocks and batch:
            shapes.append(TowerShape(g.name, blocks, g.tokens, g.width, g.elem, batch, g.transient_scale(),
                                     g.rows_last))
    return shapes


def _saved_by_tower(model, policy, shapes, *, text_len, dtype) -> dict:
    """Bytes each tower's forward keeps under ``policy`` for every block (``estimate_saved_bytes``, one tower at a
    time: the other's batch set to 0)."""
    out = {}
    for s in shapes:
        image_batch, text_batch = (s.batch, 0) if s.name == "image" else (0, s.batch)
        out[s.name] = estimate_saved_bytes(model, policy, image_batch, text_batch_size=text_batch,
                                                 text_len=text_len, dtype=dtype)
    return out


def _tower_peak(shape: TowerShape, policies, chunk, saved: dict) -> float:
    """saved(blocks 0..i) + transient_i, largest over the blocks, walked from the top as the backward does. A
    tower's saved bytes under one policy are shared evenly by its blocks (what the blocks keep outside them, the
    final LayerNorm's input and the features, is small beside them)."""
    n = len(shape.blocks)
    per_block = [saved[p][shape.name] / n for p in policies]
    remaining = sum(per_block)
    worst = 0.0
    for i in reversed(range(n)):
        p = policies[i]
        rows = chunk if p == "block" and chunk is not None and chunk < shape.batch else shape.batch
        units = ROWS_TRANSIENT_UNITS[p] if (i == n - 1 and shape.one_row) else TRANSIENT_UNITS[p]
        transient = units * shape.scale * shape.unit(rows) + GRADIENT_UNITS * shape.unit(shape.batch)
        worst = max(worst, remaining + transient)
        remaining -= per_block[i]
    return worst


def _trainable_bytes(model: nn.Module) -> int:
    """The trainable parameters' gradients, made during the backward."""
    return sum(p.numel() * p.element_size() for _, p in trainable_parameters(model))


def _peak(grads: int, shapes, policies: dict, chunk, saved: dict) -> int:
    """The step peak of a plan: ``grads`` (``_trainable_bytes``, computed once by the caller: the planner weighs
    thousands of plans) plus the worst tower's peak beside what the other towers keep."""
    totals = {s.name: sum(saved[p][s.name] for p in policies[s.name]) / len(s.blocks) for s in shapes}
    worst = 0.0
    for s in shapes:
        others = sum(v for k, v in totals.items() if k != s.name)
        worst = max(worst, others + _tower_peak(s, policies[s.name], chunk, saved))
    return int(worst + grads)


def _work(shapes, policies: dict) -> float:
    """Recompute work of a plan, multiply-adds in units of D^2 summed over tokens and blocks."""
    total = 0.0
    for s in shapes:
        l_d = 4.0 * s.length / s.width
        for p in policies[s.name]:
            gemm, attn = _EXTRA_WORK[p]
            total += (gemm + attn * l_d) * s.batch * s.length * s.width ** 2
    return total


def plain_peak(model: nn.Module, batch_size: int, **kw) -> int:
    """Predicted step peak of ``model`` with open_clip's own modules (call it before the lean swap): every block
    keeps what eager PyTorch keeps, the text tower runs its full context, and no block runs at the pooled rows."""
    shapes = tower_shapes(model, batch_size, lean_only=False, **kw)
    if not shapes:
        return _trainable_bytes(model)
    saved = {"none": _saved_by_tower(model, "none", shapes, text_len=kw.get("text_len"), dtype=kw.get("dtype"))}
    shapes = _with_backward(shapes, saved["none"])
    policies = {s.name: ["none"] * len(s.blocks) for s in shapes}
    return _peak(_trainable_bytes(model), shapes, policies, None, saved)


def predict_peak(model: nn.Module, batch_size: int, policy: str = "none", chunk: int | None = None, *,
                 lean_only: bool = True, **kw) -> int:
    """Predicted step peak of a lean ``model`` with every lean block under ``policy`` (and ``chunk``).
    ``lean_only=False`` counts every block of a plain model: ``policy="block"`` then stands for the tower's own
    gradient checkpointing (open_clip's / timm's ``set_grad_checkpointing``, ``transformers``'
    ``gradient_checkpointing_enable``: each block keeps its input and is recomputed whole in the backward)."""
    _lean.check_policy(policy)
    _lean.check_chunk(policy, chunk)
    shapes = tower_shapes(model, batch_size, lean_only=lean_only, **kw)
    return _predict(model, shapes, {s.name: [policy] * len(s.blocks) for s in shapes}, chunk, kw)


def current_peak(model: nn.Module, batch_size: int, **kw) -> int:
    """Predicted step peak of a lean ``model`` under the policies (and chunk) its blocks hold now: one policy, or a
    plan ``apply_plan`` set."""
    shapes = tower_shapes(model, batch_size, **kw)
    policies = {s.name: [b.leanclip_recompute for b in s.blocks] for s in shapes}
    chunks = {b.leanclip_chunk for s in shapes for b in s.blocks if b.leanclip_recompute == "block"} - {None}
    return _predict(model, shapes, policies, min(chunks) if chunks else None, kw)


def _predict(model, shapes, policies: dict, chunk, kw) -> int:
    if not shapes:
        return _trainable_bytes(model)
    used = {p for pols in policies.values() for p in pols} | {"none"}
    saved = {p: _saved_by_tower(model, p, shapes, text_len=kw.get("text_len"), dtype=kw.get("dtype")) for p in used}
    shapes = _with_backward(shapes, saved["none"])
    return _peak(_trainable_bytes(model), shapes, {s.name: policies[s.name] for s in shapes}, chunk, saved)


def _chunks(batch: int) -> list:
    """Chunk sizes worth trying for ``block``: the whole batch, then halves down to one sample."""
    out, c = [None], batch
    while c > 1:
        c = (c + 1) // 2
        out.append(c)
    return out


def _candidates(shapes, batch: int):
    """(policies per tower, chunk) for every plan shape the planner weighs."""
    for light_i, light in enumerate(_lean.POLICIES):
        for heavy in _lean.POLICIES[light_i:]:
            steps = max(len(s.blocks) for s in shapes) if heavy != light else 0
            for k in range(steps + 1):
                policies = {}
                for s in shapes:
                    n_heavy = round(k * len(s.blocks) / steps) if steps else len(s.blocks)
                    policies[s.name] = [heavy] * n_heavy + [light] * (len(s.blocks) - n_heavy)
                for chunk in (_chunks(batch) if "block" in (light, heavy) else [None]):
                    yield policies, chunk


def plan_recompute(model: nn.Module, budget: int, batch_size: int, **kw) -> RecomputePlan:
    """The plan with the least recompute work whose predicted step peak fits ``budget`` bytes (ties: the larger
    chunk); ValueError naming the smallest prediction when none does."""
    shapes = tower_shapes(model, batch_size, **kw)
    if not shapes:
        raise ValueError("a memory budget needs lean blocks to plan for; this model has none")
    known = {id(b) for s in tower_shapes(model, 1, text_batch_size=1) for b in s.blocks}
    other = next((m for m in model.modules() if _geometry.is_lean_block(m) and id(m) not in known), None)
    if other is not None:  # a planner that left a tower at "none" unasked would break the budget silently
        raise ValueError(f"memory_budget: the step-peak estimate covers open_clip, timm and Hugging Face towers, not "
                         f"{type(other).__module__}.{type(other).__qualname__} blocks; give a recompute policy")
    saved = {p: _saved_by_tower(model, p, shapes, text_len=kw.get("text_len"), dtype=kw.get("dtype"))
             for p in _lean.POLICIES}
    shapes = _with_backward(shapes, saved["none"])
    if not shapes:  # nothing is back-propagated through a lean tower: nothing to recompute
        return RecomputePlan({}, None, _trainable_bytes(model), 0.0)
    best, smallest, grads = None, None, _trainable_bytes(model)
    for policies, chunk in _candidates(shapes, batch_size):
        peak = _peak(grads, shapes, policies, chunk, saved)
        smallest = peak if smallest is None else min(smallest, peak)
        if peak > budget:
            continue
        key = (_work(shapes, policies), -(chunk or batch_size), peak)
        if best is None or key < best[0]:
            best = (key, policies, chunk, peak)
    if best is None:
        raise ValueError(f"memory budget {mib(budget)} is below the smallest predicted step peak for batch "
                         f"{batch_size}: {mib(smallest)} (every block recomputed over one-sample chunks); "
                         f"lower the batch size or raise the budget")
    (work, _, _), policies, chunk, peak = best
    return RecomputePlan({k: tuple(v) for k, v in policies.items()}, chunk, peak, work)


def plan_work(model: nn.Module, plan: RecomputePlan, batch_size: int, **kw) -> float:
    """The recompute work ``plan`` costs (the planner's measure of time, see the module docstring)."""
    shapes = [s for s in tower_shapes(model, batch_size, **kw) if s.name in plan.policies]
    return _work(shapes, {k: list(v) for k, v in plan.policies.items()})


def apply_plan(model: nn.Module, plan: RecomputePlan) -> nn.Module:
    """Set each lean block's policy (and the ``block`` chunk) as ``plan`` says. Returns ``model``."""
    by_tower = {s.name: s.blocks for s in tower_shapes(model, 1)}
    for tower, policies in plan.policies.items():
        for blk, p in zip(by_tower[tower], policies):
            blk.leanclip_recompute = p
            blk.leanclip_chunk = plan.chunk if p == "block" else None
    model.leanclip_recompute = "auto"
    model.leanclip_chunk = plan.chunk
    return model


def resolve_budget(budget, plain: int, name: str = "memory_budget") -> int:
    """A budget in bytes: an int (bytes), a string with a unit (``"12GiB"``, ``"800MB"``), or a fraction in (0, 1] (a
    float, or a string without a unit such as ``"0.2"``):
    that fraction of ``plain`` (plain open_clip's predicted step peak). ``name``: the argument errors name."""
    if isinstance(budget, bool):
        raise ValueError(f"{name} must be bytes (int or e.g. '12GiB') or a fraction in (0, 1], got {budget!r}")
    if isinstance(budget, str):  # the command line's --memory-budget: "0.2" (a fraction) or "12GiB"
        try:
            number = float(budget)
        except ValueError:
            return parse_bytes(budget, name)
        if not (math.isfinite(number) and 0 < number <= 1):
            raise ValueError(f"{name}: a number without a unit is a fraction of plain's step peak in (0, 1], got "
                             f"{budget!r}; give bytes with a unit, e.g. 12GiB or 800MB")
        budget = number
    if isinstance(budget, float):
        if not (math.isfinite(budget) and 0 < budget <= 1):
            raise ValueError(f"{name} as a float is a fraction of plain's step peak in (0, 1], got {budget!r}")
        return int(budget * plain)
    if isinstance(budget, int) and budget > 0:
        return budget
    raise ValueError(f"{name} must be bytes (int or e.g. '12GiB') or a fraction in (0, 1], got {budget!r}")


def mib(n) -> str:
    return f"{n / 2**20:,.1f} MiB"
