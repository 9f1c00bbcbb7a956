"""`leanclip bench` CLI paths at tiny sizes (timings are never asserted: only that the JSON/plot are written)."""
import json
import os

import pytest
import torch

from leanclip.cli import main


def test_bench_step_quick_writes_json_and_plot(tmp_path):
    rc = main(["bench", "step", "--quick", "--methods", "ln", "--policies", "none,mlp+qkv", "--reps", "1",
               "--floor", "--output", str(tmp_path)])
    assert rc == 0
    (js,) = tmp_path.glob("step-*.json")
    (png,) = tmp_path.glob("step-*.png")
    res = json.loads(js.read_text())
    assert png.stat().st_size > 0
    row = res["rows"][0]
    assert res["modes"] == ["plain", "plain+gc", "lean:none", "lean:mlp+qkv", "floor:image"]
    assert set(row["seconds"]) == set(res["modes"])
    assert row["saved_ratio_vs_plain"]["plain"] == 1.0
    # recompute keeps strictly less for backward than the eager baseline (byte counts are deterministic)
    assert row["saved_bytes"]["lean:mlp+qkv"] < row["saved_bytes"]["lean:none"] < row["saved_bytes"]["plain"]
    assert row["saved_bytes"]["floor:image"] < row["saved_bytes"]["lean:none"]  # no text tower on the grad path
    assert res["machine"]["device"] in ("cpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")


def test_bench_ops_quick_cpu_table_and_default_folder(tmp_path, monkeypatch, capsys):
    """Without --output the JSON goes to ./leanclip-bench/ of the working directory; the table names every
    contender, gives ratios to 3 significant digits and keeps the raw numbers for the JSON."""
    if torch.cuda.is_available():
        pytest.skip("the CUDA op benchmark is long; run it through bench/gpu_check.sh")
    monkeypatch.chdir(tmp_path)
    rc = main(["bench", "ops", "--quick"])
    assert rc == 0
    out = capsys.readouterr().out
    (js,) = (tmp_path / "leanclip-bench").glob("ops-*.json")
    assert out.strip().splitlines()[-1] == f"wrote {os.path.join('leanclip-bench', js.name)}"
    res = json.loads(js.read_text())
    assert res["mode"] == "cpu-references"
    assert {r["op"] for r in res["rows"]} == {"layer_norm_fwd_bwd", "frozen_linear_bwd", "max_sim"}
    for needle in ("| leanclip (torch reference) |", "| torch eager |", "| dy @ W alone (the GEMM floor) |",
                   "| torch eager (x @ d.T).max |", "median ms", "min / max ms", "GB/s |", "TFLOP/s |"):
        assert needle in out, needle
    assert "{" not in out  # no Python dicts
    assert "| 1.00 |" in out  # the baseline's own ratio, 3 significant digits
    row = res["rows"][0]
    ratio = row["seconds"]["leanclip"] / row["seconds"]["torch"]
    assert f"| {_sig3(ratio)} |" in out and repr(ratio) not in out  # the JSON keeps the full-precision number
    assert set(row["spread"]) == set(row["seconds"]) and row["spread"]["torch"]["reps"] == res["reps"] == 5
    assert row["spread"]["torch"]["min"] <= row["seconds"]["torch"] <= row["spread"]["torch"]["max"]
    assert set(res["load_average"]) == {"start", "end"} and isinstance(res["warnings"], list)


def _spread(lo, hi, reps=5):
    return {"reps": reps, "min": lo, "median": (lo + hi) / 2, "max": hi}


def test_reliability_warnings_name_the_noisy_modes():
    from leanclip.bench.common import reliability_warnings

    quiet = {"plain": _spread(1.0, 1.2), "lean:block": _spread(0.5, 0.55)}
    assert reliability_warnings(quiet, 1.0, 2.4, threads=2, cpu_count=2) == []
    noisy = {**quiet, "plain+gc": _spread(1.0, 29.6), "lean:none": _spread(1.0, 1.3)}
    (msg,) = reliability_warnings(noisy, 0.1, 0.2, threads=2, cpu_count=2, what="bench step")
    assert msg.startswith("bench step: ") and "plain+gc 30x" in msg and "lean:none 1.3x" in msg
    assert "plain " not in msg.replace("plain+gc", "") and "lean:block" not in msg and "5 repetitions" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("start, end, threads, cpus, flagged", [
    (0.2, 2.4, 2, 2, None),          # the run alone fills its 2 threads: no warning
    (0.2, 2.6, 2, 2, "end"),         # half a core more than the run itself: someone else
    (3.0, 2.0, 2, 16, "start"),      # a 16-core box, but more busy cores than this run's 2 threads
    (3.0, 3.0, 8, 2, "start"),       # more threads than cores: the cores bound it
    (None, None, 2, None, None),     # no load average on this OS
])
def test_reliability_warnings_flag_a_loaded_machine(start, end, threads, cpus, flagged):
    from leanclip.bench.common import reliability_warnings

    out = reliability_warnings({}, start, end, threads=threads, cpu_count=cpus)
    if flagged is None:
        assert out == []
    else:
        (msg,) = out
        assert f"at the {flagged}" in msg and "load average" in msg


def test_step_timing_warnings_name_model_and_method_when_there_are_several_rows():
    from leanclip.bench.step_report import timing_warnings

    rows = [{"model": "m", "method": me, "spread": {"plain": _spread(1.0, hi)}} for me, hi in (("ln", 1.1),
                                                                                               ("bitfit", 2))]
    res = {"rows": rows, "threads": 1, "machine": {"cpu_count": 4}, "load_average": {"start": 0.5, "end": 1.2}}
    (msg,) = timing_warnings(res)
    assert "m bitfit plain 2x" in msg and "m ln " not in msg


def _sig3(v: float) -> str:
    return f"{v:#.3g}".rstrip(".")


def test_bench_output_that_is_a_file_exits_2(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("x")
    assert main(["bench", "ops", "--output", str(taken)]) == 2
    assert "--output" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["bench", "step", "--models", "ViT-Nope", "--quick"], None),
    (["bench", "step", "--models", "ViT-B-16", "--methods", "nope"], "--methods"),
    (["bench", "step", "--policies", "sometimes"], "--policies"),
    (["bench", "step", "--modes", "lean:sometimes"], "--modes"),
    (["bench", "step", "--modes", "plain+compile+budget:2"], "--modes"),
    (["bench", "step", "--modes", "plain+gc+budget:0.1"], "--modes"),
    (["bench", "step", "--modes", ","], "--modes"),
    (["bench", "step", "--budgets", "half"], "--budgets"),
    (["bench", "step", "--budgets", "0"], "--budgets"),
    (["bench", "step", "--threads", "0"], "--threads"),
    (["bench", "fit", "--mem-cap", "lots"], None),
    (["bench", "fit", "--batch", "0"], "--batch"),
])
def test_bench_bad_input_exits_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() and "Traceback" not in err
    if needle:
        assert needle in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
@pytest.mark.parametrize("argv", [["bench", "step", "--device", "cuda"], ["bench", "fit", "--device", "cuda"]])
def test_bench_cuda_without_gpu_exits_2(argv, capsys):
    assert main(argv) == 2
    assert "CUDA" in capsys.readouterr().err


def test_step_bf16_precision_runs_on_cpu():
    """bf16: plain under autocast (AMP), lean with bf16 frozen weights; both train and lean keeps fewer bytes."""
    import open_clip

    from leanclip.bench.step import make_step
    from leanclip.configs import register_tiny_config

    name = register_tiny_config()
    tok = open_clip.get_tokenizer("ViT-B-16")
    from leanclip.memory import saved_activation_bytes

    saved = {}
    for mode in ("plain", "lean:none"):
        step, fwd, model = make_step(name, "clipfit", mode, batch_size=2, n_classes=3, device=torch.device("cpu"),
                                     tokenizer=tok, precision="bf16")
        assert torch.isfinite(step())
        saved[mode] = saved_activation_bytes(fwd, exclude=model)[1]
        frozen = model.visual.transformer.resblocks[0].mlp.c_fc.weight
        assert frozen.dtype == (torch.bfloat16 if mode.startswith("lean") else torch.float32)
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert saved["lean:none"] < saved["plain"]
    with pytest.raises(ValueError, match="precision"):
        make_step(name, "clipfit", "plain", batch_size=2, n_classes=3, device=torch.device("cpu"), tokenizer=tok,
                  precision="fp8")


def test_parse_mode_grammar():
    from leanclip.bench.step import default_modes, parse_mode

    assert parse_mode("plain") == {"kind": "plain", "policy": "none", "gc": False, "compile": False, "budget": None,
                                   "chunk": None, "memory_budget": None}
    assert parse_mode("plain+gc")["gc"]
    assert parse_mode("plain+compile+budget:0.25") == {"kind": "plain", "policy": "none", "gc": False,
                                                        "compile": True, "budget": 0.25, "chunk": None,
                                                        "memory_budget": None}
    assert parse_mode("lean:mlp+qkv+compile") == {"kind": "lean", "policy": "mlp+qkv", "gc": False, "compile": True,
                                                  "budget": None, "chunk": None, "memory_budget": None}
    assert parse_mode("lean:block/4+compile") == {"kind": "lean", "policy": "block", "gc": False, "compile": True,
                                                  "budget": None, "chunk": 4, "memory_budget": None}
    assert parse_mode("lean:mlp+qkv")["policy"] == "mlp+qkv" and not parse_mode("lean:mlp+qkv")["compile"]
    for bad in ("plain+budget:0.1", "lean:block+gc", "lean:", "plain+compile+budget:nan", "floor:text", "PLAIN",
                "lean:block/0", "lean:mlp/2", "lean:block/", "plain/2"):
        with pytest.raises(ValueError, match="--modes"):
            parse_mode(bad)
    assert default_modes(["none"]) == ["plain", "plain+gc", "lean:none"]
    assert default_modes(["block"], compile=True, budgets=[0.1]) == [
        "plain", "plain+gc", "plain+compile", "plain+compile+budget:0.1", "lean:block", "lean:block+compile"]


def test_best_peers_picks_fastest_within_memory_and_smallest_within_time():
    from leanclip.bench.step_report import best_peers

    seconds = {"plain": 1.0, "plain+gc": 1.3, "plain+compile+budget:0.1": 1.4, "lean:block": 1.1, "lean:none": 0.9}
    peak = {"plain": 100, "plain+gc": 13, "plain+compile+budget:0.1": 10, "lean:block": 12, "lean:none": 94}
    out = best_peers(seconds, peak)
    # lean:block holds 12: only the budgeted compile (10) fits under it; no peer is as fast as 1.1 except plain
    assert out["lean:block"]["fastest_peer_within_memory"] == "plain+compile+budget:0.1"
    assert out["lean:block"]["time_ratio_vs_that_peer"] == pytest.approx(1.1 / 1.4)
    assert out["lean:block"]["least_memory_peer_within_time"] == "plain"
    assert out["lean:block"]["memory_ratio_vs_that_peer"] == pytest.approx(0.12)
    # lean:none holds 94: gc (13) and the budget (10) fit, gc is faster; no peer is as fast as 0.9
    assert out["lean:none"]["fastest_peer_within_memory"] == "plain+gc"
    assert out["lean:none"]["least_memory_peer_within_time"] is None
    assert out["lean:none"]["memory_ratio_vs_that_peer"] is None
    assert set(out) == {"lean:block", "lean:none"}


def test_bench_step_peers_json_and_table(tmp_path, monkeypatch, capsys):
    """Default folder, the min / max columns, and a loaded machine named in one warning line (the load average is
    faked: the rule itself is tested on numbers in test_reliability_warnings_*)."""
    import leanclip.bench.step as step

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(step, "load_average", lambda: 99.0)
    rc = main(["bench", "step", "--quick", "--methods", "ln", "--modes", "plain,plain+gc,lean:none", "--reps", "2"])
    assert rc == 0
    out, err = capsys.readouterr()
    assert "| mode | median s/step | min s | max s | time / plain |" in out and "| lean mode |" in out
    assert "| plain+gc |" in out and "2 repetitions per mode" in out and "load average" in out
    assert "No pretrained weights loaded" not in err
    load_lines = [line for line in err.splitlines() if "load average" in line]
    assert len(load_lines) == 1 and load_lines[0].startswith("leanclip: warning: bench step: load average 99.00 at "
                                                            "the start and 99.00 at the end")
    (js,) = (tmp_path / "leanclip-bench").glob("step-*.json")
    (png,) = (tmp_path / "leanclip-bench").glob("step-*.png")
    assert out.strip().splitlines()[-1] == (f"wrote {os.path.join('leanclip-bench', js.name)} and "
                                            f"{os.path.join('leanclip-bench', png.name)}")
    res = json.loads(js.read_text())
    assert res["reps"] == 2 and res["load_average"] == {"start": 99.0, "end": 99.0}
    assert any("load average 99.00" in w for w in res["warnings"])
    assert not [p.name for p in (tmp_path / "leanclip-bench").iterdir() if p.name.startswith(".")]  # no temp left
    row = res["rows"][0]
    for mode, sp in row["spread"].items():
        assert sp["reps"] == 2 and sp["min"] <= row["seconds"][mode] <= sp["max"]
    assert res["modes"] == ["plain", "plain+gc", "lean:none"] and res["isolate"] is False
    assert set(row["peak_step_bytes"]) == set(res["modes"]) == set(row["warmup_seconds"])
    assert row["saved_bytes"]["plain+gc"] is None and row["saved_bytes"]["plain"] > 0
    if torch.cuda.is_available() or row["peak_method"].startswith("peak RSS"):
        assert all(v > 0 for v in row["peak_step_bytes"].values())
    assert set(row["best_peer"]) == {"lean:none"}
    assert set(row["best_peer"]["lean:none"]) == {"fastest_peer_within_memory", "time_ratio_vs_that_peer",
                                                  "least_memory_peer_within_time", "memory_ratio_vs_that_peer"}
    assert row["failed"] == {} and row["graph_breaks"] == {"plain": None, "plain+gc": None, "lean:none": None}


def test_plain_gc_checkpoints_and_matches_plain_gradients():
    """open_clip's own grad checkpointing is on in plain+gc, and the trained LayerNorms get plain's gradients."""
    import open_clip

    from leanclip.bench.step import make_step
    from leanclip.configs import register_tiny_config

    name = register_tiny_config()
    tok = open_clip.get_tokenizer("ViT-B-16")
    grads = {}
    for mode in ("plain", "plain+gc"):
        _, fwd, model = make_step(name, "ln", mode, batch_size=2, n_classes=3, device=torch.device("cpu"),
                                  tokenizer=tok)
        assert model.visual.transformer.grad_checkpointing is (mode == "plain+gc")
        fwd().backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["plain"].keys() == grads["plain+gc"].keys() and grads["plain"]
    for n, g in grads["plain"].items():
        assert g is not None and grads["plain+gc"][n] is not None, n
        torch.testing.assert_close(grads["plain+gc"][n], g, msg=n)


def test_budget_is_set_only_inside_its_mode():
    import torch._functorch.config as functorch_config

    from leanclip.bench.step import _budget_context

    before = functorch_config.activation_memory_budget
    with _budget_context(0.1):
        assert functorch_config.activation_memory_budget == 0.1
    assert functorch_config.activation_memory_budget == before
    with _budget_context(None):
        assert functorch_config.activation_memory_budget == before


def test_compiled_mode_that_fails_is_reported_not_raised(monkeypatch):
    """A compiled mode that does not trace becomes a ``failed`` entry with its reason; the other modes still run."""
    import bench.step as step
    from leanclip.bench import step_report

    real = step.make_step

    def make_step(model_name, method, mode, **kw):
        if mode.endswith("+compile"):
            raise RuntimeError("Unsupported: cannot trace this\nsecond line")
        return real(model_name, method, mode, **kw)

    monkeypatch.setattr(step, "make_step", make_step)
    res = step.run(["leanclip-tiny"], ["ln"], batch_size=2, n_classes=3, modes=["plain", "lean:none+compile"],
                   reps=1, device="cpu", output=None)
    row = res["rows"][0]
    assert list(row["seconds"]) == ["plain"]
    assert row["failed"] == {"lean:none+compile": "RuntimeError: Unsupported: cannot trace this | second line"}
    assert "did not run" in step_report.summarize(res)


def test_isolate_runs_each_mode_in_its_own_process(tmp_path):
    rc = main(["bench", "step", "--quick", "--methods", "ln", "--modes", "plain,lean:none", "--reps", "1",
               "--batch-size", "2", "--classes", "3", "--isolate", "--output", str(tmp_path)])
    assert rc == 0
    (js,) = tmp_path.glob("step-*.json")
    res = json.loads(js.read_text())
    row = res["rows"][0]
    assert res["isolate"] is True and "own process" in res["time_source"]
    assert list(row["seconds"]) == ["plain", "lean:none"] and row["model"] == "leanclip-tiny"
    assert row["batch_size"] == 2 and row["n_classes"] == 3
    assert all(v is not None for v in row["peak_step_bytes"].values())
    assert row["time_ratio_vs_plain"]["plain"] == 1.0
    assert "lean:none" in row["best_peer"]


def test_summarize_prints_compiled_rows_with_graph_breaks():
    """The markdown table of an isolated run: numbers come back from JSON, graph breaks are integers."""
    from leanclip.bench.step_report import finish_row, summarize

    row = finish_row({"model": "m", "method": "ln", "batch_size": 2, "n_classes": 3, "precision": "fp32",
                      "scope": "image", "peak_method": "rss", "seconds": {"plain": 2.0, "lean:block+compile": 1.0},
                      "images_per_s": {}, "warmup_seconds": {"plain": [1.0, 1.0], "lean:block+compile": [30.0, 1.0]},
                      "peak_step_bytes": {"plain": 2**21, "lean:block+compile": 2**20},
                      "saved_bytes": {"plain": 2**20, "lean:block+compile": None},
                      "graph_breaks": {"plain": None, "lean:block+compile": 3}, "failed": {}})
    res = {"machine": {"device": "cpu", "cpu": "x", "torch": torch.__version__}, "rows": [row], "threads": 1,
           "time_source": "t"}
    text = summarize(res)
    assert "| lean:block+compile | 1.0000 |  |  | 0.50 | 1.0 | 0.50 |  | 30.0 | 3 |" in text  # no spread recorded
    assert "| lean:block+compile | none |  | none |  |" in text  # plain is both bigger and slower


@pytest.mark.slow
def test_compiled_peers_run_on_cpu(tmp_path, capsys):
    """torch.compile peers (one with an activation memory budget) and lean under torch.compile, on the tiny image
    tower: each either runs (warm-up timed apart) or is reported with its reason. Compiling takes about a minute per
    mode on a 2-core CPU, hence slow and the smallest set. Each mode compiles in its own process (--isolate): a
    compile leaves dynamo state behind that would change later tests in this process."""
    rc = main(["bench", "step", "--quick", "--methods", "ln", "--scope", "image", "--batch-size", "2", "--reps", "1",
               "--modes", "plain+compile+budget:0.5,lean:none+compile", "--isolate", "--output", str(tmp_path)])
    assert rc == 0
    assert "| plain+compile+budget:0.5 |" in capsys.readouterr().out
    (js,) = tmp_path.glob("step-*.json")
    row = json.loads(js.read_text())["rows"][0]
    assert "plain+compile+budget:0.5" in row["seconds"]
    assert row["saved_bytes"]["plain+compile+budget:0.5"] is None
    assert set(row["seconds"]) | set(row["failed"]) == {"plain+compile+budget:0.5", "lean:none+compile"}
    for mode in row["seconds"]:
        assert len(row["warmup_seconds"][mode]) == 2 and row["peak_step_bytes"][mode] is not None
        assert row["graph_breaks"][mode] >= 0


def test_chunked_block_mode_trains_like_block():
    """``lean:block/<c>`` sets the chunk on every lean block, and its step's loss and gradients are the block's."""
    import open_clip

    from leanclip.bench.step import make_step
    from leanclip.configs import register_tiny_config

    name, tok = register_tiny_config(), open_clip.get_tokenizer("ViT-B-16")
    grads = {}
    for mode in ("lean:block", "lean:block/1"):
        step, _, model = make_step(name, "ln", mode, batch_size=3, n_classes=3, device=torch.device("cpu"),
                                   tokenizer=tok)
        assert {b.leanclip_chunk for b in model.visual.transformer.resblocks} == {None if mode == "lean:block" else 1}
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        grads[mode] = (step(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (la, ga), (lb, gb) = grads["lean:block"], grads["lean:block/1"]
    assert torch.allclose(la, lb, rtol=1e-5) and ga.keys() == gb.keys() and ga
    # fp32: chunks sum a gradient in another order (elementwise, near-zero entries differ by rounding)
    assert all((ga[n] - gb[n]).norm() <= 1e-4 * ga[n].norm() + 1e-7 for n in ga)
