"""``leanclip bench ops|step|fit``: the benchmarks behind the README tables (see bench/ops.py, step.py, fit.py)."""
from __future__ import annotations

import argparse
import json
import os

import torch

from leanclip.bench.common import warn_all, write_json
from leanclip.configs import register_tiny_config
from leanclip.methods import METHODS
from leanclip.models import transformers as _hf

# Results go to a folder of the user's, under the current directory, never into the repository: bench/results/ holds
# the numbers the README quotes and takes a run only on purpose (--output bench/results).
DEFAULT_OUTPUT = "leanclip-bench"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Benchmarks of leanclip against what a user would run instead. Each prints a table (medians; "
                     "for ops and step each contender's min and max too) and writes its JSON into "
                     f"./{DEFAULT_OUTPUT}/ unless --output names another folder; the repository's bench/results/ "
                     "holds the results its README quotes.")
    sub = p.add_subparsers(dest="bench_cmd", required=True, metavar="{ops,step,fit}")
    o = sub.add_parser("ops", help="fused ops vs torch eager, torch.compile and Liger (CUDA); the torch references "
                                   "on CPU")
    o.add_argument("--quick", action="store_true", help="smallest shapes")
    o.add_argument("--output", metavar="DIR", default=DEFAULT_OUTPUT,
                   help="folder for the JSON result, created if needed (default: ./%(default)s)")
    s = sub.add_parser("step", help="train-step time and memory: leanclip vs plain, open_clip grad checkpointing "
                                    "and torch.compile peers")
    s.add_argument("--models", default="ViT-B-32,ViT-B-16", help="comma-separated open_clip names")
    s.add_argument("--methods", default="ln,clipfit,bitfit", help="comma-separated PEFT methods")
    s.add_argument("--batch-size", type=int, default=8, help="images per step")
    s.add_argument("--classes", type=int, default=100, help="class prompts the text tower encodes per step")
    s.add_argument("--policies", default="none,mlp,mlp+qkv,block", help="leanclip recompute policies to time")
    s.add_argument("--reps", type=int, default=5,
                   help="timed repetitions per mode: the table shows their median, min and max")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    s.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="bf16: autocast everywhere (plain = AMP), lean keeps frozen weights in bf16; auto = bf16 on "
                        "CUDA, fp32 on CPU")
    s.add_argument("--floor", action="store_true",
                   help="also time the image tower's forward+backward alone (lower bound of any exact step)")
    s.add_argument("--modes", default=None,
                   help="comma-separated modes to run instead of the default set: plain, plain+gc, plain+compile, "
                        "plain+compile+budget:<b>, lean:<policy>, lean:block/<c> (block over chunks of c samples), "
                        "lean:budget:<b> (the recompute plan for a step peak b: a fraction of plain's, or 3GiB), "
                        "lean:<policy>+compile, floor:image")
    s.add_argument("--compile", action="store_true",
                   help="add the torch.compile peers (plain, plain with each --budgets, lean) to the default modes "
                        "(on by default on CUDA; a CPU compile of a ViT takes minutes, reported as warm-up)")
    s.add_argument("--budgets", default="0.1,0.5",
                   help="activation_memory_budget values for the compiled plain peers (default: %(default)s)")
    s.add_argument("--scope", default="full", choices=["full", "image"],
                   help="image: train the image tower alone against fixed class text features")
    s.add_argument("--isolate", action="store_true",
                   help="run each mode in its own process: clean per-mode memory (peak RSS on CPU); times are then "
                        "per-process medians")
    s.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    s.add_argument("--json", action="store_true",
                   help="print the result as one JSON line on stdout and write no files (used by --isolate)")
    s.add_argument("--quick", action="store_true", help="tiny model and sizes: ~2 minutes on a 2-core CPU")
    s.add_argument("--output", metavar="DIR", default=DEFAULT_OUTPUT,
                   help="folder for the JSON result and its plot, created if needed (default: ./%(default)s)")
    _add_fit_arguments(sub)


def _add_fit_arguments(sub) -> None:
    from leanclip.bench.fit import DEFAULT_MAX_BATCH, DEFAULT_MODES

    f = sub.add_parser("fit", help="largest batch whose training step fits a memory cap, per mode (CPU: peak RSS "
                                   "of the step's process; CUDA: allocator peak)")
    f.add_argument("--model", default="ViT-L-14", help="open_clip model name")
    f.add_argument("--method", default="clipfit", help="PEFT method")
    f.add_argument("--mem-cap", default="16GiB",
                   help="the cap, e.g. 3GiB, 16GiB, 8000MiB. Compared with the peak memory of the second training "
                        "step: on CPU its process's peak RSS (what is resident before the step: runtime, model, "
                        "optimizer state, inputs; plus the step's peak growth), on CUDA max_memory_allocated")
    f.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help="comma-separated modes as for bench step (default: %(default)s)")
    f.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda when available, else cpu")
    f.add_argument("--scope", default="full", choices=["full", "image"],
                   help="image: train the image tower alone against fixed class text features")
    f.add_argument("--classes", type=int, default=100, help="class prompts the text tower encodes per step")
    f.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="as for bench step (auto: bf16 on CUDA, fp32 on CPU)")
    f.add_argument("--threads", type=int, default=None, help="torch intra-op threads per probe (default: torch's)")
    f.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help="largest batch probed: a mode that fits it is reported as fitting at least it "
                        "(default: %(default)s)")
    f.add_argument("--batch", type=int, default=None, help="only check whether this batch fits (no search)")
    f.add_argument("--estimate", action="store_true",
                   help="run nothing: the step-peak estimator's largest batch per mode (plain, plain+gc, lean:fit) "
                        "for a model built on the meta device; --mem-cap may list caps (16GiB,24GiB,40GiB); "
                        "precision auto is bf16, the GPU's")
    f.add_argument("--probe", type=int, default=None, metavar="BATCH",
                   help="measure one CPU probe (the one mode of --modes at this batch) in this process and print it "
                        "as one JSON line; what each probe process of a CPU search runs")
    f.add_argument("--output", metavar="DIR", default=DEFAULT_OUTPUT,
                   help="folder for the JSON result, created if needed (default: ./%(default)s)")


def _check_names(models, methods):
    import open_clip

    register_tiny_config()
    known = set(open_clip.list_models())
    for m in models:
        if _hf.is_name(m):  # built from its config with random weights (leanclip.bench.step.create_random)
            _hf.random_config(m)
    bad = [m for m in models if m not in known and not _hf.is_name(m)]
    if bad:
        raise ValueError(f"--models: unknown open_clip model(s) {bad}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"--methods: unknown method(s) {bad}; valid: {sorted(METHODS)}")


def _step_modes(args, step, policies, device) -> list[str]:
    """The mode list from --modes or the defaults (--policies, --compile, --budgets, --floor), each validated."""
    if args.modes is not None:
        modes = [m for m in args.modes.split(",") if m]
        if not modes:
            raise ValueError("--modes: give at least one mode")
        for mode in modes:
            step.parse_mode(mode)
        return modes
    try:
        budgets = [float(b) for b in args.budgets.split(",") if b]
    except ValueError:
        raise ValueError(f"--budgets: expected comma-separated numbers, got {args.budgets!r}") from None
    if not all(0.0 < b <= 1.0 for b in budgets):
        raise ValueError(f"--budgets: each budget must be in (0, 1], got {args.budgets!r}")
    use_compile = args.compile or (device == "cuda" or (device is None and _cuda()))
    return step.default_modes(policies, compile=use_compile, budgets=budgets, floor=args.floor)


def _cuda() -> bool:
    return torch.cuda.is_available()


def _output_folder(path: str) -> str:
    """``--output``, created before any work: a benchmark that runs for minutes must not fail at its last write."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--output: {path} exists and is not a folder")
    os.makedirs(path, exist_ok=True)
    return path


def _run_step(args) -> int:
    from leanclip.bench import step, step_report

    if args.device == "cuda" and not _cuda():
        raise ValueError("--device cuda: no CUDA device is available")
    models = [m for m in args.models.split(",") if m]
    methods = [m for m in args.methods.split(",") if m]
    policies = [p for p in args.policies.split(",") if p]
    bad = [p for p in policies if p not in step.POLICIES]
    if bad:
        raise ValueError(f"--policies: unknown {bad}; valid: {list(step.POLICIES)}")
    if args.threads is not None and args.threads <= 0:
        raise ValueError(f"--threads must be positive, got {args.threads}")
    device = None if args.device == "auto" else args.device
    modes = _step_modes(args, step, policies, device)
    batch, classes, reps = args.batch_size, args.classes, args.reps
    _check_names(models, methods)
    if args.quick:
        models, batch, classes, reps = ["leanclip-tiny"], min(batch, 8), min(classes, 10), min(reps, 3)
    if batch <= 0 or classes <= 0 or reps <= 0:
        raise ValueError("--batch-size, --classes and --reps must be positive")
    output = None if args.json else _output_folder(args.output)
    res = step.run(models, methods, batch_size=batch, n_classes=classes, modes=modes, reps=reps, device=device,
                   output=output, precision=None if args.precision == "auto" else args.precision, scope=args.scope,
                   isolate=args.isolate, threads=args.threads)
    if args.json:  # stdout stays one JSON line; warnings go to stderr
        print(json.dumps(res, default=str))
        warn_all(res["warnings"])
        return 0
    print(step_report.summarize(res))
    warn_all(res["warnings"])
    print(f"wrote {res['path']}" + (f" and {res['plot']}" if res.get("plot") else ""))
    return 0


def _run_estimate(args) -> int:
    """``bench fit --estimate``: the estimator's numbers, labelled as estimates (nothing runs)."""
    from leanclip.bench import estimate, fit

    caps = {c: fit.parse_bytes(c) for c in args.mem_cap.split(",") if c}
    if not caps:
        raise ValueError("--mem-cap: give at least one cap")
    modes = [m for m in args.modes.split(",") if m] if args.modes != ",".join(fit.DEFAULT_MODES) else estimate.MODES
    bad = [m for m in modes if m not in estimate.MODES]
    if bad:
        raise ValueError(f"--modes: --estimate covers {', '.join(estimate.MODES)}, not {', '.join(bad)}")
    if args.classes <= 0 or args.max_batch <= 0:
        raise ValueError("--classes and --max-batch must be positive")
    _check_names([args.model], [args.method])
    output = _output_folder(args.output)
    res = estimate.estimate(args.model, args.method, caps, modes=modes, n_classes=args.classes,
                            precision="bf16" if args.precision == "auto" else args.precision, scope=args.scope,
                            max_batch=args.max_batch)
    print(estimate.summarize(res))
    name = fit.result_name({**res, "device": "cpu", "machine": {"device": "cpu"}}, "-".join(caps))
    print(f"wrote {write_json(os.path.join(output, name.replace('fit-cpu-', 'fit-estimate-')), res)}")
    return 0


def _run_fit(args) -> int:
    from leanclip.bench import fit

    if args.estimate:
        return _run_estimate(args)
    cap = fit.parse_bytes(args.mem_cap)
    for flag, v in (("--batch", args.batch), ("--probe", args.probe), ("--max-batch", args.max_batch),
                    ("--threads", args.threads), ("--classes", args.classes)):
        if v is not None and v <= 0:
            raise ValueError(f"{flag} must be positive, got {v}")
    modes = [m for m in args.modes.split(",") if m]
    if args.device == "cuda" and not _cuda():
        raise ValueError("--device cuda: no CUDA device is available")
    device = ("cuda" if _cuda() else "cpu") if args.device == "auto" else args.device
    fit.check_inputs(device, cap, modes)
    _check_names([args.model], [args.method])
    precision = None if args.precision == "auto" else args.precision
    if args.probe is not None:  # one probe process of a CPU search: its record is its stdout
        if device != "cpu" or len(modes) != 1:
            raise ValueError("--probe measures one mode on CPU: give --device cpu and one mode in --modes")
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(fit.measure_here(args.model, args.method, modes[0], args.probe, cap=cap,
                                          n_classes=args.classes, precision=precision or "fp32",
                                          scope=args.scope)), flush=True)
        return 0
    output = _output_folder(args.output)
    res = fit.run(args.model, args.method, cap, modes=modes, device=device, n_classes=args.classes,
                  precision=precision, scope=args.scope, threads=args.threads, max_batch=args.max_batch,
                  batch=args.batch)
    print(fit.summarize(res))
    print(f"wrote {write_json(os.path.join(output, fit.result_name(res, args.mem_cap)), res)}")
    return 0


def run(args) -> int:
    if args.bench_cmd == "ops":
        from leanclip.bench import ops

        res = ops.run(quick=args.quick, output=_output_folder(args.output))
        print(ops.summarize(res))
        warn_all(res["warnings"])
        print(f"wrote {res['path']}")
        return 0
    if args.bench_cmd == "step":
        return _run_step(args)
    if args.bench_cmd == "fit":
        return _run_fit(args)
    raise ValueError(f"unknown bench command {args.bench_cmd!r}")
