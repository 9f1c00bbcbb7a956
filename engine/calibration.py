"""The recompute plan checked against the step it plans for: a short measured calibration of the step-peak estimate.

``prepare(..., recompute="auto", memory_budget=X)`` chooses a plan from ``leanclip.budget``'s estimate, whose
constants were measured on CPU. On CUDA the runtime allocates differently (the caching allocator's block rounding,
cuBLAS workspaces, another attention kernel), so the first optimizer step of a run measures its own peak, the bytes
the step adds on top of what was resident when it began (``max_memory_allocated`` after
``reset_peak_memory_stats``). Where that peak exceeds the budget, the estimate is scaled by measured / predicted and
the planner chooses again for the rest of the run:

    budget' = budget * predicted / measured

Recompute changes where activations live and how long a step takes, never the gradients, so a run that was
re-planned after its first step is the same run, step for step, as one planned right the first time. The check and
its outcome are recorded in the plan (``recompute_plan["calibration"]``), which ``result.json`` carries.

On CPU nothing is measured: RSS inside a process that has already run steps follows the allocator's arenas, not the
live tensors (``bench step --isolate`` measures CPU peaks in clean processes instead), and the estimate's constants
come from such measurements.
"""
from __future__ import annotations

import torch
from torch import nn

from leanclip import budget as _budget
from leanclip.select import notice


def _plan_record(model: nn.Module) -> dict | None:
    """The recompute plan ``prepare`` recorded for a memory budget, or None."""
    info = getattr(model, "leanclip_info", None) or {}
    plan = info.get("options", {}).get("recompute_plan")
    return plan if plan and plan.get("budget_bytes") and plan.get("predicted_peak_bytes") else None


def calibrate(model: nn.Module, measured_peak: int) -> dict:
    """Hold the model's recompute plan against ``measured_peak`` (bytes one step added on top of what was resident)
    and re-plan for the scaled budget where the measurement exceeds the budget. Returns the calibration record (also
    stored in the plan's record); ValueError where even the scaled plan cannot exist (no plan fits: the batch does
    not fit the budget on this device)."""
    plan = _plan_record(model)
    if plan is None:
        raise ValueError("calibrate: the model has no recompute plan for a memory budget "
                         "(prepare(..., recompute='auto', memory_budget=...))")
    opts = model.leanclip_info["options"]
    predicted, limit = int(plan["predicted_peak_bytes"]), int(plan["budget_bytes"])
    record = {"measured_peak_bytes": int(measured_peak), "predicted_peak_bytes": predicted,
              "ratio": measured_peak / predicted, "replanned": False}
    if measured_peak <= limit:
        plan["calibration"] = record
        return record
    scaled = int(limit * predicted / measured_peak)
    sizes = {k: opts.get(k) for k in ("text_batch_size", "text_len")}
    try:
        new = _budget.plan_recompute(model, scaled, opts["batch_size"], **sizes)
    except ValueError as e:
        raise ValueError(f"memory budget {_budget.mib(limit)}: the first step measured {_budget.mib(measured_peak)} "
                         f"against a predicted {_budget.mib(predicted)}, and scaled by that no plan fits: {e}") from None
    _budget.apply_plan(model, new)
    record.update(replanned=True, scaled_budget_bytes=scaled, previous=plan["summary"])
    opts["recompute_plan"] = {**new.as_record(), "budget_bytes": limit,
                              "plain_peak_bytes": plan.get("plain_peak_bytes"), "calibration": record}
    notice(f"memory budget {_budget.mib(limit)}: the first step peaked at {_budget.mib(measured_peak)} "
           f"({record['ratio']:.2f}x the estimate); recompute re-planned for the rest of the run: {new.describe()}")
    return record


def _measures(device: torch.device) -> bool:
    return device.type == "cuda"


def _resident(device: torch.device) -> int:
    """What is allocated as a step begins; the peak counter starts over."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device)


class FirstStepCheck:
    """Measures the first optimizer step of a run on CUDA and calls :func:`calibrate` with it; inert elsewhere, on a
    model without a budget plan, and after the first step. ``begin()`` before the step's first micro-batch, ``end()``
    once its backward is done (before the update: the optimizer's state is not the activations' peak)."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.active = _measures(device) and _plan_record(model) is not None
        self.resident = 0

    def begin(self) -> None:
        if self.active:
            self.resident = _resident(self.device)

    def end(self) -> dict | None:
        if not self.active:
            return None
        self.active = False
        return calibrate(self.model, _peak(self.device) - self.resident)
