"""Train-step benchmark: leanclip against what a user would pick instead, side by side.

One training step = image features of a batch + class text features of every class prompt (the text tower runs over
all classes each step when it is trainable) + CE (+ CLIPFit's KD term) + backward + SGD update. ``scope="image"``
trains the image tower alone against fixed class text features (the text side computed once).

Modes (``--modes``; the grammar is checked by ``parse_mode``):

    plain          open_clip as is, ``requires_grad_`` on the method's parameters, both towers at the full 77-token
                   context every step; the method's extra loss terms (CLIPFit's distillation) as leanclip builds them
    plain+gc       the same with the tower's own gradient checkpointing, ``model.set_grad_checkpointing(True)``:
                   open_clip's, timm's for a timm trunk, ``transformers``' ``gradient_checkpointing_enable`` for a
                   ``transformers:`` model (every block recomputed)
    plain+compile  the plain step's forward under ``torch.compile`` (CPU or CUDA; compiling is timed apart from the
                   step)
    plain+compile+budget:<b>  the same with ``torch._functorch.config.activation_memory_budget = b`` (0 < b <= 1), the
                   compiler's automatic selective recompute; set only while that mode runs
    lean:<policy>  ``leanclip.prepare(model, method, recompute=policy)`` and the trainer's own step
                   (``leanclip.step.ClassifyStep``): fused ops, EOT-truncated text, text tower once per step
    lean:block/<c> the ``block`` policy over chunks of c samples (``leanclip.lean.set_recompute(..., chunk=c)``): a
                   block's backward holds one chunk's activations instead of the batch's
    lean:budget:<b>  ``prepare(..., recompute="auto", memory_budget=b)``: the plan ``leanclip.budget`` makes for a step
                   peak of b (a fraction of plain's predicted peak, or bytes such as 3GiB)
    lean:fit       (``bench fit``) the plan for the cap: the cap less what is resident before the step (the model,
                   the batch, and what a one-sample warm-up step leaves)
    lean:<policy>+compile  the same step with its image-side forward under ``torch.compile``; a mode that does not
                   trace is reported with its reason under ``failed`` instead of stopping the run
    floor:image    (``--floor``) the lean image tower's forward + backward alone, against fixed class text features:
                   a lower bound for any exact step of a method that trains image-tower parameters

A cached-feature method (``llu``: the towers never back-propagate, and a run encodes each image once before training)
is timed as its training step is: the heads' update on a batch of features the frozen towers encoded before timing
(``leanclip.llu.head_loss_fn``). The encoding is left out, as it is of every step of a run; every mode then times the
same step (a compiled mode compiles the head loss), and the row says so under ``step``. Methods that add modules to
the features (CoOp's prompts, CLIP-Adapter, a linear probe) run them in the plain modes too (``leanclip.features``:
the prompts at the full context, the towers as open_clip runs them).

Time: all modes of a run are timed side by side in one process (interleaved, medians, with each mode's min and max
under ``spread``); the 1-minute load average at the start and the end of the run is recorded, and ``warnings`` says
when a mode's repetitions spread too far or the machine was loaded (``leanclip.bench.common.reliability_warnings``);
the first calls (compiling, for compiled modes) are timed apart as ``warmup_seconds``, and a compiled mode's
``graph_breaks`` say how much of its step dynamo left to eager. Memory: ``peak_step_bytes`` is what one step adds on
top of the resident model, optimizer state and gradients (``leanclip.bench.common.step_peak_bytes``: CUDA allocator
peak, or peak RSS on CPU), the one measure that works for every mode. ``isolate=True`` runs each mode in its own process
(``python -m leanclip bench step --modes X --json``), which the CPU figure needs; the times then are each process's own
medians, measured one mode after another. ``saved_bytes`` (``leanclip.memory.saved_activation_bytes``) counts tensors
saved through autograd's saved-tensor hooks: exact for eager modes, not defined for compiled graphs and grad
checkpointing (None there).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
import types

import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F
from torch._dynamo.utils import counters

from leanclip import utils
from leanclip.bench.common import (
    bench_tokenizer, interleaved_times, load_average, machine, rss_now, spread, step_peak_bytes, write_json,
)
from leanclip.bench.step_report import finish_row, plot_rows, timing_warnings
from leanclip.budget import apply_plan, current_peak, plain_peak, plan_recompute, predict_peak, resolve_budget
from leanclip.configs import register_tiny_config
from leanclip.features import class_logits, image_features, text_features
from leanclip.lean import SAC_CACHE_COUNTED, set_recompute
from leanclip.llu import head_loss_fn
from leanclip.memory import saved_activation_bytes
from leanclip.methods import prepare
from leanclip.models import transformers as _hf
from leanclip.models.openclip import random_init
from leanclip.registry import method_hooks, method_loss_terms, method_options, method_trainer, parse_method
from leanclip.select import trainable_parameters
from leanclip.step import ClassifyStep, StepContext

POLICIES = ("none", "mlp", "mlp+qkv", "block")
TEMPLATES = ("a photo of a {}.",)
SCOPES = ("full", "image")
DEFAULT_BUDGETS = (0.1, 0.5)
_MODE = re.compile(r"^(?:(plain)(\+gc)?(\+compile(?:\+budget:([0-9.eE+-]+))?)?"
                   r"|lean:([a-z+]+?)(\+compile)?|(floor:image))$")
_CHUNK = re.compile(r"^lean:block/([0-9]+)")  # lean:block/<samples per chunk>[+compile]
_PLAN = re.compile(r"^lean:(?:budget:([^+]+)|(fit))(\+compile)?$")  # lean:budget:<b>, lean:fit


def parse_mode(mode: str) -> dict:
    """``{"kind": plain|lean|floor, "policy", "gc", "compile", "budget"}`` of a mode name; ValueError naming the
    mode when it is not one of the forms in this module's docstring."""
    plan = _PLAN.match(mode)
    if plan:
        return _plan_mode(mode, plan)
    chunk = _CHUNK.match(mode)
    m = _MODE.match(_CHUNK.sub("lean:block", mode))
    if not m or (m.group(5) and m.group(5) not in POLICIES) or (chunk and int(chunk.group(1)) < 1):
        raise ValueError(f"--modes: unknown mode {mode!r}; valid: plain, plain+gc, plain+compile, "
                         f"plain+compile+budget:<0..1>, lean:<policy>, lean:block/<chunk>, lean:budget:<b>, "
                         f"lean:fit, lean:<policy>+compile, "
                         f"floor:image (policies: {', '.join(POLICIES)}; chunk: samples per chunk, at least 1)")
    budget = None
    if m.group(4) is not None:
        try:
            budget = float(m.group(4))
        except ValueError:
            budget = float("nan")
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"--modes: {mode!r}: the activation memory budget must be in (0, 1]")
    kind = "plain" if m.group(1) else ("lean" if m.group(5) else "floor")
    return {"kind": kind, "policy": m.group(5) or "none", "gc": bool(m.group(2)),
            "compile": bool(m.group(3) or m.group(6)), "budget": budget,
            "chunk": int(chunk.group(1)) if chunk else None, "memory_budget": None}


def _plan_mode(mode: str, m) -> dict:
    """``lean:budget:<b>`` (checked as ``prepare`` checks a budget) or ``lean:fit`` (the cap ``bench fit`` gives)."""
    memory_budget = "fit" if m.group(2) else m.group(1)
    if memory_budget != "fit":
        try:
            resolve_budget(memory_budget, 1)
        except ValueError as e:
            raise ValueError(f"--modes: {mode!r}: {e}") from None
    return {"kind": "lean", "policy": "auto", "gc": False, "compile": bool(m.group(3)), "budget": None,
            "chunk": None, "memory_budget": memory_budget}


def default_modes(policies=POLICIES, *, compile=False, budgets=DEFAULT_BUDGETS, floor=False) -> list[str]:
    """The peers a user would reach for, then leanclip's policies (each also compiled when ``compile``)."""
    modes = ["plain", "plain+gc"]
    if compile:
        modes += ["plain+compile"] + [f"plain+compile+budget:{b:g}" for b in budgets]
    modes += [f"lean:{p}" for p in policies]
    if compile:
        modes += [f"lean:{p}+compile" for p in policies]
    return modes + (["floor:image"] if floor else [])


PRECISIONS = ("fp32", "bf16")


def create_random(model_name, device=None):
    """``model_name`` with random weights (time and memory do not depend on them): open_clip's model, or for
    ``transformers:<id>`` the ``transformers`` model built from its config, with no download
    (``leanclip.models.transformers.create_random``). ``device="meta"``: shapes only, no memory."""
    import open_clip

    torch.manual_seed(0)
    with torch.device(device or "cpu"):  # built there: a meta model never holds its weights in memory
        if _hf.is_name(model_name):
            return _hf.create_random(model_name)
        with random_init():  # random weights are the point: no "No pretrained weights loaded" line per mode
            return open_clip.create_model(model_name, pretrained=None, device=device or "cpu")


def _build(model_name, method, lean, policy, device, classnames, tokenizer, frozen_dtype=None, plan=None,
           scope="full"):
    """The model of one mode. ``plan``: ``prepare``'s budget arguments (a ``lean:budget:<b>`` mode). With
    ``scope="image"`` a method with a tower option is applied to the image tower only (the text tower is frozen and
    its features fixed: nothing it would add there is trained)."""
    model = create_random(model_name).to(device)
    budget = dict(plan, recompute="auto") if plan is not None else {"recompute": policy if lean else "none"}
    towered = all("tower" in method_options(p) for p in parse_method(method))
    tower = {"tower": "image"} if scope == "image" and towered else {}
    prepare(model, method, lean=lean, classnames=classnames, tokenizer=tokenizer, model_name=model_name,
            frozen_dtype=frozen_dtype, **budget, **tower)
    model.train()
    return model


def _compiled(fn, mode):
    """``torch.compile`` of a fresh copy of ``fn``'s code: dynamo caches compiled graphs per code object, and every
    mode builds its forward from the same source, so without the copy a budgeted mode could run the graph another
    mode compiled under a different budget."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{re.sub(r'[^0-9A-Za-z]', '_', mode)}")
    return torch.compile(types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__))


def _budget_context(budget):
    """The compiler's activation memory budget for one mode only (restored on exit, so other modes never see it)."""
    if budget is None:
        return contextlib.nullcontext()
    return functorch_config.patch(activation_memory_budget=budget)


def _plain_forward(model, method, images, labels, tokens, scope, classnames, tokenizer):
    """What a user writes with open_clip alone: both towers at the full context every step, CE on the scaled
    cosine (+ the method's extra loss terms, built as leanclip builds them)."""
    if scope == "image":
        with torch.no_grad():
            fixed = F.normalize(model.encode_text(tokens), dim=-1)

        def forward():
            img = F.normalize(model.encode_image(images), dim=-1)
            return F.cross_entropy(model.logit_scale.exp() * img @ fixed.T, labels)
        return forward
    ctx = StepContext(model, classnames, list(TEMPLATES), tokenizer, None, images.device, "fp32")
    terms = [t for t in (make(ctx) for make in method_loss_terms(method)) if t is not None]
    if method_hooks(model):
        return _plain_hooked_forward(model, images, labels, tokens, classnames, tokenizer, terms)

    def forward():
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        loss = F.cross_entropy(model.logit_scale.exp() * img @ txt.T, labels)
        return loss + sum(term(txt)[1] for term in terms)
    return forward


def _plain_hooked_forward(model, images, labels, tokens, classnames, tokenizer, terms):
    """The plain step of a method that adds modules to the features: its modules as ``leanclip.features`` runs
    them (CLIP-Adapter on the image features, CoOp's prompts through the text tower at the full context, a linear
    probe's logits) on the towers open_clip runs, not lean."""
    hooks = method_hooks(model)

    def forward():
        img = image_features(model, images)
        txt = (text_features(model, classnames, list(TEMPLATES), tokenizer) if "prompts" in hooks
               else F.normalize(model.encode_text(tokens), dim=-1))
        loss = F.cross_entropy(class_logits(model, img, txt), labels)
        return loss + sum(term(txt)[1] for term in terms)
    return forward


def _plan_args(spec, batch_size, n_classes, scope) -> dict | None:
    """``prepare``'s budget arguments of a ``lean:budget:<b>`` mode (None for other modes; ``lean:fit`` plans later,
    :func:`_plan_for_cap`)."""
    if spec["memory_budget"] in (None, "fit"):
        return None
    return {"memory_budget": spec["memory_budget"], "batch_size": batch_size,
            "text_batch_size": text_batch(n_classes, scope)}


def text_batch(n_classes: int, scope: str) -> int:
    return 0 if scope == "image" else n_classes * len(TEMPLATES)


# The step-peak estimate has come within 13% of measured peaks, low rather than high (docs/MEASURED.md): planning for
# this share of what the cap leaves keeps a plan that is predicted to fit inside the cap.
FIT_MARGIN = 0.87


def _plan_for_cap(model, warm_up, cap, batch_size, text_batch, device) -> None:
    """``lean:fit``: plan the lean blocks for what the cap leaves once everything but the step is resident: the
    model, its inputs, and what a first step leaves behind (optimizer state, the class text features, the runtime's
    own first-call allocations), measured after a one-sample warm-up step, with ``FIT_MARGIN`` for the estimate's
    error."""
    if cap is None:
        raise ValueError("mode lean:fit plans for bench fit's --mem-cap; use lean:budget:<b> here")
    warm_up()
    held = torch.cuda.memory_allocated() if device.type == "cuda" else rss_now()
    left = max(1, int(FIT_MARGIN * (cap - held)))  # nothing left: no plan fits (the planner says so)
    apply_plan(model, plan_recompute(model, left, batch_size, text_batch_size=text_batch))


def make_step(model_name, method, mode, *, batch_size, n_classes, device, tokenizer, precision="fp32",
              scope="full", cap=None):
    """Return (step_fn, forward_fn, model) for one mode (see ``parse_mode``). ``precision="bf16"``: every mode under
    bf16 autocast (plain = PyTorch AMP with fp32 weights); lean modes also keep their frozen weights in bf16
    (trainable ones and the optimizer state stay fp32). ``scope="image"``: the image tower alone is trained, against
    class text features computed once."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    spec = parse_mode(mode)
    amp = precision == "bf16"
    classnames = [f"class number {i}" for i in range(n_classes)]
    if method_trainer(method) == "cached":
        return _cached_step(model_name, method, mode, spec, batch_size, n_classes, device, tokenizer, classnames)
    lean = spec["kind"] != "plain"
    fit = spec["memory_budget"] == "fit"
    model = _build(model_name, method, lean, "none" if fit else spec["policy"], device, classnames, tokenizer,
                   frozen_dtype=torch.bfloat16 if amp and lean else None,
                   plan=_plan_args(spec, batch_size, n_classes, scope), scope=scope)
    if spec["gc"]:
        model.set_grad_checkpointing(True)
    if spec["chunk"] is not None:
        set_recompute(model, "block", chunk=spec["chunk"])
    params = [p for _, p in trainable_parameters(model)]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    size = model.visual.image_size
    images, labels = _inputs(batch_size, n_classes, size if isinstance(size, int) else size[0], device)
    if lean:  # the trainer's own step
        cstep = ClassifyStep(model, classnames, list(TEMPLATES), tokenizer, device=device, precision=precision,
                             compile=spec["compile"], fixed_text=spec["kind"] == "floor" or scope == "image")
        if fit:
            _plan_for_cap(model, lambda: cstep(images[:1], labels[:1]), cap, batch_size,
                          text_batch(n_classes, scope), device)

        def step():
            with _budget_context(spec["budget"]):
                opt.zero_grad(set_to_none=True)
                loss = cstep(images, labels)
                opt.step()
            return loss

        return step, (lambda: cstep.loss(images, labels)), model
    tokens = tokenizer([t.format(c) for t in TEMPLATES for c in classnames]).to(device)
    forward = _plain_forward(model, method, images, labels, tokens, scope, classnames, tokenizer)
    if spec["compile"]:
        forward = _compiled(forward, mode)
    if amp:
        inner = forward

        def forward():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return inner()

    return _backward_step(opt, forward, spec["budget"]), forward, model


def _backward_step(opt, forward, budget=None):
    """One optimizer step of ``forward``'s loss (under the compiler's activation memory ``budget``, if any)."""
    def step():
        with _budget_context(budget):
            opt.zero_grad(set_to_none=True)
            loss = forward()
            loss.backward()
            opt.step()
        return loss.detach()
    return step


CACHED_STEP_NOTE = ("the heads' update on a batch of features the frozen towers encoded before timing (a run "
                    "encodes each image once, before its first step); every mode times this same step, a compiled "
                    "mode with the head loss compiled")


def _inputs(batch_size, n_classes, size, device):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, size, size, generator=g).to(device)
    return images, torch.randint(0, n_classes, (batch_size,), generator=g).to(device)


def _cached_step(model_name, method, mode, spec, batch_size, n_classes, device, tokenizer, classnames):
    """(step, forward, model) of a cached-feature method (see the module docstring): the towers are frozen and
    never run in the step, so the model is built as open_clip's and the mode's recompute policy does not apply."""
    model = _build(model_name, method, False, "none", device, classnames, tokenizer)
    size = model.visual.image_size
    images, labels = _inputs(batch_size, n_classes, size if isinstance(size, int) else size[0], device)
    forward = head_loss_fn(model, images, labels, classnames, list(TEMPLATES), tokenizer)
    if spec["compile"]:
        forward = _compiled(forward, mode)
    opt = torch.optim.SGD([p for _, p in trainable_parameters(model)], lr=1e-3, momentum=0.9)
    return _backward_step(opt, forward), forward, model


def step_note(method) -> str | None:
    """What a row's step is when it is not the towers' step (a cached-feature method), else None."""
    return CACHED_STEP_NOTE if method_trainer(method) == "cached" else None


def _first_lines(exc: BaseException, n: int = 3) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return " | ".join(line.strip() for line in text[:n] if line.strip())[:600]


def _warm_up(step, device):
    """Two untimed-in-the-medians calls (the first compiles a compiled mode's forward and backward); their seconds."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    out = []
    for _ in range(2):
        t0 = time.perf_counter()
        loss = step()
        sync()
        out.append(time.perf_counter() - t0)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()}")
    return out


def _prepare_mode(mode, model_name, method, *, device, tokenizer, **kw):
    """Build and warm up one mode: (step, saved bytes or None, warm-up seconds, peak bytes, how peak was measured)."""
    step, forward, model = make_step(model_name, method, mode, device=device, tokenizer=tokenizer, **kw)
    sizes = {k: kw[k] for k in ("batch_size", "n_classes", "scope")}
    sizes["precision"] = kw.get("precision", "fp32")
    breaks = _graph_breaks()
    warm = _warm_up(step, device)
    spec = parse_mode(mode)
    breaks = _graph_breaks() - breaks if spec["compile"] else None
    saved = None
    if not (spec["gc"] or spec["compile"]):
        with _budget_context(spec["budget"]):
            saved = saved_activation_bytes(forward, exclude=model)[1]
    peak, how = step_peak_bytes(step, device)
    return step, saved, warm, peak, how, breaks, predicted_peak(model, spec, **sizes)


def predicted_peak(model, spec: dict, *, batch_size: int, n_classes: int, scope: str, precision: str) -> int | None:
    """``leanclip.budget``'s prediction of what one step of this mode adds (``peak_step_bytes`` measures it):
    ``plain_peak`` for plain, the ``block`` policy over every block for the tower's own gradient checkpointing,
    ``current_peak`` (the policies the lean blocks hold) for a lean mode; None for compiled modes and the floor
    (the estimate models eager autograd)."""
    if spec["compile"] or spec["kind"] == "floor":
        return None
    kw = {"text_batch_size": text_batch(n_classes, scope), "dtype": torch.bfloat16 if precision == "bf16" else None}
    if spec["kind"] == "lean":
        return current_peak(model, batch_size, **kw)
    if spec["gc"]:
        return predict_peak(model, batch_size, "block", lean_only=False, **kw)
    return plain_peak(model, batch_size, **kw)


def _graph_breaks() -> int:
    """Graph breaks dynamo has counted in this process so far (a compiled mode that breaks runs partly eager)."""
    return sum(counters["graph_break"].values())


def bench_one(model_name, method, modes, *, batch_size, n_classes, device, reps, precision="fp32", scope="full"):
    tokenizer = bench_tokenizer(model_name)
    steps, saved, peak, warmup, failed, breaks, how, predicted = {}, {}, {}, {}, {}, {}, None, {}
    for mode in modes:
        try:
            step, saved[mode], warmup[mode], peak[mode], how, breaks[mode], predicted[mode] = _prepare_mode(
                mode, model_name, method, device=device, tokenizer=tokenizer, batch_size=batch_size,
                n_classes=n_classes, precision=precision, scope=scope)
        except Exception as exc:  # noqa: BLE001 - a compiled mode that does not trace is a result, not a crash
            if not (parse_mode(mode)["compile"] or isinstance(exc, ValueError)):  # ValueError: a mode refused
                raise                                                            # for this model (one line)
            failed[mode] = _first_lines(exc)
            continue
        steps[mode] = step
    samples = interleaved_times(steps, reps=reps, warmup=0)
    times = {k: statistics.median(v) for k, v in samples.items()}
    row = {"model": model_name, "method": method, "batch_size": batch_size, "n_classes": n_classes,
           "precision": precision, "scope": scope, "seconds": times,
           "spread": {k: spread(v) for k, v in samples.items()},
           "images_per_s": {k: batch_size / v for k, v in times.items()},
           "warmup_seconds": warmup, "peak_step_bytes": peak, "peak_method": how,
           "saved_bytes": saved, "graph_breaks": breaks, "failed": failed, "predicted_peak_bytes": predicted}
    if step_note(method):
        row["step"] = step_note(method)
    return finish_row(row)


def _child_argv(model_name, method, mode, *, batch_size, n_classes, device, reps, precision, scope, threads):
    argv = [sys.executable, "-m", "leanclip", "bench", "step", "--models", model_name, "--methods", method,
            "--modes", mode, "--batch-size", str(batch_size), "--classes", str(n_classes), "--reps", str(reps),
            "--device", device.type, "--precision", precision, "--scope", scope, "--json"]
    return argv + (["--threads", str(threads)] if threads else [])


def child_env():
    """The parent's environment with the repository root first on the path (the installed ``leanclip`` package
    maps its folders), so the child runs the same code as the parent."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def bench_isolated(model_name, method, modes, *, threads=None, **kw) -> dict:
    """Each mode in its own process (``--json``); the per-mode numbers gathered into one row."""
    keys = ("seconds", "spread", "images_per_s", "warmup_seconds", "peak_step_bytes", "saved_bytes", "graph_breaks",
            "failed", "predicted_peak_bytes")
    row = {k: {} for k in keys}
    for mode in modes:
        argv = _child_argv(model_name, method, mode, threads=threads, **kw)
        proc = subprocess.run(argv, capture_output=True, text=True, env=child_env())
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            # exit 2 is a one-line refusal of this mode for this model (e.g. plain LoRA on open_clip's text blocks,
            # whose attention reads in_proj_weight itself): a result, as a compiled mode that does not trace is
            if not (parse_mode(mode)["compile"] or proc.returncode == 2):
                raise RuntimeError(f"bench step --modes {mode} failed in its own process: {tail}")
            row["failed"][mode] = tail
            continue
        child = json.loads(proc.stdout.strip().splitlines()[-1])["rows"][0]
        for key in keys:
            row[key].update(child.get(key, {}))
        row.update({k: child[k] for k in ("model", "method", "batch_size", "n_classes", "precision", "scope",
                                          "peak_method")})
    if step_note(method):
        row["step"] = step_note(method)
    return finish_row(row)


def run(models, methods, *, batch_size, n_classes, modes=None, policies=POLICIES, compile_plain=None, reps=5,
        device=None, output=None, plot=True, floor=False, precision=None, scope="full", isolate=False,
        threads=None):
    register_tiny_config()
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if compile_plain is None:
        compile_plain = device.type == "cuda"
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    modes = list(modes) if modes else default_modes(policies, compile=compile_plain, floor=floor)
    for mode in modes:
        parse_mode(mode)
    kw = dict(batch_size=batch_size, n_classes=n_classes, device=device, reps=reps, precision=precision,
              scope=scope)
    rows, load_start = [], load_average()
    for model_name, method in utils.track([(m, me) for m in models for me in methods], "bench step"):
        if isolate:
            rows.append(bench_isolated(model_name, method, modes, threads=threads, **kw))
        else:
            rows.append(bench_one(model_name, method, modes, **kw))
    load = {"start": load_start, "end": load_average()}
    return _result(rows, modes, device, precision, isolate, threads, output, plot, reps=reps, load=load)


def _result(rows, modes, device, precision, isolate, threads, output, plot, *, reps, load):
    res = {"machine": machine(), "device": str(device), "modes": modes, "rows": rows, "precision": precision,
           "weights": "random init: no pretrained weights are read (step time and memory do not depend on them)",
           "isolate": isolate, "threads": threads or torch.get_num_threads(), "reps": reps, "load_average": load,
           "time_source": ("per-process medians: each mode alone in its own process, one after another" if isolate
                           else "medians measured side by side (interleaved) in one process"),
           "memory_note": "peak_step_bytes: what one step adds on top of the resident model, optimizer state and "
                          "gradients (see peak_method); on CPU only --isolate gives each mode a clean process",
           "saved_bytes_note": "saved-tensor-hook bytes; None for compiled and grad-checkpointed modes, whose "
                               "saved tensors do not pass through those hooks",
           # glibc hands large freed blocks back to the OS below this threshold, so peak RSS follows live tensors
           # (docs/MEASURING.md); None: glibc's default, whose cached arenas add to the CPU peaks
           "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    if not SAC_CACHE_COUNTED:
        res["saved_bytes_note"] += ("; this torch's checkpoint has no respect_saved_tensors_hooks: saved_bytes of "
                                    "lean:mlp+qkv miss the attention outputs its selective checkpoint caches")
    res["warnings"] = timing_warnings(res)
    if output:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"step-{res['machine']['device'].replace(' ', '_')}-{stamp}"
        res["path"] = write_json(os.path.join(output, name + ".json"), res)
        if plot:
            res["plot"] = plot_rows(rows, os.path.join(output, name + ".png"))
    return res
