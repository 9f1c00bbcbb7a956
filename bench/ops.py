"""Op benchmarks: kernels.* against torch eager, torch.compile and (if installed) Liger, with device ceilings.

    python -m leanclip.bench.ops                      # CUDA: full CLIP shapes; CPU: references only, small shapes
    python -m leanclip.bench.ops --output bench/results --quick

Floors (docs/MEASURING.md): layer_norm fwd+bwd moves ~5*M*N*elem bytes -> GB/s vs a measured device copy;
frozen_linear backward should cost one dx GEMM (db rides along) -> ratio vs bare ``dy @ W``;
max_sim does 2*N*M*K flops -> TFLOP/s vs a measured bf16 matmul.
On a CPU box the Triton kernels cannot run (the interpreter is a test tool, not a speed), so the CPU run times the
torch references against plain torch and says so in the JSON (``"mode": "cpu-references"``).

``summarize`` prints one Markdown table per op: each contender by name (leanclip with the backend that ran it, torch
eager, torch.compile and Liger where measured, the GEMM floor), median and min / max ms, time relative to torch eager
and throughput. The JSON keeps the raw seconds, every contender's spread and the load average; on CPU, ``warnings``
says when a contender's repetitions spread too far or the machine was loaded.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from leanclip import kernels
from leanclip.bench.common import (
    cuda_ms, cuda_samples_ms, interleaved_times, load_average, machine, reliability_warnings, spread, warn_all,
    write_json,
)


CPU_REPS = 5


def _timer(cuda: bool):
    """fns -> {contender: seconds of every timed call}. CUDA: do_bench's samples (warm-up, L2 flushed between calls);
    CPU: ``CPU_REPS`` interleaved repetitions."""
    if cuda:
        return lambda fns: {k: [ms / 1e3 for ms in cuda_samples_ms(f)] for k, f in fns.items()}
    return lambda fns: interleaved_times(fns, reps=CPU_REPS)


def _timed(timer, fns) -> tuple[dict, dict]:
    """(median seconds, spread) per contender."""
    samples = timer(fns)
    return {k: statistics.median(v) for k, v in samples.items()}, {k: spread(v) for k, v in samples.items()}


def ceilings(device) -> dict:
    """Measured copy bandwidth (GB/s) and bf16 matmul rate (TFLOP/s) of this device."""
    if device.type != "cuda":
        return {}
    n = 256 * 2**20  # 512 MiB of bf16 each way
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy_s = cuda_ms(lambda: dst.copy_(src)) / 1e3
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    mm_s = cuda_ms(lambda: a @ b) / 1e3
    return {"copy_GBps": 2 * n * 2 / copy_s / 1e9, "bf16_mm_TFLOPs": 2 * 8192**3 / mm_s / 1e12}


def _liger_layer_norm():
    try:
        from liger_kernel.transformers.functional import liger_layer_norm
    except Exception:
        return None
    return liger_layer_norm


def bench_layer_norm(device, dtype, shapes, timer) -> list[dict]:
    rows = []
    liger = _liger_layer_norm() if device.type == "cuda" else None
    compiled = torch.compile(F.layer_norm) if device.type == "cuda" else None
    for m, n in shapes:
        x = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(m, n, device=device, dtype=dtype)

        def fwd_bwd(fn):
            def run():
                y = fn(x, w, b)
                torch.autograd.backward(y, dy, inputs=[x, w, b])
            return run

        ours = lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5)
        eager = lambda x, w, b: F.layer_norm(x, (n,), w, b, 1e-5)
        fns = {"leanclip": fwd_bwd(ours), "torch": fwd_bwd(eager)}
        if compiled is not None:
            fns["torch.compile"] = fwd_bwd(lambda x, w, b: compiled(x, (n,), w, b, 1e-5))
        if liger is not None:
            fns["liger"] = fwd_bwd(lambda x, w, b: liger(x, w, b, 1e-5))
        t, sp = _timed(timer, fns)
        nbytes = 5 * m * n * x.element_size()
        rows.append({"op": "layer_norm_fwd_bwd", "M": m, "N": n, "dtype": str(dtype), "seconds": t, "spread": sp,
                     "GBps": {k: nbytes / v / 1e9 for k, v in t.items()},
                     "speedup_vs_torch": t["torch"] / t["leanclip"]})
    return rows


def bench_frozen_linear(device, dtype, shapes, timer) -> list[dict]:
    """Backward only: dx (+ db) of a frozen linear, against bare dy@W (the cuBLAS floor) and torch eager."""
    rows = []
    for m, k, n in shapes:
        x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
        b = torch.zeros(n, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(m, n, device=device, dtype=dtype)
        y_ours = kernels.frozen_linear(x, w, b)
        y_torch = F.linear(x, w, b)
        fns = {
            "leanclip": lambda: torch.autograd.grad(y_ours, (x, b), dy, retain_graph=True),
            "torch": lambda: torch.autograd.grad(y_torch, (x, b), dy, retain_graph=True),
            "mm_only": lambda: dy @ w,
        }
        t, sp = _timed(timer, fns)
        rows.append({"op": "frozen_linear_bwd", "M": m, "K": k, "N": n, "dtype": str(dtype), "seconds": t,
                     "spread": sp, "ratio_vs_mm_only": t["leanclip"] / t["mm_only"],
                     "speedup_vs_torch": t["torch"] / t["leanclip"]})
    return rows


def bench_max_sim(device, dtype, shapes, timer) -> list[dict]:
    rows = []
    mm_max = lambda x, d: (x @ d.T).max(dim=1)
    compiled = torch.compile(mm_max) if device.type == "cuda" else None
    for n, m, k in shapes:
        x = torch.randn(n, k, device=device, dtype=dtype)
        d = torch.randn(m, k, device=device, dtype=dtype)
        fns = {"leanclip": lambda: kernels.max_sim(x, d), "mm+max": lambda: mm_max(x, d)}
        if compiled is not None:
            fns["torch.compile"] = lambda: compiled(x, d)
        t, sp = _timed(timer, fns)
        flops = 2 * n * m * k
        rows.append({"op": "max_sim", "N": n, "M": m, "K": k, "dtype": str(dtype), "seconds": t, "spread": sp,
                     "TFLOPs": {kk: flops / v / 1e12 for kk, v in t.items()},
                     "speedup_vs_mm_max": t["mm+max"] / t["leanclip"]})
    return rows


def run(quick: bool = False, output: str | None = None) -> dict:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    timer = _timer(cuda)
    if cuda:
        ln_shapes = [(8 * 197, 768), (64 * 197, 768), (256 * 257, 1024), (256 * 257, 1280)]
        fl_shapes = [(256 * 197, 768, 3072), (256 * 197, 3072, 768)]
        ms_shapes = [(4096, m, 512) for m in (16384, 65536, 262144, 1048576)]
        dtypes = [torch.bfloat16, torch.float32]
        mode = "cuda"
    else:
        ln_shapes = [(8 * 197, 768)] if quick else [(8 * 197, 768), (32 * 197, 1024)]
        fl_shapes = [(8 * 197, 768, 3072)] if quick else [(8 * 197, 768, 3072), (8 * 197, 3072, 768)]
        ms_shapes = [(256, 16384, 512)] if quick else [(256, 16384, 512), (1024, 65536, 512)]
        dtypes = [torch.float32]
        mode = "cpu-references"
    load_start = load_average()
    results = {"machine": machine(), "mode": mode, "backend_per_op": {}, "ceilings": ceilings(device), "rows": [],
               "threads": torch.get_num_threads(), "reps": None if cuda else CPU_REPS,
               "time_source": ("triton.testing.do_bench samples (warm-up, L2 flushed between calls), medians" if cuda
                               else f"{CPU_REPS} repetitions interleaved in one process, medians")}
    for op in ("layer_norm", "frozen_linear", "max_sim"):  # the backend in force (kernels.set_backend) or auto
        results["backend_per_op"][op] = kernels.resolve_backend(op, device)
    for dtype in dtypes:
        results["rows"] += bench_layer_norm(device, dtype, ln_shapes, timer)
        results["rows"] += bench_frozen_linear(device, dtype, fl_shapes, timer)
        if dtype != torch.float32 or not cuda:
            results["rows"] += bench_max_sim(device, dtype, ms_shapes, timer)
    results["load_average"] = {"start": load_start, "end": load_average()}
    results["warnings"] = [] if cuda else _warnings(results)
    if mode == "cpu-references":
        results["note"] = ("CPU box: Triton kernels cannot run at speed here; these time the torch references vs "
                           "plain torch. torch.compile and Liger are timed on CUDA only.")
    if output:
        name = f"ops-{results['machine']['device'].replace(' ', '_')}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        results["path"] = write_json(os.path.join(output, name), results)
    return results


def _warnings(results: dict) -> list[str]:
    """Why the CPU ratios may be off (``reliability_warnings``). A CUDA run is not judged: do_bench's samples are
    hundreds of short calls, a stray launch delay sets their max, and CUDA events do not see the CPU's load."""
    spreads = {f"{OPS[r['op']]['kernel']} {_shape(r)} {_dtype(r)} {_peer(r, k, results)}": sp
               for r in results["rows"] for k, sp in r["spread"].items()}
    load = results["load_average"]
    return reliability_warnings(spreads, load["start"], load["end"], results["threads"],
                                results["machine"]["cpu_count"], what="bench ops")


# How the table presents each op: its title, the shape keys in the order the shape is written and what they mean,
# the kernel name whose backend ran it, the throughput column (key in the row, unit) and the eager baseline.
OPS = {
    "layer_norm_fwd_bwd": {"title": "layer_norm forward + backward", "shape": ("M", "N"), "shape_doc": "rows x width",
                           "kernel": "layer_norm", "tput": ("GBps", "GB/s"), "base": "torch"},
    "frozen_linear_bwd": {"title": "frozen_linear backward (dx and db)", "shape": ("M", "K", "N"),
                          "shape_doc": "rows x in x out", "kernel": "frozen_linear", "tput": None, "base": "torch"},
    "max_sim": {"title": "max_sim (for each query, its best key)", "shape": ("N", "M", "K"),
                "shape_doc": "queries x keys x dim", "kernel": "max_sim", "tput": ("TFLOPs", "TFLOP/s"),
                "base": "mm+max"},
}
PEERS = {"torch": "torch eager", "torch.compile": "torch.compile", "liger": "Liger",
         "mm_only": "dy @ W alone (the GEMM floor)", "mm+max": "torch eager (x @ d.T).max"}


def _peer(row: dict, key: str, results: dict) -> str:
    """How the table names a contender: leanclip with the backend that ran it, the peers by what they are."""
    if key != "leanclip":
        return PEERS.get(key, key)
    backend = results["backend_per_op"].get(OPS.get(row["op"], {}).get("kernel"), "?")
    return f"leanclip ({'torch reference' if backend == 'torch' else backend})"


def _shape(row: dict) -> str:
    keys = OPS.get(row["op"], {}).get("shape", ("M", "N", "K"))
    return "x".join(str(row[k]) for k in keys if k in row)


def _dtype(row: dict) -> str:
    return row["dtype"].removeprefix("torch.")


def _sig(v, digits: int = 3) -> str:
    """``v`` to ``digits`` significant digits, trailing zeros kept (1.00, 0.930); a number that would need an
    exponent to drop digits left of the point is written whole (1234)."""
    if v is None:
        return ""
    out = f"{v:#.{digits}g}"
    return f"{v:.0f}" if "e" in out and abs(v) >= 1 else out.rstrip(".")


def summarize(results: dict) -> str:
    """Markdown: one table per op, one line per contender (median and range in ms, time / the eager baseline,
    throughput where the op has a floor in bytes or flops)."""
    m = results["machine"]
    load = results.get("load_average") or {}
    lines = [f"device: {m['device']} ({m.get('cpu')}), torch {m.get('torch')}, triton {m.get('triton')}; "
             f"mode: {results['mode']}; threads {results.get('threads')}, {m.get('cpu_count')} cores; "
             f"load average {_sig(load.get('start'), 2)} at start, {_sig(load.get('end'), 2)} at end",
             f"time: {results.get('time_source', 'medians')}"]
    if results.get("note"):
        lines.append(results["note"])
    if results["ceilings"]:
        c = results["ceilings"]
        lines.append(f"ceilings: copy {c['copy_GBps']:.0f} GB/s, bf16 matmul {c['bf16_mm_TFLOPs']:.0f} TFLOP/s")
    for op, how in OPS.items():
        rows = [r for r in results["rows"] if r["op"] == op]
        if rows:
            lines += ["", *_op_table(rows, how, results)]
    return "\n".join(lines)


def _op_table(rows: list[dict], how: dict, results: dict) -> list[str]:
    tput, base = how["tput"], how["base"]
    lines = [f"**{how['title']}**, shape {how['shape_doc']}", "",
             f"| shape | dtype | implementation | median ms | min / max ms | time / {PEERS[base]} |"
             + (f" {tput[1]} |" if tput else ""),
             "|---|---|---|---:|---:|---:|" + ("---:|" if tput else "")]
    for r in rows:
        shape, dtype = _shape(r), _dtype(r)
        for k, sec in r["seconds"].items():
            sp = (r.get("spread") or {}).get(k)
            rng = f"{_sig(sp['min'] * 1e3)} / {_sig(sp['max'] * 1e3)}" if sp else ""
            ratio = sec / r["seconds"][base] if r["seconds"].get(base) else None
            lines.append(f"| {shape} | {dtype} | {_peer(r, k, results)} | {_sig(sec * 1e3)} | {rng} | {_sig(ratio)} |"
                         + (f" {_sig(r[tput[0]][k])} |" if tput else ""))
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smallest shapes (CPU smoke run)")
    p.add_argument("--output", default=None, help="folder for the JSON result (e.g. bench/results)")
    args = p.parse_args(argv)
    res = run(quick=args.quick, output=args.output)
    print(summarize(res))
    warn_all(res["warnings"])
    if "path" in res:
        print(f"wrote {res['path']}")


if __name__ == "__main__":
    main()
