"""Op benchmarks: kernels.* against torch eager, torch.compile and (if installed) Liger, with device ceilings.

    python -m leanclip.bench.ops                      # CUDA: full CLIP shapes; CPU: references only, small shapes
    python -m leanclip.bench.ops --output bench/results --quick

Floors (docs/MEASURING.md): layer_norm fwd+bwd moves ~5*M*N*elem bytes -> GB/s vs a measured device copy;
frozen_linear backward should cost one dx GEMM (db rides along) -> ratio vs bare ``dy @ W``;
max_sim does 2*N*M*K flops -> TFLOP/s vs a measured bf16 matmul.
On a CPU box the Triton kernels cannot run (the interpreter is a test tool, not a speed), so the CPU run times the
torch references against plain torch and says so in the JSON (``"mode": "cpu-references"``).
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from leanclip import kernels
from leanclip.bench.common import cuda_ms, interleaved_medians, machine, write_json


def _timer(cuda: bool):
    if cuda:
        return lambda fns: {k: cuda_ms(f) / 1e3 for k, f in fns.items()}
    return lambda fns: interleaved_medians(fns, reps=5)


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
        t = timer(fns)
        nbytes = 5 * m * n * x.element_size()
        rows.append({"op": "layer_norm_fwd_bwd", "M": m, "N": n, "dtype": str(dtype), "seconds": t,
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
        t = timer(fns)
        rows.append({"op": "frozen_linear_bwd", "M": m, "K": k, "N": n, "dtype": str(dtype), "seconds": t,
                     "ratio_vs_mm_only": t["leanclip"] / t["mm_only"], "speedup_vs_torch": t["torch"] / t["leanclip"]})
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
        t = timer(fns)
        flops = 2 * n * m * k
        rows.append({"op": "max_sim", "N": n, "M": m, "K": k, "dtype": str(dtype), "seconds": t,
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
    results = {"machine": machine(), "mode": mode, "backend_per_op": {}, "ceilings": ceilings(device), "rows": []}
    for op in ("layer_norm", "frozen_linear", "max_sim"):  # the backend in force (kernels.set_backend) or auto
        results["backend_per_op"][op] = kernels._backend.resolve(op, device)
    for dtype in dtypes:
        results["rows"] += bench_layer_norm(device, dtype, ln_shapes, timer)
        results["rows"] += bench_frozen_linear(device, dtype, fl_shapes, timer)
        if dtype != torch.float32 or not cuda:
            results["rows"] += bench_max_sim(device, dtype, ms_shapes, timer)
    if mode == "cpu-references":
        results["note"] = "CPU box: Triton kernels cannot run at speed here; these time the torch references vs plain torch."
    if output:
        name = f"ops-{results['machine']['device'].replace(' ', '_')}-{time.strftime('%Y%m%d')}.json"
        results["path"] = write_json(os.path.join(output, name), results)
    return results


def summarize(results: dict) -> str:
    lines = [f"device: {results['machine']['device']}  mode: {results['mode']}  backends: {results['backend_per_op']}"]
    if results["ceilings"]:
        c = results["ceilings"]
        lines.append(f"ceilings: copy {c['copy_GBps']:.0f} GB/s, bf16 matmul {c['bf16_mm_TFLOPs']:.0f} TFLOP/s")
    for r in results["rows"]:
        shape = "x".join(str(r[k]) for k in ("M", "N", "K") if k in r)
        ms = "  ".join(f"{k} {v * 1e3:.3f} ms" for k, v in r["seconds"].items())
        ratio = {k: v for k, v in r.items() if k.startswith(("speedup", "ratio"))}
        lines.append(f"{r['op']:<20} {shape:<18} {r['dtype']:<15} {ms}  {ratio}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smallest shapes (CPU smoke run)")
    p.add_argument("--output", default=None, help="folder for the JSON result (e.g. bench/results)")
    args = p.parse_args(argv)
    res = run(quick=args.quick, output=args.output)
    print(summarize(res))
    if "path" in res:
        print(f"wrote {res['path']}")


if __name__ == "__main__":
    main()
