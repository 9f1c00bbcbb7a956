"""``leanclip bench fit --estimate``: the step-peak estimator's largest batch per mode under memory caps, for models
too big to run where the command runs. Every number here is an estimate (``leanclip.budget``), never a measurement.

The model is built on the meta device (shapes, no memory) with random-init code paths, prepared as ``bench fit``
prepares it (the method, and for lean modes the lean modules; under bf16 the frozen weights of lean modes in bf16
as ``bench step`` keeps them), and per mode and cap the largest batch whose predicted total fits:

    total(B) = resident + step peak(B)
    resident = the model's parameters + the optimizer state (the benchmark's SGD momentum: one copy of the
               trainable parameters) + the step's inputs (B fp32 images, and fixed class text features)
    step peak: plain       ``budget.plain_peak`` (open_clip's / timm's / transformers' own modules)
               plain+gc    ``budget.predict_peak(..., "block", lean_only=False)``: the tower's own gradient
                           checkpointing keeps each block's input and recomputes the block whole
               lean:fit    the plan ``budget.plan_recompute`` makes for what the cap leaves (per block a policy, a
                           chunk for ``block``): the batch fits when a plan is predicted to fit

On CUDA ``max_memory_allocated`` is what the caps compare with; the CUDA context and the allocator's fragmentation
are not in the estimate. The estimate has come within 15% of measured CPU peaks (docs/MEASURED.md).
"""
from __future__ import annotations

import time

import torch

from leanclip import budget
from leanclip.bench.common import machine
from leanclip.bench.step import text_batch, create_random
from leanclip.methods import prepare
from leanclip.select import trainable_parameters

MODES = ("plain", "plain+gc", "lean:fit")
DEFAULT_CAPS = ("16GiB", "24GiB", "40GiB")
LABEL = ("estimate: leanclip.budget's predicted step peak plus the resident model, optimizer state and inputs; "
         "nothing was run")


def _model(model_name, method, lean: bool, precision: str):
    """The model of a mode on the meta device, prepared (no memory is allocated)."""
    model = create_random(model_name, device="meta")
    frozen = torch.bfloat16 if lean and precision == "bf16" else None
    prepare(model, method, lean=lean, recompute="none", classnames=["a", "b"], model_name=model_name,
            frozen_dtype=frozen)
    return model.train()


def resident_bytes(model, batch: int, n_text: int) -> int:
    """What is held before the step: every parameter, one optimizer-state copy of the trainable ones (SGD
    momentum), ``batch`` fp32 images and ``n_text`` fixed fp32 class text features."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(p.numel() * p.element_size() for _, p in trainable_parameters(model))
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    return params + state + batch * 3 * size * size * 4 + n_text * 4096 * 4


def _predicted(model, mode: str, batch: int, cap: int, kw: dict):
    """(predicted total bytes or None when no lean plan fits, the plan's summary for ``lean:fit``)."""
    resident = resident_bytes(model, batch, kw["text_batch_size"] or 0)
    if mode == "plain":
        return resident + budget.plain_peak(model, batch, **kw), None
    if mode == "plain+gc":
        return resident + budget.predict_peak(model, batch, "block", lean_only=False, **kw), None
    try:
        plan = budget.plan_recompute(model, cap - resident, batch, **kw)
    except ValueError:
        return None, None
    return resident + plan.peak, plan.describe()


def largest_batch(fits, max_batch: int) -> int:
    """The largest batch in [1, max_batch] with ``fits(batch)`` (which holds up to some batch and not above it):
    doubling, then bisection. 0 when batch 1 does not fit."""
    lo, hi = 0, 1
    while hi <= max_batch and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, max_batch + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def estimate(model_name, method, caps: dict, *, modes=MODES, n_classes=100, precision="bf16", scope="image",
             max_batch=4096) -> dict:
    """Per mode and cap (``{"16GiB": bytes, ...}``): the estimator's largest batch, its predicted total, and for
    ``lean:fit`` the plan. ``scope="image"``: the image tower alone trains against fixed class text features."""
    kw = {"text_batch_size": text_batch(n_classes, scope), "dtype": torch.bfloat16 if precision == "bf16" else None}
    t0 = time.perf_counter()
    built = {}
    out = {}
    for mode in modes:
        lean = mode.startswith("lean")
        if lean not in built:
            try:
                built[lean] = _model(model_name, method, lean, precision)
            except ValueError as e:  # the lean modules do not cover the model (a block class named)
                built[lean] = str(e).splitlines()[0][:300]
        model = built[lean]
        if isinstance(model, str):
            out[mode] = {"not_covered": model}
            continue
        out[mode] = {}
        for text, cap in caps.items():
            b = largest_batch(lambda n: (_predicted(model, mode, n, cap, kw)[0] or cap + 1) <= cap, max_batch)
            total, plan = _predicted(model, mode, b, cap, kw) if b else (None, None)
            out[mode][text] = {"largest_batch": b, "predicted_total_bytes": total, "plan": plan,
                               "at_least": b == max_batch}
    return {"model": model_name, "method": method, "precision": precision, "scope": scope, "n_classes": n_classes,
            "kind": "estimate", "label": LABEL, "caps": caps, "results": out, "machine": machine(),
            "weights": "random init on the meta device (no memory)", "seconds": time.perf_counter() - t0}


def summarize(res: dict) -> str:
    caps = list(res["caps"])
    lines = [f"ESTIMATES (nothing was run): {res['model']} {res['method']}, {res['precision']}, scope {res['scope']}",
             f"{res['label']}", "", "| mode | " + " | ".join(f"largest batch at {c}" for c in caps) + " |",
             "|---|" + "---:|" * len(caps)]
    for mode, per_cap in res["results"].items():
        if "not_covered" in per_cap:
            lines.append(f"| {mode} | " + " | ".join("not covered" for _ in caps) + " |")
            continue
        cells = [f"{r['largest_batch']}{'+' if r['at_least'] else ''} (est.)" for r in per_cap.values()]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    lean = res["results"].get("lean:fit", {})
    notes = [f"- lean:fit: {lean['not_covered']}"] if "not_covered" in lean else [
        f"- lean:fit at {c}: {r['plan']}" for c, r in lean.items() if r["plan"]]
    return "\n".join(lines + [""] + notes)
