"""Loader for the optional csrc CUDA extension (``kernels._C``). Returns None where it is not built."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def load():
    try:
        from kernels import _C  # built by setup.py when nvcc is present
    except ImportError:
        return None
    return _C
