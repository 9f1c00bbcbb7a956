"""Largest batch whose training step fits a memory cap, per mode (plain PyTorch, its peers and leanclip).

What is compared with the cap, per (mode, batch) probe: the memory in use at the peak of the *second* training step
(the first is a warm-up), i.e. what the process holds before that step (model, optimizer state, inputs, and on CPU
the Python / torch runtime itself) plus the most the step adds on top of it.

- CPU: every probe is a fresh process (``leanclip bench fit --probe B``) started with ``MALLOC_MMAP_THRESHOLD_=131072``
  so that its resident set tracks live tensors (docs/MEASURING.md); the peak is the process's peak resident set
  (VmHWM) during the second step, i.e. RSS before the step + the step's peak RSS growth
  (``leanclip.bench.common.rss_step_peak``, the measurement ``bench step --isolate`` uses). A probe fits when that
  peak is at most the cap. A probe the OOM killer ends, or that raises MemoryError / torch's "can't allocate
  memory", does not fit; so does one whose peak passes twice the cap at any point (a watchdog thread stops it there,
  so an oversized probe does not crowd a shared machine). Memory of inductor's compile workers (separate processes)
  is not counted.
- CUDA: the allocator is capped with ``torch.cuda.set_per_process_memory_fraction`` and probes run in this process;
  the peak is ``torch.cuda.max_memory_allocated`` over the second step (reset before it, so it includes what is
  allocated before the step). A probe fits when it ran without an out-of-memory error.

Search, per mode (:func:`search`, pure): probe a start batch, then grow (doubling, or a linear extrapolation of the
peak in the batch from the two largest fits, at most ``GROWTH`` times the largest fit) until a probe does not fit or
``max_batch`` fits; then narrow the bracket by linear interpolation between the measured peaks next to the boundary,
falling back to bisection when interpolation stops halving it. It ends when the largest fit and the smallest
non-fit are one batch apart (or the largest fit is ``max_batch``): the reported batch is a measured fit and batch + 1
a measured non-fit. Peak memory is close to linear in the batch, so a ViT-B-16 mode usually needs 4 to 6 probes.
Nothing is cached across runs.
"""
from __future__ import annotations

import gc
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from typing import Callable

import torch

from leanclip import utils
from leanclip.bench.common import proc_status_bytes, bench_tokenizer, load_average, machine, rss_step_peak
from leanclip.utils import get_logger

DEFAULT_MODES = ("plain", "plain+gc", "plain+compile+budget:0.1", "lean:fit")
START = 4  # first probe: cheap on any model, and two probes from it give the first slope
GROWTH = 8  # an extrapolated probe goes at most this many times above the largest fit (a bad slope costs one probe)
DEFAULT_MAX_BATCH = 1024
# glibc returns every allocation above 128 KiB to the OS when it is freed: RSS then tracks live tensors
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
# a probe process whose peak RSS passes this many times the cap is stopped (a non-fit without a number); below it a
# non-fit runs to its end, and its measured peak sharpens the next probe's interpolation
LIMIT_FACTOR = 2
COMPARED = ("peak memory of the second training step: RSS before the step (model, optimizer state, inputs, runtime) "
            "+ the step's peak RSS growth (VmHWM), one process per probe")
COMPARED_CUDA = "torch.cuda.max_memory_allocated over the second training step (reset before it)"


def parse_bytes(text: str) -> int:
    """``--mem-cap``: a size such as ``16GiB``, ``40GB`` or ``8000MiB`` in bytes."""
    return utils.parse_bytes(text, "--mem-cap")


# ---------------------------------------------------------------------------------------------------------- search
def search(probe: Callable[[int], int | None], cap: int, *, max_batch: int = DEFAULT_MAX_BATCH,
           start: int = START) -> dict:
    """Largest batch in [1, max_batch] whose ``probe(batch)`` (peak bytes, None when the probe did not fit without a
    number) is at most ``cap``, assuming the peak grows with the batch. Returns ``{"largest_batch"`` (0 when batch 1
    does not fit), ``"peak_bytes"`` (of that batch), ``"first_non_fit"`` (largest + 1, measured; None when
    ``max_batch`` fits), ``"probes"``: ``[{"batch", "peak_bytes", "fits"}]`` in the order measured``}``."""
    if max_batch < 1 or start < 1:
        raise ValueError(f"max_batch and start must be at least 1, got {max_batch} and {start}")
    probes: list[dict] = []
    lo, hi = 0, max_batch + 1  # lo: largest measured fit (0: none); hi: smallest measured non-fit, or past the bound
    batch, stalls = min(start, max_batch), 0
    while True:
        peak = probe(batch)
        fits = peak is not None and peak <= cap
        probes.append({"batch": batch, "peak_bytes": peak, "fits": fits})
        bracketed, width = lo > 0 and hi <= max_batch, hi - lo
        lo, hi = (batch, hi) if fits else (lo, batch)
        if hi - lo <= 1:
            break
        stalls = stalls + 1 if bracketed and 2 * (hi - lo) > width else 0
        batch = _next_batch(probes, lo, hi, cap, bisect=stalls >= 2)
    peaks = {p["batch"]: p["peak_bytes"] for p in probes}
    return {"largest_batch": lo, "peak_bytes": peaks.get(lo), "first_non_fit": hi if hi <= max_batch else None,
            "probes": probes}


def _next_batch(probes: list[dict], lo: int, hi: int, cap: int, *, bisect: bool) -> int:
    """The next batch to probe, strictly between ``lo`` (largest fit, 0: none) and ``hi`` (smallest non-fit or one
    past the bound): the batch where the peak, linear in the batch through two measured points, reaches ``cap``."""
    bracketed = any(p["batch"] == hi and not p["fits"] for p in probes)
    upper = hi - 1 if bracketed else min(hi - 1, GROWTH * lo)
    guess = None
    if not bisect and lo > 0:
        measured = {p["batch"]: p["peak_bytes"] for p in probes if p["peak_bytes"] is not None}
        below = sorted(b for b in measured if b < lo)
        above = sorted(b for b in measured if b >= hi)
        other = above[0] if above else (below[-1] if below else None)  # across the boundary if measured, else below
        if other is not None:
            slope = (measured[other] - measured[lo]) / (other - lo)
            if slope > 0:
                guess = lo + math.floor((cap - measured[lo]) / slope)
        if guess is None and not above:
            guess = 2 * lo  # one point or a flat slope: doubling
    if guess is None:
        guess = (lo + hi) // 2
    return max(lo + 1, min(upper, guess))


# ---------------------------------------------------------------------------------------------- one probe on CPU
class _Watchdog:
    """Ends this probe process once its peak resident set passes ``limit``, after printing the probe's non-fit as
    its one JSON line: a probe far over the cap would only crowd the machine, and its exact peak is not needed."""

    def __init__(self, record: dict, limit: int):
        self.record, self.limit = record, limit
        threading.Thread(target=self._watch, daemon=True).start()

    def stop(self) -> None:
        self.limit = None

    def _watch(self) -> None:
        while (limit := self.limit) is not None:
            peak = proc_status_bytes("VmHWM")
            if peak is not None and peak > limit:
                print(json.dumps({**self.record, "fits": False, "peak_bytes": None, "peak_at_least_bytes": peak,
                                  "stopped": f"peak RSS passed {limit} bytes ({LIMIT_FACTOR} x the cap)"}),
                      flush=True)
                os._exit(0)
            time.sleep(0.01)


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "can't allocate memory" in str(exc)


def measure_here(model_name, method, mode, batch, *, cap, n_classes=100, precision="fp32", scope="full") -> dict:
    """One CPU probe in this process (run by ``leanclip bench fit --probe``): build ``mode`` at ``batch``, one
    warm-up step, then the second step's peak resident set (``rss_step_peak``) against ``cap``."""
    from leanclip.bench.step import make_step
    from leanclip.configs import register_tiny_config

    register_tiny_config()
    record = {"batch": batch, "pid": os.getpid(),
              "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    watch = _Watchdog(record, LIMIT_FACTOR * cap)
    try:
        step, _, _ = make_step(model_name, method, mode, batch_size=batch, n_classes=n_classes,
                               device=torch.device("cpu"), tokenizer=bench_tokenizer(model_name),
                               precision=precision, scope=scope, cap=cap)
        t0 = time.perf_counter()
        step()
        record["warmup_seconds"] = time.perf_counter() - t0
        record["warmup_peak_bytes"] = proc_status_bytes("VmHWM")
        t0 = time.perf_counter()
        measured = rss_step_peak(step)
        record["step_seconds"] = time.perf_counter() - t0
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
        return {**record, "fits": False, "peak_bytes": None, "stopped": f"out of memory: {str(exc)[:200]}"}
    except ValueError as exc:  # lean:fit: no recompute plan is predicted to fit what the cap leaves
        if "below the smallest predicted step peak" not in str(exc):
            raise
        return {**record, "fits": False, "peak_bytes": None, "stopped": f"no plan fits: {str(exc)[:200]}"}
    finally:
        watch.stop()
    if measured is None:
        raise RuntimeError("cannot measure a CPU peak here: /proc/self/clear_refs is not writable")
    before, peak = measured
    return {**record, "fits": peak <= cap, "peak_bytes": peak, "rss_before_bytes": before,
            "step_growth_bytes": peak - before, "stopped": None}


def _probe_argv(model_name, method, mode, batch, *, cap, n_classes, precision, scope, threads) -> list[str]:
    argv = [sys.executable, "-m", "leanclip", "bench", "fit", "--probe", str(batch), "--model", model_name,
            "--method", method, "--modes", mode, "--mem-cap", str(cap), "--device", "cpu", "--classes",
            str(n_classes), "--precision", precision, "--scope", scope]
    return argv + (["--threads", str(threads)] if threads else [])


def probe_cpu(model_name, method, mode, batch, **kw) -> dict:
    """One CPU probe in a fresh process (``measure_here``'s record; OOM-killed: a non-fit), environment as
    ``bench step --isolate`` gives its children plus ``PROBE_ENV``. RuntimeError when the probe failed otherwise."""
    from leanclip.bench.step import child_env

    t0 = time.perf_counter()
    proc = subprocess.run(_probe_argv(model_name, method, mode, batch, **kw), capture_output=True, text=True,
                          env={**child_env(), **PROBE_ENV})
    wall = time.perf_counter() - t0
    if proc.returncode == -9:  # SIGKILL: the kernel's OOM killer
        return {"batch": batch, "fits": False, "peak_bytes": None, "stopped": "killed (SIGKILL, the OOM killer)",
                "probe_seconds": wall}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"bench fit --modes {mode} at batch {batch} failed in its own process: {tail}")
    return {**json.loads(lines[-1]), "probe_seconds": wall}


# --------------------------------------------------------------------------------------------- one probe on CUDA
def probe_cuda(model_name, method, mode, batch, *, n_classes, precision, scope, tokenizer, cap=None) -> dict:
    """One probe in this process under the allocator cap (set by :func:`run`): the second step's allocator peak, or
    a non-fit on CUDA out-of-memory."""
    from leanclip.bench.step import make_step

    device, step = torch.device("cuda"), None
    try:
        step, _, _ = make_step(model_name, method, mode, batch_size=batch, n_classes=n_classes, device=device,
                               tokenizer=tokenizer, precision=precision, scope=scope, cap=cap)
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"batch": batch, "fits": True, "peak_bytes": peak, "allocated_before_bytes": before, "stopped": None}
    except torch.OutOfMemoryError:
        return {"batch": batch, "fits": False, "peak_bytes": None, "stopped": "CUDA out of memory under the cap"}
    except ValueError as exc:  # lean:fit: no recompute plan is predicted to fit what the cap leaves
        if "below the smallest predicted step peak" not in str(exc):
            raise
        return {"batch": batch, "fits": False, "peak_bytes": None, "stopped": f"no plan fits: {str(exc)[:200]}"}
    finally:
        step = None
        gc.collect()
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------------ run
def check_inputs(device: str, cap: int, modes: list[str]) -> None:
    """What must hold before the first probe (ValueError, one line): known modes that train, a device that exists,
    a cap the device can hold, and on CPU a way to reset the peak resident set."""
    from leanclip.bench.step import parse_mode

    if not modes:
        raise ValueError("--modes: give at least one mode")
    for mode in modes:
        if parse_mode(mode)["kind"] == "floor":
            raise ValueError(f"--modes: {mode} is a lower bound, not a training step; bench fit compares plain and "
                             f"lean modes")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        total = torch.cuda.get_device_properties(0).total_memory
        where = "the device's"
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        where = "this machine's"
        if not os.access("/proc/self/clear_refs", os.W_OK):
            raise ValueError("bench fit on CPU needs Linux's /proc/self/clear_refs to measure a step's peak RSS")
    if cap > total:
        raise ValueError(f"--mem-cap {cap / 2**30:.3g} GiB is larger than {where} {total / 2**30:.3g} GiB")


def run(model_name, method, mem_cap: int, *, modes=DEFAULT_MODES, device="cpu", n_classes=100, precision=None,
        scope="full", threads=None, max_batch=DEFAULT_MAX_BATCH, batch=None) -> dict:
    """Per mode: the largest batch under ``mem_cap`` bytes (:func:`search`) or, with ``batch``, that one probe."""
    modes = list(modes)
    check_inputs(device, mem_cap, modes)
    precision = precision or ("bf16" if device == "cuda" else "fp32")
    if threads:
        torch.set_num_threads(threads)
    kw = dict(n_classes=n_classes, precision=precision, scope=scope)
    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction(mem_cap / torch.cuda.get_device_properties(0).total_memory)
        kw.update(tokenizer=bench_tokenizer(model_name), cap=mem_cap)
    else:
        kw.update(cap=mem_cap, threads=threads)

    def measure(mode, b):
        return (probe_cuda if device == "cuda" else probe_cpu)(model_name, method, mode, b, **kw)
    res = {"model": model_name, "method": method, "device": device, "precision": precision, "scope": scope,
           "n_classes": n_classes, "threads": threads or torch.get_num_threads(), "mem_cap_bytes": mem_cap,
           "max_batch": max_batch, "compared_with_cap": COMPARED_CUDA if device == "cuda" else COMPARED,
           "probe_env": {} if device == "cuda" else PROBE_ENV, "machine": machine(), "modes": modes,
           "load_average": {"start": load_average()}}
    t0 = time.perf_counter()
    res["results"], res["failed"] = _search_modes(measure, modes, mem_cap, max_batch, batch)
    res["load_average"]["end"] = load_average()
    res["seconds"] = time.perf_counter() - t0
    if batch is None:
        plain = (res["results"].get("plain") or {}).get("largest_batch")
        res["ratio_vs_plain"] = {m: (r["largest_batch"] / plain if plain else None)
                                 for m, r in res["results"].items()}
    return res


def _search_modes(measure, modes, cap, max_batch, batch) -> tuple[dict, dict]:
    """Each mode's search (or its one probe at ``batch``) with every probe's record; a compiled mode that fails
    for another reason than memory is set aside under ``failed`` (a mode that does not trace is a result)."""
    from leanclip.bench.step import parse_mode

    log = get_logger()
    results, failed = {}, {}
    for mode in modes:
        records: dict[int, dict] = {}

        def probe(b, mode=mode, records=records):
            rec = records[b] = measure(mode, b)
            peak = rec.get("peak_bytes")
            shown = f"{peak / 2**20:.0f} MiB" if peak is not None else rec.get("stopped")
            log.info("bench fit: %s batch %d: %s, %s", mode, b, shown, "fits" if rec["fits"] else "does not fit")
            return peak

        try:
            if batch is not None:
                probe(batch)
                results[mode] = {"batch": batch, "fits": records[batch]["fits"], "probes": [records[batch]]}
                continue
            found = search(probe, cap, max_batch=max_batch)
        except RuntimeError as exc:
            if not parse_mode(mode)["compile"]:
                raise
            failed[mode] = str(exc)[:600]
            continue
        found["probes"] = [{**records[p["batch"]], **p} for p in found["probes"]]
        best = records.get(found["largest_batch"]) or {}
        found["before_step_bytes"] = best.get("rss_before_bytes", best.get("allocated_before_bytes"))
        results[mode] = found
    return results, failed


# -------------------------------------------------------------------------------------------------------- output
def result_name(res: dict, cap_text: str) -> str:
    """``fit-<device>-<date-time>-<model>-<scope>-<method>-<cap>.json``, e.g.
    ``fit-cpu-20261202-141500-vitb16-image-ln-3gib.json``."""
    def slug(s):
        return re.sub(r"[^0-9a-z.]", "", str(s).lower())

    device = res["machine"]["device"].replace(" ", "_") if res["device"] == "cuda" else "cpu"
    return (f"fit-{device}-{time.strftime('%Y%m%d-%H%M%S')}-{slug(res['model'])}-{res['scope']}-"
            f"{slug(res['method'])}-{slug(cap_text)}.json")


def _load(v) -> str:
    return "unknown" if v is None else f"{v:.2f}"


def _mib(v) -> str:
    return "" if v is None else f"{v / 2**20:.0f}"


def summarize(res: dict) -> str:
    """Markdown: the setup, what is compared with the cap, the machine, then one row per mode."""
    m, load = res["machine"], res["load_average"]
    lines = [f"{res['model']} {res['method']}, {res['precision']}, scope {res['scope']}, {res['n_classes']} classes; "
             f"memory cap {res['mem_cap_bytes'] / 2**30:.3g} GiB ({res['mem_cap_bytes']} bytes) on {res['device']}",
             f"compared with the cap: {res['compared_with_cap']}"
             + ("".join(f", {k}={v}" for k, v in res["probe_env"].items())),
             f"machine: {m['device']} ({m['cpu']}), {m['cpu_count']} cores, {res['threads']} threads, torch "
             f"{m['torch']}; load average {_load(load.get('start'))} at start, {_load(load.get('end'))} at end", ""]
    if any("fits" in r for r in res["results"].values()):
        lines += ["| mode | batch | fits | peak MiB |", "|---|---:|---|---:|"]
        for mode, r in res["results"].items():
            p = r["probes"][0]
            lines.append(f"| {mode} | {r['batch']} | {'yes' if r['fits'] else 'no'} | "
                         f"{_mib(p.get('peak_bytes')) or p.get('stopped')} |")
    else:
        lines += ["| mode | largest batch | its peak MiB | of which before the step MiB | batch / plain | "
                  "smallest batch over the cap | probes |", "|---|---:|---:|---:|---:|---:|---:|"]
        for mode, r in res["results"].items():
            ratio = res["ratio_vs_plain"].get(mode)
            over = r["first_non_fit"] if r["first_non_fit"] is not None else f"none up to {res['max_batch']}"
            lines.append(f"| {mode} | {r['largest_batch']} | {_mib(r['peak_bytes'])} | "
                         f"{_mib(r.get('before_step_bytes'))} | {'' if ratio is None else format(ratio, '.2f')} | "
                         f"{over} | {len(r['probes'])} |")
    lines += [f"| {mode} | did not run: {why} | | | | | |" for mode, why in res["failed"].items()]
    return "\n".join(lines)
