"""Helpers the CLI tests share: run ``leanclip.cli.main`` in-process and read its JSON result."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from leanclip import cli
from leanclip.distributed import find_free_port

REPO = Path(__file__).resolve().parents[2]


def run(capsys, *argv):
    """``leanclip ARGV`` in this process -> (exit code, stdout, stderr)."""
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def last_json(out: str) -> dict:
    """The JSON result a command prints as its last stdout line."""
    return json.loads(out.strip().splitlines()[-1])


def torchrun_two_process(args: list, timeout_s: int, cwd=REPO) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=2 -m leanclip ARGS`` (gloo on CPU, torch backend, one thread each), finished;
    fails the test on a timeout."""
    pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, LEANCLIP_BACKEND="torch", TRITON_INTERPRET="0", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([*pythonpath, str(REPO)]))  # a staged leanclip first, as in this process
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={find_free_port()}", "-m", "leanclip", *map(str, args)]
    try:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish within {timeout_s} s: {(e.stderr or '')[-2000:]}")


def torchrun_two(args: list, timeout_s: int) -> dict:
    """:func:`torchrun_two_process` -> the one JSON result rank 0 prints; fails the test on a non-zero exit, a
    timeout or output from another rank."""
    proc = torchrun_two_process(args, timeout_s)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1 and results[0]["world_size"] == 2  # only rank 0 prints / writes
    return results[0]
