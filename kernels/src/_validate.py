"""Input checks shared by every op and backend. Each error names the offending argument.

float64 is accepted by the public ops' structural checks (``check_tensor(..., float64=True)``) because the torch
backend computes in it, which is what ``torch.autograd.gradcheck`` needs. The kernel backends (triton, cuda) have
no float64 path; ``check_backend_dtype`` rejects it there once the backend is known."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(name: str, t, *, min_dim: int = 1, dim: int | None = None, float64: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES and not (float64 and t.dtype == torch.float64):
        also = " (or float64 on the torch backend)" if float64 else ""
        raise TypeError(f"{name} must be float32, bfloat16 or float16{also}, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dim(s), got shape {tuple(t.shape)}")


def check_backend_dtype(backend: str, **tensors) -> None:
    """The kernel backends take float32, bfloat16 and float16 only; float64 runs on the torch backend."""
    if backend == "torch":
        return
    for name, t in tensors.items():
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16 on the {backend} backend, got {t.dtype} "
                            f"(float64 runs on the torch backend: kernels.set_backend('torch'))")


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, *, dtype: bool = True) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")
