"""``leanclip demo``'s step 4: lean vs plain, side by side in one process. Per method, the step time of the lean model
(the recompute plan ``leanclip.budget`` picks for the demo's memory budget) relative to the same method on open_clip's
plain modules (``prepare(..., lean=False)``; interleaved repetitions, medians), and the bytes autograd saves for one
training step's forward (``leanclip.memory.saved_activation_bytes``). ``cfg`` is the demo's ``DemoConfig``
(``leanclip.cli.demo``).
"""
from __future__ import annotations

import copy
import math
import time
import warnings

import torch

from leanclip.bench.common import interleaved_medians
from leanclip.llu import head_loss_fn
from leanclip.memory import saved_activation_bytes
from leanclip.methods import prepare
from leanclip.registry import method_trainer
from leanclip.select import model_device, trainable_parameters
from leanclip.step import ClassifyStep
from leanclip.trainer import TrainConfig

__all__ = ["lean_options", "measure_method"]


def _train_batch(dataset, batch_size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:batch_size]
    return dataset.images[idx].float(), dataset.labels[idx]


def _step_fns(model, method: str, images, labels, classnames, templates, tokenizer):
    """(forward_loss, train_step) closures of one training step of ``model``: the trainer's own step
    (``leanclip.step.ClassifyStep``), or for a cached-feature method the head step on cached features
    (``leanclip.llu.head_loss_fn``: the heads on features encoded once); the loss terms' weights are the method
    options ``model`` was prepared with."""
    device = model_device(model)
    images, labels = images.to(device), labels.to(device)
    model.train()
    params = [p for _, p in trainable_parameters(model)]
    opt = torch.optim.SGD(params, lr=1e-8, momentum=0.9)  # the step's cost, not its effect, is measured
    if method_trainer(method) == "cached":
        forward_loss = head_loss_fn(model, images, labels, classnames, templates, tokenizer)

        def train_step():
            loss = forward_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss
        return forward_loss, train_step
    step = ClassifyStep(model, classnames, templates, tokenizer, cfg=TrainConfig(), device=device)

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss = step(images, labels)
        opt.step()
        return loss
    return (lambda: step.loss(images, labels)), train_step


def _time_once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def lean_options(cfg, method: str, batch: int, n_prompts: int) -> dict:
    """``prepare``'s memory arguments for the lean side: the budget planner (a cached-feature method runs no tower
    backward: nothing to plan)."""
    if method_trainer(method) == "cached":
        return {}
    return {"recompute": "auto", "memory_budget": cfg.memory_budget, "batch_size": batch, "text_batch_size": n_prompts}


def measure_method(base_model, method: str, task: dict, templates, tokenizer, cfg, batch_seed: int) -> dict:
    """Step-time ratio and saved-activation ratio of ``method``: lean (the plan for ``cfg.memory_budget``) vs open_clip's
    plain modules (``prepare(..., lean=False)``), same batch, same starting weights. Where the plan recomputes, also
    times the lean model without recompute (``lean_no_recompute``), to show what the recompute costs. llu trains its
    heads on cached features, so both sides run the same head step (its ratios are 1 up to timing noise)."""
    names = task["base_names"]
    r = cfg.recipes[method]
    cached = method_trainer(method) == "cached"
    bs = r.batch_size if not cached else cfg.recipes["ln"].batch_size
    images, labels = _train_batch(task["train"], bs, batch_seed)
    sides = {}
    for side in ("lean", "plain", "lean_no_recompute"):
        m = copy.deepcopy(base_model)
        if side == "lean_no_recompute" and (cached or _plan_is_none(sides["lean"]["model"])):
            continue
        kw = dict(r.options)
        if side == "lean":
            kw.update(lean_options(cfg, method, int(images.shape[0]), len(names) * len(templates)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the plan is reported with the results
            prepare(m, method, lean=side != "plain", classnames=names, tokenizer=tokenizer, **kw)
        fwd, step = _step_fns(m, method, images, labels, names, templates, tokenizer)
        _, nbytes = saved_activation_bytes(fwd, exclude=m)
        sides[side] = {"model": m, "step": step, "saved_bytes": nbytes}
    one = max(_time_once(v["step"]) for v in sides.values())
    reps = int(min(200, max(cfg.timing_reps, math.ceil(cfg.timing_min_seconds / max(one, 1e-6)))))
    med = interleaved_medians({k: v["step"] for k, v in sides.items()}, reps=reps, warmup=cfg.timing_warmup)
    saved = {k: v["saved_bytes"] for k, v in sides.items()}
    out = {
        "step_time_ratio": med["lean"] / med["plain"],
        "saved_act_ratio": saved["lean"] / saved["plain"] if saved["plain"] else None,
        "step_seconds": med,
        "saved_act_bytes": saved,
        "timing_batch": int(images.shape[0]),
        "timing_reps": reps,
    }
    if "lean_no_recompute" in med:
        out["step_time_ratio_no_recompute"] = med["lean_no_recompute"] / med["plain"]
    plan = sides["lean"]["model"].leanclip_info["options"].get("recompute_plan")
    if plan is not None:
        out["recompute_plan"] = plan["summary"]
    return out


def _plan_is_none(model) -> bool:
    plan = model.leanclip_info["options"].get("recompute_plan")
    return plan is None or all(p == "none" for pols in plan["policies"].values() for p in pols)
