"""Shared benchmark plumbing: machine description, side-by-side timing and its spread, whether a machine was quiet
enough to trust the ratios, JSON + plot output."""
from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Callable

import torch

from leanclip.models import transformers as _hf
from leanclip.utils import atomic_write, atomic_write_text


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def interleaved_times(fns: dict[str, Callable[[], object]], reps: int = 7, warmup: int = 1) -> dict[str, list[float]]:
    """Run each callable in turn (A B C A B C ...) and return every timed call's seconds, per callable.

    Interleaving spreads the noise of a shared CPU box evenly over the contenders, so their ratios are fair; the
    samples themselves show how noisy the box was (``spread``)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def interleaved_medians(fns: dict[str, Callable[[], object]], reps: int = 7, warmup: int = 1) -> dict[str, float]:
    """The median seconds of each callable, timed as in :func:`interleaved_times`."""
    return {k: statistics.median(v) for k, v in interleaved_times(fns, reps, warmup).items()}


def spread(samples: list[float]) -> dict:
    """``{"reps", "min", "median", "max"}`` of one contender's timed calls (seconds)."""
    return {"reps": len(samples), "min": min(samples), "median": statistics.median(samples), "max": max(samples)}


# A contender whose slowest repetition took this much longer than its fastest was disturbed while it ran: its median,
# and every ratio built on it, may be off by as much. 1.25 sits above the run-to-run wobble of a quiet CPU box
# (a few percent) and well below what a neighbour's job does to it (2x and more).
MAX_SPREAD = 1.25
# The 1-minute load average counts this run's own threads too: a box running this benchmark alone reads about
# min(threads, cores). Half a core above that means other work shared the CPU while the ratios were taken.
LOAD_MARGIN = 0.5


def load_average() -> float | None:
    """The machine's 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def reliability_warnings(spreads: dict[str, dict], load_start: float | None, load_end: float | None,
                         threads: int, cpu_count: int | None, *, what: str = "") -> list[str]:
    """At most two messages, one per reason a benchmark's ratios cannot be trusted; empty when there is none.

    ``spreads``: contender -> :func:`spread`; every contender whose max / min exceeds ``MAX_SPREAD`` is named with
    its spread. Load: a 1-minute load average at the start or the end above min(threads, cores) + ``LOAD_MARGIN``
    means other work ran beside the benchmark (more threads than cores reads the same: the run fights itself).
    Pure: numbers in, messages out, so the rule is testable without timing anything."""
    prefix = f"{what}: " if what else ""
    out = []
    wide = {name: s["max"] / s["min"] for name, s in spreads.items()
            if s and s.get("min") and s["max"] / s["min"] > MAX_SPREAD}
    if wide:
        reps = max(spreads[name]["reps"] for name in wide)
        named = "; ".join(f"{name} {x:.2g}x" for name, x in wide.items())
        out.append(f"{prefix}slowest / fastest of {reps} repetitions above {MAX_SPREAD:g}x in {named}: those times "
                   f"and every ratio built on them are unreliable; rerun on a quiet machine")
    limit = min(threads, cpu_count or threads) + LOAD_MARGIN
    high = [f"{load:.2f} at the {when}" for when, load in (("start", load_start), ("end", load_end))
            if load is not None and load > limit]
    if high:
        out.append(f"{prefix}load average {' and '.join(high)}, above {limit:g} ({threads} threads, {cpu_count} "
                   f"cores): other work shared the CPU, every time ratio is unreliable")
    return out


def warn_all(messages: list[str]) -> None:
    """Each message as a warning (the CLI prints one ``leanclip: warning:`` line per message)."""
    sys.stdout.flush()  # the warnings follow the table they qualify, also when stdout is a pipe
    for msg in messages:
        warnings.warn(msg, stacklevel=2)


def cuda_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds on CUDA (triton.testing.do_bench: warm-up, L2 flush between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def cuda_samples_ms(fn: Callable[[], object]) -> list[float]:
    """Every timed call's milliseconds on CUDA (the samples behind :func:`cuda_ms`'s median)."""
    import triton.testing

    return [float(t) for t in triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="all")]


def write_json(path: str, payload: dict) -> str:
    """Atomic JSON write (leanclip.utils: temp file in the same folder, fsync, rename)."""
    return str(atomic_write_text(path, json.dumps(payload, indent=2, default=str)))


def write_png(path: str, fig) -> str:
    """Atomic write of a matplotlib figure: a reader never sees half a PNG."""
    return str(atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110)))


def proc_status_bytes(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process from /proc/self/status, in bytes (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so the resident set before a step holds what
    is live rather than what earlier steps freed into malloc's arenas; without it a step that reuses those pages
    shows no RSS growth at all."""
    import ctypes
    import ctypes.util
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_rss_peak() -> bool:
    """Reset this process's peak resident set (VmHWM) to the current one (Linux ``clear_refs`` value 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def step_peak_bytes(step: Callable[[], object], device: torch.device) -> tuple[int | None, str]:
    """Memory one call of ``step`` adds on top of what is resident before it: (bytes, how it was measured).

    CUDA: ``max_memory_allocated`` minus ``memory_allocated`` before the step (the allocator's own count). CPU: the
    peak resident set (VmHWM, reset just before) minus the resident set before the step, after returning freed heap
    pages to the OS. Both count what the step keeps alive for backward plus its transient workspace, and work for
    every kind of step (eager, grad checkpointing, compiled graphs), unlike saved-tensor hooks. The CPU figure is
    only meaningful when the step runs in a process of its own (``--isolate``): otherwise pages other modes left
    mapped blur it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, "cuda max_memory_allocated - allocated before"
    measured = rss_step_peak(step)
    if measured is None:
        return None, "unavailable: no writable /proc/self/clear_refs to reset the peak resident set"
    before, peak = measured
    return peak - before, "peak RSS (VmHWM, reset before the step) - RSS before the step"


def rss_now() -> int:
    """The resident bytes of this process now, freed heap pages handed back first (what is live)."""
    _release_free_heap()
    return proc_status_bytes("VmRSS") or 0


def rss_step_peak(step: Callable[[], object]) -> tuple[int, int] | None:
    """(resident bytes before, peak resident bytes during) one call of ``step`` on CPU, or None where the peak cannot
    be reset (no writable /proc/self/clear_refs). Freed heap pages go back to the OS first, so "before" is what is
    live rather than what earlier steps freed into malloc's arenas."""
    _release_free_heap()
    if not _reset_rss_peak():
        return None
    before = proc_status_bytes("VmRSS")
    step()
    return before, proc_status_bytes("VmHWM")


def bench_tokenizer(model_name: str):
    """``open_clip.get_tokenizer(model_name)``, or - where that tokenizer cannot be had (SigLIP / SigLIP2 read theirs
    from the Hugging Face hub, offline here) - open_clip's ``SimpleTokenizer`` at the model's context length, with a
    warning: the benchmarks run random weights, so what matters is the token count per prompt, not which ids."""
    import open_clip

    try:
        if _hf.is_name(model_name):  # CLIP's BPE is open_clip's SimpleTokenizer; the 77-token context is CLIP's
            raise OSError("the benchmarks build transformers models from a config, without the hub repo")
        return open_clip.get_tokenizer(model_name)
    except (OSError, ImportError) as e:
        ctx = (open_clip.get_model_config(model_name) or {}).get("text_cfg", {}).get("context_length", 77)
        warnings.warn(f"leanclip: bench: the tokenizer of {model_name} is not available ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:120]}); using open_clip's SimpleTokenizer with its {ctx}-token "
                      f"context (random weights: the token ids do not change what is measured)", UserWarning)
        from leanclip.models.openclip import SimpleTokenizer

        return SimpleTokenizer(context_length=ctx)
