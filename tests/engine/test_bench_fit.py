"""`leanclip bench fit`: the search as a pure function over fake probes, the probe plumbing with faked processes,
bad inputs refused before any probe, and two short real CPU runs on the tiny model (probes in their own processes)."""
import json
import math
import os
import subprocess

import pytest
import torch

from leanclip.bench import fit
from leanclip.cli import main

GiB = 2**30


def _truth(peak, cap, max_batch):
    """Brute force: the largest batch in [1, max_batch] whose peak is at most cap (0 when none)."""
    return max([b for b in range(1, max_batch + 1) if peak(b) <= cap], default=0)


def _counting(peak):
    calls = []

    def probe(b):
        calls.append(b)
        return peak(b)
    return probe, calls


def _check_boundary(res, cap, max_batch):
    """The reported batch is a measured fit and largest + 1 a measured non-fit (or the reported batch is the bound)."""
    by_batch = {p["batch"]: p for p in res["probes"]}
    n = res["largest_batch"]
    if n:
        assert by_batch[n]["fits"] and res["peak_bytes"] == by_batch[n]["peak_bytes"] <= cap
    if n == max_batch:
        assert res["first_non_fit"] is None
    else:
        assert res["first_non_fit"] == n + 1 and not by_batch[n + 1]["fits"]
    assert all(1 <= b <= max_batch for b in by_batch)


SHAPES = {
    "linear": lambda b: 1000 + 100 * b,
    "convex": lambda b: 1000 + 30 * b + b * b,
    "concave": lambda b: 1000 + int(400 * math.sqrt(b)),
    "stairs": lambda b: 1000 + 250 * ((b + 3) // 4),  # chunked: flat within a chunk of 4
    "knee": lambda b: 1000 + (5 * b if b < 40 else 200 + 60 * (b - 40)),
    "cliff": lambda b: 1000 if b < 150 else 10**6,  # interpolation creeps by one batch: bisection must take over
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("cap", [1050, 1105, 1900, 3333, 4321, 9000, 10**9])
def test_search_finds_the_brute_force_boundary_and_confirms_it(shape, cap):
    peak = SHAPES[shape]
    probe, calls = _counting(peak)
    res = fit.search(probe, cap, max_batch=256)
    assert res["largest_batch"] == _truth(peak, cap, 256)
    _check_boundary(res, cap, 256)
    assert len(calls) == len(set(calls)) == len(res["probes"])  # no batch measured twice
    assert [p["batch"] for p in res["probes"]] == calls
    assert len(calls) <= 2 * math.ceil(math.log2(256)) + 4  # bisection bounds even a bad interpolation


def test_search_is_economical_on_a_linear_peak():
    """Two probes give the slope, the third lands on the boundary, the fourth confirms it: 4 probes for batch 37."""
    probe, calls = _counting(lambda b: 500 + 50 * b)
    res = fit.search(probe, 500 + 50 * 37 + 20, max_batch=1024)
    assert res["largest_batch"] == 37 and res["first_non_fit"] == 38
    assert calls == [4, 8, 37, 38]


def test_search_stops_at_max_batch_and_never_probes_above_it():
    probe, calls = _counting(lambda b: 10 * b)
    res = fit.search(probe, 10**12, max_batch=100)
    assert res["largest_batch"] == 100 and res["first_non_fit"] is None and max(calls) == 100
    # an extrapolated probe goes at most GROWTH times above the largest fit
    fits = []
    for b in calls:
        if fits:
            assert b <= fit.GROWTH * max(fits)
        fits.append(b)
    assert fit.search(lambda b: 1, 10, max_batch=2, start=4)["probes"][0]["batch"] == 2  # start clamped to the bound


def test_search_when_nothing_fits_and_when_probes_give_no_number():
    probe, calls = _counting(lambda b: 10**9)
    res = fit.search(probe, 10, max_batch=64)
    assert res["largest_batch"] == 0 and res["first_non_fit"] == 1 and res["peak_bytes"] is None
    assert calls[-1] == 1 and calls[0] == fit.START
    # a non-fit without a number (OOM-killed, or stopped by the watchdog) still bounds the search
    peak = SHAPES["linear"]
    probe, calls = _counting(lambda b: peak(b) if peak(b) <= 3333 else None)
    res = fit.search(probe, 3333, max_batch=256)
    assert res["largest_batch"] == _truth(peak, 3333, 256) == 23
    _check_boundary(res, 3333, 256)
    with pytest.raises(ValueError, match="max_batch"):
        fit.search(probe, 10, max_batch=0)


@pytest.mark.parametrize("text, value", [("3GiB", 3 * GiB), ("512mib", 512 * 2**20), ("40GB", 40 * 10**9),
                                         ("1234", 1234)])
def test_parse_bytes(text, value):
    assert fit.parse_bytes(text) == value


# ----------------------------------------------------------------------------------------- probe plumbing, faked
def _fake_run(monkeypatch, returncode, stdout="", stderr=""):
    seen = []

    def run(argv, **kw):
        seen.append((argv, kw["env"]))
        return subprocess.CompletedProcess(argv, returncode, stdout, stderr)
    monkeypatch.setattr(fit.subprocess, "run", run)
    return seen


PROBE_KW = dict(cap=GiB, n_classes=3, precision="fp32", scope="image", threads=1)


def test_probe_runs_one_process_with_the_malloc_setting(monkeypatch):
    line = json.dumps({"batch": 8, "fits": True, "peak_bytes": 5, "stopped": None})
    seen = _fake_run(monkeypatch, 0, stdout="noise\n" + line + "\n")
    rec = fit.probe_cpu("leanclip-tiny", "ln", "lean:block/4", 8, **PROBE_KW)
    assert rec["peak_bytes"] == 5 and rec["probe_seconds"] >= 0
    ((argv, env),) = seen
    assert env["MALLOC_MMAP_THRESHOLD_"] == "131072"
    assert argv[argv.index("--probe") + 1] == "8" and argv[argv.index("--modes") + 1] == "lean:block/4"
    assert argv[argv.index("--mem-cap") + 1] == str(GiB) and argv[argv.index("--threads") + 1] == "1"


def test_an_oom_killed_probe_does_not_fit_and_a_crash_is_an_error(monkeypatch):
    _fake_run(monkeypatch, -9)
    rec = fit.probe_cpu("leanclip-tiny", "ln", "plain", 8, **PROBE_KW)
    assert rec["fits"] is False and rec["peak_bytes"] is None and "OOM" in rec["stopped"]
    _fake_run(monkeypatch, 1, stderr="Traceback\nKeyError: 'x'\n")
    with pytest.raises(RuntimeError, match="KeyError: 'x'"):
        fit.probe_cpu("leanclip-tiny", "ln", "plain", 8, **PROBE_KW)


def test_measure_here_counts_memory_errors_as_not_fitting(monkeypatch):
    import leanclip.bench.step as step

    for exc in (MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 bytes")):
        def boom(*a, exc=exc, **k):
            raise exc
        monkeypatch.setattr(step, "make_step", boom)
        rec = fit.measure_here("leanclip-tiny", "ln", "plain", 2, cap=2**50)  # the watchdog never fires here
        assert rec["fits"] is False and rec["peak_bytes"] is None and rec["stopped"].startswith("out of memory")
    monkeypatch.setattr(step, "make_step", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        fit.measure_here("leanclip-tiny", "ln", "plain", 2, cap=2**50)


def test_a_compiled_mode_that_fails_is_set_aside_an_eager_one_stops_the_run():
    def measure(mode, b):
        if mode.startswith("plain+compile"):
            raise RuntimeError("dynamo could not trace")
        return {"batch": b, "fits": b <= 6, "peak_bytes": 100 * b, "stopped": None}

    results, failed = fit._search_modes(measure, ["plain", "plain+compile"], 650, 64, None)
    assert results["plain"]["largest_batch"] == 6 and "dynamo" in failed["plain+compile"]
    assert all("stopped" in p and "fits" in p for p in results["plain"]["probes"])
    with pytest.raises(RuntimeError):
        fit._search_modes(lambda m, b: (_ for _ in ()).throw(RuntimeError("bug")), ["plain"], 650, 64, None)


def _result(results, **extra):
    machine = {"device": "cpu", "cpu": "Some CPU", "cpu_count": 2, "torch": "2.x"}
    return {"model": "ViT-B-16", "method": "ln", "precision": "fp32", "scope": "image", "n_classes": 100,
            "mem_cap_bytes": 3 * GiB, "device": "cpu", "compared_with_cap": fit.COMPARED, "probe_env": fit.PROBE_ENV,
            "machine": machine, "threads": 1, "load_average": {"start": 1.5, "end": None}, "max_batch": 64,
            "results": results, "failed": {"plain+compile": "did not trace"}, **extra}


def test_summary_names_the_compared_quantity_the_machine_and_each_mode():
    plain = {"largest_batch": 16, "peak_bytes": 3000 * 2**20, "before_step_bytes": 1400 * 2**20,
             "first_non_fit": 17, "probes": [{}] * 4}
    lean = {"largest_batch": 64, "peak_bytes": 2000 * 2**20, "before_step_bytes": 1400 * 2**20,
            "first_non_fit": None, "probes": [{}] * 3}
    out = fit.summarize(_result({"plain": plain, "lean:block/4": lean},
                                ratio_vs_plain={"plain": 1.0, "lean:block/4": 4.0}))
    assert "memory cap 3 GiB (3221225472 bytes) on cpu" in out and "MALLOC_MMAP_THRESHOLD_=131072" in out
    assert "compared with the cap: peak memory of the second training step" in out
    assert "Some CPU" in out and "1 threads" in out and "load average 1.50 at start, unknown at end" in out
    assert "| plain | 16 | 3000 | 1400 | 1.00 | 17 | 4 |" in out
    assert "| lean:block/4 | 64 | 2000 | 1400 | 4.00 | none up to 64 | 3 |" in out
    assert "| plain+compile | did not run: did not trace |" in out
    one = {"batch": 8, "fits": False, "probes": [{"peak_bytes": None, "stopped": "killed (SIGKILL, the OOM killer)"}]}
    out = fit.summarize(_result({"plain": one}))
    assert "| plain | 8 | no | killed (SIGKILL, the OOM killer) |" in out


# ------------------------------------------------------------------------------------------------- bad inputs
def _no_probe(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a probe process was started")
    monkeypatch.setattr(fit.subprocess, "run", refuse)


@pytest.mark.parametrize("extra, needle", [
    (["--mem-cap", "0"], "--mem-cap"),
    (["--mem-cap", "-3GiB"], "--mem-cap"),
    (["--mem-cap", "lots"], "--mem-cap"),
    (["--mem-cap", "100000GiB"], "larger than"),
    (["--modes", "lean:sometimes"], "--modes"),
    (["--modes", "plain,floor:image"], "floor:image"),
    (["--modes", ","], "--modes"),
    (["--max-batch", "0"], "--max-batch"),
    (["--threads", "0"], "--threads"),
    (["--model", "ViT-Nope"], "ViT-Nope"),
    (["--method", "nope"], "--methods"),
])
def test_bench_fit_bad_input_is_one_line_before_any_probe(extra, needle, tmp_path, monkeypatch, capsys):
    _no_probe(monkeypatch)
    out = tmp_path / "out"
    argv = ["bench", "fit", "--model", "leanclip-tiny", "--method", "ln", "--device", "cpu", "--mem-cap", "1GiB",
            "--output", str(out)] + extra
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("leanclip: error: ") and needle in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_bench_fit_cuda_without_gpu_exits_2(monkeypatch, capsys):
    _no_probe(monkeypatch)
    assert main(["bench", "fit", "--device", "cuda", "--model", "leanclip-tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device cuda" in err and "CUDA" in err


# ------------------------------------------------------------------------------------------ real CPU probes
def test_bench_fit_cpu_measures_each_probe_in_its_own_process(tmp_path, capsys):
    """Tiny model, 2 modes, --max-batch 2 under a cap the tiny steps fit: one probe process per mode, each with the
    malloc setting, its peak = RSS before + growth, all in the JSON written atomically in --output."""
    rc = main(["bench", "fit", "--model", "leanclip-tiny", "--method", "ln", "--device", "cpu", "--mem-cap",
               "3GiB", "--modes", "plain,lean:block", "--scope", "image", "--threads", "1", "--max-batch", "2",
               "--classes", "3", "--output", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    (js,) = tmp_path.glob("fit-cpu-*-leancliptiny-image-ln-3gib.json")
    assert out.strip().splitlines()[-1] == f"wrote {js}"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left
    res = json.loads(js.read_text())
    assert res["mem_cap_bytes"] == 3 * GiB and res["device"] == "cpu" and res["threads"] == 1
    assert res["probe_env"] == {"MALLOC_MMAP_THRESHOLD_": "131072"}
    assert "RSS before the step" in res["compared_with_cap"]
    assert set(res["load_average"]) == {"start", "end"} and res["machine"]["cpu"]
    pids = set()
    for mode in ("plain", "lean:block"):
        r = res["results"][mode]
        assert r["largest_batch"] == 2 and r["first_non_fit"] is None and res["ratio_vs_plain"][mode] == 1.0
        (p,) = r["probes"]
        assert p["fits"] and p["malloc_mmap_threshold"] == "131072" and p["pid"] != os.getpid()
        assert p["peak_bytes"] == p["rss_before_bytes"] + p["step_growth_bytes"] <= 3 * GiB
        assert p["rss_before_bytes"] > 0 and p["step_growth_bytes"] >= 0 and r["peak_bytes"] == p["peak_bytes"]
        assert r["before_step_bytes"] == p["rss_before_bytes"]
        pids.add(p["pid"])
    assert len(pids) == 2
    assert "| mode | largest batch | its peak MiB |" in out and "| lean:block | 2 |" in out
    assert "compared with the cap: peak memory of the second training step" in out and "load average" in out


def test_bench_fit_cpu_under_a_cap_below_the_runtime_fits_nothing(tmp_path, capsys):
    """A cap below what the Python / torch runtime alone holds: the probe's watchdog stops it, batch 1 does not fit."""
    assert main(["bench", "fit", "--model", "leanclip-tiny", "--method", "ln", "--device", "cpu", "--mem-cap",
                 "64MiB", "--modes", "lean:block/4", "--max-batch", "1", "--classes", "3", "--output",
                 str(tmp_path)]) == 0
    (js,) = tmp_path.glob("fit-cpu-*.json")
    r = json.loads(js.read_text())["results"]["lean:block/4"]
    assert r["largest_batch"] == 0 and r["first_non_fit"] == 1 and r["peak_bytes"] is None
    (p,) = r["probes"]
    assert not p["fits"] and p["peak_at_least_bytes"] > 64 * 2**20 and "passed" in p["stopped"]
    assert "| lean:block/4 | 0 |" in capsys.readouterr().out


def test_lean_fit_plans_for_what_the_cap_leaves(monkeypatch):
    """``lean:fit``: the blocks are planned for the cap less what is resident after a one-sample warm-up step (the
    model, the batch, what a first step leaves); a cap that leaves less than the smallest plan is a non-fit record,
    not an error."""
    import open_clip

    from leanclip import budget
    from leanclip.bench import step as bench_step
    from leanclip.configs import register_tiny_config

    seen = {}
    real_plan = budget.plan_recompute

    def plan(model, limit, batch, **kw):
        seen.update(limit=limit, batch=batch, warmed=any(p.grad is not None for p in model.parameters()), **kw)
        return real_plan(model, limit, batch, **kw)
    monkeypatch.setattr(bench_step, "plan_recompute", plan)
    monkeypatch.setattr(bench_step, "rss_now", lambda: 100 * 2**20)
    step, _, model = bench_step.make_step(register_tiny_config(), "ln", "lean:fit", batch_size=4, n_classes=3,
                                          device=torch.device("cpu"), tokenizer=open_clip.get_tokenizer("ViT-B-16"),
                                          scope="image", cap=GiB)
    assert seen == {"limit": int(bench_step.FIT_MARGIN * (GiB - 100 * 2**20)), "batch": 4, "warmed": True,
                    "text_batch_size": 0}
    assert {b.leanclip_recompute for b in model.visual.transformer.resblocks} == {"none"}  # plenty left: no recompute
    step()
    with pytest.raises(ValueError, match="--mem-cap"):
        bench_step.make_step(register_tiny_config(), "ln", "lean:fit", batch_size=4, n_classes=3,
                             device=torch.device("cpu"), tokenizer=open_clip.get_tokenizer("ViT-B-16"), scope="image")

    class NoWatch:  # the probe's watchdog stops the process past 2x the cap: not in a test's process
        def __init__(self, *a):
            pass

        def stop(self):
            pass
    monkeypatch.setattr(fit, "_Watchdog", NoWatch)
    rec = fit.measure_here("leanclip-tiny", "ln", "lean:fit", 4, cap=100 * 2**20 + 1000, n_classes=3, scope="image")
    assert rec["fits"] is False and rec["stopped"].startswith("no plan fits"), rec


def test_budget_modes_parse():
    from leanclip.bench.step import parse_mode

    assert parse_mode("lean:budget:0.2")["memory_budget"] == "0.2"
    assert parse_mode("lean:budget:3GiB+compile")["compile"] is True
    assert parse_mode("lean:fit")["memory_budget"] == "fit"
    with pytest.raises(ValueError, match="lean:budget:lots"):
        parse_mode("lean:budget:lots")
