"""The op benchmarks in this folder run only under ``--benchmark-only``; the normal suite skips them with a reason.

    python -m pytest tests/bench --benchmark-only                        # timing tables, grouped per op/shape/dtype
    python -m pytest tests/bench --benchmark-only --benchmark-json=ops.json
"""
import os
import pathlib
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
HOW = "python -m pytest tests/bench --benchmark-only"


def _benchmark_only(config) -> bool:
    # "benchmark_only" is the dest of pytest-benchmark's --benchmark-only; False when the plugin is absent
    return bool(config.getoption("benchmark_only", default=False))


def pytest_configure(config):
    # tests/conftest.py turns the Triton interpreter on (setdefault) for the CPU kernel tests. Triton reads it when
    # the kernels are decorated, i.e. on `from leanclip import kernels`: on a GPU, benchmark the compiled kernels instead. If
    # kernels was imported already, test_ops_benchmark.py skips the CUDA benchmarks and says why.
    if _benchmark_only(config) and "leanclip.kernels" not in sys.modules:
        import torch

        if torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "0"


def pytest_collection_modifyitems(config, items):
    if _benchmark_only(config):
        return
    skip = pytest.mark.skip(reason=f"op benchmark: run with `{HOW}`")
    for item in items:  # this hook sees every collected item, not only this folder's
        if HERE in pathlib.Path(item.path).resolve().parents:
            item.add_marker(skip)
