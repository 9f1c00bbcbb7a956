"""``leanclip sweep``: a protocol grid (methods x datasets x shots x seeds) as resumable cells.

    leanclip sweep --protocol base2new --methods coop,clipfit,llu --datasets coop11 --seeds 1,2,3 \\
        --data ~/data --model ViT-B-16 --pretrained openai --output sweeps/b2n
    leanclip report sweeps/b2n

Each cell is one run directory ``SWEEP/<protocol>/<dataset>/<method>/shots<K>_seed<S>/`` made by the very commands
``--plan`` prints (``leanclip train`` for the cell, then ``leanclip eval`` on each target for the cross-dataset
protocols; ``leanclip zeroshot`` for the ``zeroshot`` row), so a cell's result is the result of running it alone.
Cells run as subprocesses (``--workers N``, ``--devices`` gives each its own GPU) or, with ``--workers 0``, inside
this process one after another (no start-up cost per cell: small CPU sweeps).

State: ``SWEEP/sweep.json`` (written atomically by this process only) holds every protocol's grid and settings and each
cell's state (pending / running / done / failed + the error line). What is on disk decides: a cell whose result
files exist is done and never rerun; one with a checkpoint but no result (interrupted) resumes from it; a failed
cell is retried only with ``--retry-failed``. One sweep at a time per folder (a lock that cells started by it also
hold). Methods that leave the image tower frozen share its features through ``SWEEP/features``
(``leanclip.feature_cache``; passes and reuses counted in sweep.json).

Every argument is checked before anything is written (one line, exit 2). Exit 0 when no cell failed, 1 otherwise.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from leanclip import utils
from leanclip.cli import main
from leanclip.cli.common import DEFAULT_MODEL, default_pretrain_steps, synthetic_pretrained_weights
from leanclip.cli.sweep_grid import PROG, SYNTHETIC, Cell, Spec, add_arguments, build_spec, cells_of, steps_of
from leanclip.cli.sweep_state import (
    FolderLock, InvalidResult, cell_metrics, load_manifest, merge, read_result, reconcile, resume_words, write_manifest,
)
from leanclip.feature_cache import ENV_VAR
from leanclip.models import transformers as hf
from leanclip.run_files import FEATURES_DIR
from leanclip.weights import HF_HUB_PREFIX, LOCAL_DIR_PREFIX

# the subcommand's interface (leanclip.cli.parser); its flags are the grid's, declared in leanclip.cli.sweep_grid
__all__ = ["add_arguments", "run"]


# ----------------------------------------------------------------------------------------------------------- runner
LOG_NAME = "sweep.log"  # each step's stdout + stderr, in its output folder


def _error_line(log: Path) -> str:
    """The one-line error a failed command printed (``leanclip: error: ...``), else its last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    errors = [ln for ln in lines if ln.startswith(f"{PROG}: error:")]
    return (errors or lines or ["failed without output"])[-1][:500]


class Runner:
    """Runs one ``leanclip`` command: in this process (``workers == 0``) or as a child process on ``device``."""

    def __init__(self, spec: Spec, in_process: bool, lock_fd: int | None):
        self.env = {ENV_VAR: str(spec.output / FEATURES_DIR) if spec.features else ""}
        self.in_process, self.lock_fd = in_process, lock_fd
        self.children: set = set()
        self.stopping = False

    def __call__(self, argv: list[str], log: Path, device: int | None) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"$ {shlex.join([PROG, *argv])}\n")
            f.flush()
            return self._in_process(argv, f) if self.in_process else self._child(argv, f, device)

    def _in_process(self, argv, f) -> int:
        import traceback

        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                try:
                    return main(argv)
                except Exception as e:  # a bug in a cell: recorded, the sweep goes on
                    traceback.print_exc(file=f)
                    print(f"{PROG}: error: {type(e).__name__}: {e}", file=f)
                    return 1
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)

    def _child(self, argv, f, device) -> int:
        env = {**os.environ, **self.env, **({"CUDA_VISIBLE_DEVICES": str(device)} if device is not None else {})}
        proc = subprocess.Popen([sys.executable, "-m", "leanclip", *argv], stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, pass_fds=(self.lock_fd,) if self.lock_fd else ())
        self.children.add(proc)
        try:
            return proc.wait()
        finally:
            self.children.discard(proc)

    def stop(self) -> None:
        self.stopping = True
        for proc in list(self.children):
            proc.terminate()
        for proc in list(self.children):
            proc.wait()


def run_cell(cell: Cell, spec: Spec, runner: Runner, device: int | None) -> str | None:
    """Run the steps of ``cell`` that have no result yet; None on success, else the error line."""
    for step in steps_of(cell, spec):
        if read_result(step) is not None:
            continue
        rc = runner(step.argv + resume_words(step), step.out / LOG_NAME, device)
        if rc == 130 and runner.in_process:  # leanclip's exit code for an interrupt it caught
            raise KeyboardInterrupt
        if rc != 0:
            return f"{step.kind} exited {rc}: {_error_line(step.out / LOG_NAME)}"
    return None


def plan_line(cell: Cell, spec: Spec) -> str:
    """One shell line that makes ``cell`` (its pending steps joined with ``&&``)."""
    env = f"{ENV_VAR}={shlex.quote(str(spec.output / FEATURES_DIR)) if spec.features else ''} "
    return " && ".join(env + shlex.join([PROG, *s.argv, *resume_words(s)])
                       for s in steps_of(cell, spec) if read_result(s) is None)


# ------------------------------------------------------------------------------------------------------------- main
def run(args) -> int:
    spec = build_spec(args)
    spec.output.mkdir(parents=True, exist_ok=True)
    with FolderLock(spec.output) as lock:
        manifest = load_manifest(spec.output)
        whole = merge(manifest, spec)
        whole.features = spec.features  # a choice of this invocation, not a setting of the folder
        reconcile(manifest, whole, args.retry_failed)
        asked = set(cells_of(spec))
        todo = [c for c in cells_of(whole) if c in asked and manifest["cells"][c.id]["state"] == "pending"]
        write_manifest(manifest, spec.output)
        if args.plan:
            for cell in todo:
                print(plan_line(cell, whole))
            return 0
        todo = todo[:args.max_cells] if args.max_cells else todo
        t0 = time.perf_counter()
        _smoke_weights(todo, whole)
        _run_cells(todo, whole, manifest, args, lock.fd)
        write_manifest(manifest, spec.output)
    states = [manifest["cells"][c.id]["state"] for c in cells_of(whole)]
    summary = {"command": "sweep", "output": str(spec.output), "protocol": spec.protocol, "cells": len(states),
               **{s: states.count(s) for s in ("done", "failed", "pending")}, "ran": len(todo),
               "seconds": round(time.perf_counter() - t0, 3), "feature_cache": manifest.get("feature_cache")}
    print(utils.to_json(summary, indent=None))
    return 1 if summary["failed"] else 0


def _smoke_weights(todo: list[Cell], spec: Spec) -> None:
    """The cached synthetic pre-training that cells without ``--pretrained`` start from (``--pretrain-steps``, or
    the smoke-run default on synthetic data: ``leanclip.cli.common.default_pretrain_steps``), made once here before
    the cells start, rather than by each of N workers at the same time."""
    model, flags = spec.flags.get("model", DEFAULT_MODEL), spec.flags
    if flags.get("pretrained") is not None or model.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX, hf.PREFIX)):
        return  # named weights (pre-trained further in each cell) or a model that carries its own
    for synthetic in sorted({c.dataset == SYNTHETIC for c in todo}):
        steps = flags.get("pretrain_steps")
        steps = default_pretrain_steps(model, None, synthetic) if steps is None else steps
        if steps:
            synthetic_pretrained_weights(None, model, steps, image_size=flags.get("image_size"))


def _run_cells(todo: list[Cell], spec: Spec, manifest: dict, args, lock_fd: int) -> None:
    """Run ``todo``; the manifest is updated (and written) when a cell starts and when it ends."""
    import queue
    import signal
    import threading
    runner = Runner(spec, args.workers == 0, lock_fd)
    guard = threading.Lock()
    devices = queue.Queue()
    for d in args.devices[:args.workers] if args.devices else [None] * max(args.workers, 1):
        devices.put(d)
    log = utils.get_logger()
    ended = {c.id: threading.Event() for c in todo}  # set when a cell of this invocation has ended, however

    def base_unfinished(cell: Cell) -> bool:
        """A chained cell waits for its base cell (queued before it: cells_of's dependency order); True when it
        cannot run: recorded as failed when its base did not finish, left pending when the sweep is stopping."""
        if cell.base is None:
            return False
        if cell.base.id in ended:
            ended[cell.base.id].wait()
        with guard:
            state = manifest["cells"].get(cell.base.id, {}).get("state", "pending")
            if runner.stopping or state == "done":
                return runner.stopping
            manifest["cells"][cell.id].update(state="failed", error=f"its base cell {cell.base.id} is {state}: "
                                                                    f"it starts from that cell's checkpoint")
            write_manifest(manifest, spec.output)
        log.info("sweep: %s failed (base cell %s is %s)", cell.id, cell.base.id, state)
        return True

    def one(cell: Cell) -> None:
        try:
            if not base_unfinished(cell):
                run_one(cell)
        finally:
            ended[cell.id].set()

    def run_one(cell: Cell) -> None:
        device = devices.get()
        try:
            with guard:
                manifest["cells"][cell.id].update(state="running", error=None)
                write_manifest(manifest, spec.output)
            t = time.perf_counter()
            error, metrics = run_cell(cell, spec, runner, device), None
            if not error:
                try:
                    metrics = cell_metrics(cell, spec)
                except InvalidResult as e:
                    error = str(e)
            with guard:
                entry = manifest["cells"][cell.id]
                if runner.stopping:  # stopped by us: resumable, not failed
                    entry.update(state="pending", error=None)
                    return
                entry.update(state="failed" if error else "done", error=error,
                             seconds=round(time.perf_counter() - t, 3))
                if not error:
                    entry["metrics"] = metrics
                write_manifest(manifest, spec.output)
            log.info("sweep: %s %s%s", cell.id, entry["state"], f" ({error})" if error else "")
        finally:
            devices.put(device)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() \
        else None
    pool = ThreadPoolExecutor(max_workers=args.workers) if args.workers else None
    try:
        if pool is None:
            for cell in todo:
                one(cell)
        else:
            for f in [pool.submit(one, c) for c in todo]:
                f.result()
    except KeyboardInterrupt:
        runner.stop()  # its cells stay resumable (checkpoint per epoch); their state returns to pending
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        with guard:
            for entry in manifest["cells"].values():
                if entry["state"] == "running":
                    entry["state"] = "pending"
            write_manifest(manifest, spec.output)
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
