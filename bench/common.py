"""Shared benchmark plumbing: machine description, side-by-side timing, JSON + plot output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Callable

import torch


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
    """Atomic JSON write (engine.utils: temp file in the same folder, fsync, rename)."""
    from engine.utils import atomic_write_text

    return str(atomic_write_text(path, json.dumps(payload, indent=2, default=str)))
