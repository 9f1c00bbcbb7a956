"""Shared benchmark plumbing: machine description, side-by-side timing, JSON + plot output."""
from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch

from leanclip.utils import atomic_write_text


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


def interleaved_medians(fns: dict[str, Callable[[], object]], reps: int = 7, warmup: int = 1) -> dict[str, float]:
    """Run each callable in turn (A B C A B C ...) and return the median seconds of each.

    Interleaving spreads the noise of a shared CPU box evenly over the contenders, so their ratios are fair."""
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
    return {k: statistics.median(v) for k, v in times.items()}


def cuda_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds on CUDA (triton.testing.do_bench: warm-up, L2 flush between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def write_json(path: str, payload: dict) -> str:
    """Atomic JSON write (leanclip.utils: temp file in the same folder, fsync, rename)."""
    return str(atomic_write_text(path, json.dumps(payload, indent=2, default=str)))


def _proc_status_bytes(field: str) -> int | None:
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
    _release_free_heap()
    if not _reset_rss_peak():
        return None, "unavailable: no writable /proc/self/clear_refs to reset the peak resident set"
    before = _proc_status_bytes("VmRSS")
    step()
    peak = _proc_status_bytes("VmHWM")
    return peak - before, "peak RSS (VmHWM, reset before the step) - RSS before the step"
