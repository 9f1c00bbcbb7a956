"""Backend selection for the fused ops.

Backends: ``"torch"`` (the float64-checkable references, any device), ``"triton"`` (CUDA tensors, or CPU tensors
when ``TRITON_INTERPRET=1`` was set before triton was imported) and ``"cuda"`` (the csrc extension, CUDA tensors).

With no backend requested, each op picks per device: CUDA -> the op's CUDA default (see ``CUDA_DEFAULT``),
CPU -> triton under the interpreter, else torch; float64 inputs always take torch, the only backend that computes
in float64 (so ``torch.autograd.gradcheck`` runs on the public ops as they are). A backend the user asked for that
cannot run on the given tensors raises: we never fall back silently (the kernel backends reject float64 by name).
"""
from __future__ import annotations

import contextlib
import os

import torch

# Triton is optional: without it (or with an install that fails to import) the torch backend runs everything on CPU
# and the csrc extension on CUDA. This is the one place that imports it; the ops take ``triton`` / ``tl`` from here
# and define their kernels only when it is not None.
try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001  (ImportError, or a broken install failing in its own import)
    triton = tl = None

BACKENDS = ("torch", "triton", "cuda")

# Per-op default on CUDA devices. Changed only from committed benchmark results (bench/results/).
CUDA_DEFAULT = {"layer_norm": "triton", "frozen_linear": "triton", "max_sim": "triton"}

_requested: str | None = os.environ.get("LEANCLIP_BACKEND") or None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _fix_interpreter_scalar_index() -> None:
    """Work around triton-lang/triton#9171 under ``TRITON_INTERPRET=1``. The triton 3.6 interpreter keeps kernel
    scalars as shape-(1,) numpy arrays and gives them ``__index__ = int(array)``. numpy >= 2.4 rejects that, so
    ``range(runtime_int)`` fails in every kernel. Triton 3.8 squeezes the array first; do the same on interpreters
    that still use the old line. Does nothing off the interpreter and on fixed triton versions."""
    if not triton_interpret():
        return
    try:
        import inspect

        from triton.runtime import interpreter

        patch_lang_tensor = interpreter._patch_lang_tensor
        if "int(self.handle.data))" not in inspect.getsource(patch_lang_tensor):
            return
    except Exception:  # no triton, or a different interpreter layout: leave it alone
        return

    def _patch_lang_tensor(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = _patch_lang_tensor


_fix_interpreter_scalar_index()

def triton_importable() -> bool:
    """Whether triton imported (``leanclip.kernels._backend.triton`` is the module, else None)."""
    return triton is not None


def cuda_extension_loaded() -> bool:
    from leanclip.kernels import _cuda_ext

    return _cuda_ext.load() is not None


def available_backends() -> list[str]:
    """Backends that can run on this machine (for at least one device)."""
    out = ["torch"]
    if triton_importable() and (torch.cuda.is_available() or triton_interpret()):
        out.append("triton")
    if torch.cuda.is_available() and cuda_extension_loaded():
        out.append("cuda")
    return out


def get_backend() -> str | None:
    """The backend the user asked for, or None for automatic choice."""
    return _requested


class set_backend(contextlib.AbstractContextManager):
    """Select a backend for all ops: ``kernels.set_backend("torch")`` sets it for the process;
    ``with kernels.set_backend("triton"): ...`` sets it for the block and restores the previous one.
    ``None`` or ``"auto"`` restores automatic selection."""

    def __init__(self, name: str | None):
        if name == "auto":
            name = None
        if name is not None and name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or 'auto'/None, got {name!r}")
        global _requested
        self._previous = _requested
        _requested = name

    def __exit__(self, *exc):
        global _requested
        _requested = self._previous
        return False


def _can_run(backend: str, device: torch.device) -> tuple[bool, str]:
    if backend == "torch":
        return True, ""
    if backend == "triton":
        if not triton_importable():
            return False, "triton is not installed"
        if device.type == "cuda":
            return True, ""
        if device.type == "cpu" and triton_interpret():
            return True, ""
        return False, f"triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); got {device.type} tensors"
    if backend == "cuda":
        if device.type != "cuda":
            return False, f"the cuda backend needs CUDA tensors; got {device.type} tensors"
        if not cuda_extension_loaded():
            return False, "the leanclip CUDA extension is not built (pip install with nvcc present, or LEANCLIP_CUDA=1)"
        return True, ""
    raise ValueError(f"unknown backend {backend!r}")


def backend_problem(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run ops on tensors of ``device`` (None when it can): lets a caller reject a requested
    backend before any work instead of at the first op."""
    ok, why = _can_run(backend, device)
    return None if ok else why


def resolve(op: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that runs ``op`` on tensors of ``device`` (and ``dtype``, where given)."""
    if _requested is not None:
        ok, why = _can_run(_requested, device)
        if not ok:
            raise RuntimeError(f"kernels.{op}: requested backend {_requested!r} cannot run: {why}")
        return _requested
    if dtype == torch.float64:
        return "torch"
    if device.type == "cuda":
        choice = CUDA_DEFAULT.get(op, "triton")
        if _can_run(choice, device)[0]:
            return choice
        return "triton" if _can_run("triton", device)[0] else "torch"
    if device.type == "cpu" and _can_run("triton", device)[0]:
        return "triton"
    return "torch"
