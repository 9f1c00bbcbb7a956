"""Largest batch that fits a memory cap: plain PyTorch vs leanclip (CUDA only).

``torch.cuda.set_per_process_memory_fraction`` caps the allocator; a doubling search then a bisection finds the
largest batch whose training step (bench.step.make_step) runs without an out-of-memory error.
"""
from __future__ import annotations

import gc

import torch


def parse_bytes(text: str) -> int:
    units = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    s = str(text).strip().lower()
    num = s.rstrip("abgikm")
    unit = s[len(num):]
    if unit not in units or not num:
        raise ValueError(f"--mem-cap: cannot read {text!r} (use e.g. 16GiB, 40GB, 8000MiB)")
    value = float(num) * units[unit]
    if value <= 0:
        raise ValueError(f"--mem-cap must be positive, got {text!r}")
    return int(value)


def _fits(model_name, method, mode, batch, n_classes, tokenizer, precision="bf16") -> bool:
    from leanclip.bench.step import make_step

    try:
        step, _, model = make_step(model_name, method, mode, batch_size=batch, n_classes=n_classes,
                                   device=torch.device("cuda"), tokenizer=tokenizer, precision=precision)
        step()
        step()
        torch.cuda.synchronize()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        step = model = None
        gc.collect()
        torch.cuda.empty_cache()


def largest_batch(model_name, method, mode, n_classes, tokenizer, start=8, limit=8192, precision="bf16") -> int:
    lo, hi = 0, start
    while hi <= limit and _fits(model_name, method, mode, hi, n_classes, tokenizer, precision):
        lo, hi = hi, hi * 2
    while hi - lo > max(1, lo // 16):  # bisect to ~6% resolution
        mid = (lo + hi) // 2
        if _fits(model_name, method, mode, mid, n_classes, tokenizer, precision):
            lo = mid
        else:
            hi = mid
    return lo


def run(model_name, method, mem_cap: int, *, n_classes=100, modes=("plain", "lean:mlp+qkv", "lean:block"),
        precision="bf16", batch=None):
    """Largest batch per mode under ``mem_cap`` bytes or, with ``batch``, only whether that batch fits."""
    import open_clip

    if not torch.cuda.is_available():
        raise ValueError("bench fit needs a CUDA device (none is available)")
    total = torch.cuda.get_device_properties(0).total_memory
    if mem_cap > total:
        raise ValueError(f"--mem-cap {mem_cap / 2**30:.1f} GiB is larger than the device's {total / 2**30:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(mem_cap / total)
    tokenizer = open_clip.get_tokenizer(model_name)
    head = {"model": model_name, "method": method, "precision": precision, "n_classes": n_classes,
            "mem_cap_bytes": mem_cap}
    if batch is not None:
        return {**head, "batch_size": batch,
                "fits": {m: _fits(model_name, method, m, batch, n_classes, tokenizer, precision) for m in modes}}
    out = {m: largest_batch(model_name, method, m, n_classes, tokenizer, precision=precision) for m in modes}
    return {**head, "largest_batch": out,
            "ratio_vs_plain": {m: (v / out["plain"] if out["plain"] else None) for m, v in out.items()}}


def summarize(res: dict) -> str:
    """Markdown: per mode, the largest batch (and its ratio to plain) or whether the asked batch fits."""
    head = (f"{res['model']} {res['method']}, {res['precision']}, {res['n_classes']} classes, memory cap "
            f"{res['mem_cap_bytes'] / 2**30:.3g} GiB")
    if "fits" in res:
        lines = [f"{head}, batch {res['batch_size']}", "", "| mode | fits |", "|---|---|"]
        return "\n".join(lines + [f"| {m} | {'yes' if ok else 'no'} |" for m, ok in res["fits"].items()])
    lines = [head, "", "| mode | largest batch (images) | batch / plain |", "|---|---:|---:|"]
    for m, n in res["largest_batch"].items():
        ratio = res["ratio_vs_plain"].get(m)
        lines.append(f"| {m} | {n} | {'' if ratio is None else format(ratio, '.3g')} |")
    return "\n".join(lines)
