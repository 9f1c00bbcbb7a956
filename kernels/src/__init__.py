"""leanclip fused ops.

    y = kernels.layer_norm(x, weight, bias, eps=1e-5)   # LayerNorm over the last dim, trainable affine
    y = kernels.frozen_linear(x, weight, bias)          # x @ W.T + b with W frozen; db fused into the dX GEMM
    vals, idx = kernels.max_sim(x, d)                   # row-wise max / argmax of x @ d.T, never materialised

Each op lives in ``kernels/ops/<op>.py``: torch reference (``*_ref``), Triton kernels, launchers, and a
``torch.library`` custom op with autograd, so ``torch.compile`` can trace callers. Backends: see ``_backend``.
"""
from leanclip.kernels._backend import BACKENDS, available_backends, backend_problem, get_backend, set_backend
from leanclip.kernels._backend import resolve as resolve_backend
from leanclip.kernels.ops.frozen_linear import frozen_linear
from leanclip.kernels.ops.layer_norm import layer_norm
from leanclip.kernels.ops.max_sim import max_sim

__all__ = ["layer_norm", "frozen_linear", "max_sim", "available_backends", "set_backend", "get_backend", "BACKENDS",
           "backend_problem", "resolve_backend"]
