"""pytest-benchmark versions of the op benchmarks (bench/ops.py): leanclip against plain PyTorch eager.

    python -m pytest tests/bench --benchmark-only [--benchmark-json=ops.json]

Skipped in the normal suite (tests/bench/conftest.py). Each test times one implementation of one op at one shape and
dtype; ``benchmark.group`` puts "leanclip" (the backend in force, recorded in extra_info) and "torch" (eager) of the
same op/shape/dtype in one table. Before timing, each implementation's outputs and gradients are checked once
against the op's ``*_ref`` in float64, so a broken op fails instead of winning.

CUDA: CLIP shapes, bf16 and fp32, a ``torch.cuda.synchronize()`` inside every timed call. CPU: small fp32 shapes on
the torch backend (never the Triton interpreter, which is a test tool, not a speed), so the run takes seconds; as
docs/MEASURING.md says, only the ratios within a group mean anything on a shared CPU box.
"""
import pytest
import torch
import torch.nn.functional as F

from leanclip import kernels
from leanclip.kernels import _backend
from leanclip.kernels.ops.frozen_linear import frozen_linear_bwd_ref, frozen_linear_ref
from leanclip.kernels.ops.layer_norm import layer_norm_ref
from leanclip.kernels.ops.max_sim import max_sim_ref

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
IMPLS = ["leanclip", "torch"]

if CUDA:
    LN_SHAPES = [(64 * 197, 768), (64 * 197, 1024)]  # (rows, width): ViT-B/16 and ViT-L/14 token rows, batch 64
    FL_SHAPES = [(64 * 197, 768, 3072), (64 * 197, 3072, 768)]  # (rows, in, out): MLP fc1 and fc2 of ViT-B/16
    MS_SHAPES = [(4096, 8192, 512)]  # (queries, bank rows, dim)
    DTYPES = [torch.bfloat16, torch.float32]
else:
    LN_SHAPES = [(8 * 197, 768)]
    FL_SHAPES = [(4 * 197, 768, 3072)]
    MS_SHAPES = [(256, 8192, 512)]
    DTYPES = [torch.float32]

# ‖out − ref‖ / ‖ref‖ against float64 (docs/MEASURING.md): fp32 far below 1e-4 (tf32 ~3e-4), bf16 1e-3 .. 1e-2
TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2}
_DT = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.fixture(autouse=True)
def _leanclip_backend():
    """CPU: the torch backend (tests/conftest.py turns the Triton interpreter on). CUDA: the backend in force."""
    if not CUDA:
        with kernels.set_backend("torch"):
            yield
        return
    if _backend.triton_interpret():
        pytest.skip("TRITON_INTERPRET=1 was set when kernels was imported: the Triton kernels would be interpreted. "
                    "Run `TRITON_INTERPRET=0 python -m pytest tests/bench --benchmark-only`")
    yield


def _grid(shapes, **variants):
    """Parametrize a benchmark over dtype, shape, the op's variants and the implementation."""
    def deco(fn):
        fn = pytest.mark.parametrize("impl", IMPLS)(fn)
        for name, values in variants.items():
            fn = pytest.mark.parametrize(name, values)(fn)
        fn = pytest.mark.parametrize("shape", shapes, ids=["x".join(map(str, s)) for s in shapes])(fn)
        return pytest.mark.parametrize("dtype", DTYPES, ids=_DT.get)(fn)
    return deco


def _check_and_time(benchmark, step, outs, refs, impl, op, shape, dtype, **extra):
    """Fail unless each of ``outs`` (one call's results) is within TOL of its float64 ref, then time ``step`` in the
    group "op shape dtype"; ``extra`` goes into the JSON's extra_info."""
    for i, (out, ref) in enumerate(zip(outs, refs, strict=True)):
        out, ref = out.double(), ref.double()
        assert out.shape == ref.shape, f"{op}/{impl}[{i}]: shape {tuple(out.shape)} != {tuple(ref.shape)}"
        assert torch.isfinite(out).all(), f"{op}/{impl}[{i}]: non-finite values"
        err = ((out - ref).norm() / ref.norm()).item()
        assert err <= TOL[dtype], f"{op}/{impl}[{i}]: relative error {err:.2e} > {TOL[dtype]:.0e} against float64"
    benchmark.group = f"{op} {'x'.join(map(str, shape))} {_DT[dtype]}"
    backend = _backend.resolve(op.split()[0], DEVICE) if impl == "leanclip" else "eager"
    benchmark.extra_info.update(impl=impl, backend=backend, device=str(DEVICE), shape=list(shape),
                                dtype=_DT[dtype], **extra)
    benchmark(step)


@_grid(LN_SHAPES)
def test_layer_norm_fwd_bwd(benchmark, impl, shape, dtype):
    """LayerNorm forward + backward with dx, dγ and dβ (LN tuning)."""
    torch.manual_seed(0)
    m, n = shape
    x = torch.randn(m, n, device=DEVICE, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(n, device=DEVICE, dtype=dtype)).requires_grad_()
    b = (0.1 * torch.randn(n, device=DEVICE, dtype=dtype)).requires_grad_()
    dy = torch.randn(m, n, device=DEVICE, dtype=dtype)
    if impl == "leanclip":
        fn = lambda: kernels.layer_norm(x, w, b, 1e-5)
    else:
        fn = lambda: F.layer_norm(x, (n,), w, b, 1e-5)

    def step():
        y = fn()
        grads = torch.autograd.grad(y, (x, w, b), dy)
        _sync()
        return (y, *grads)

    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = layer_norm_ref(x64, w64, b64, 1e-5)
    refs = (y64, *torch.autograd.grad(y64, (x64, w64, b64), dy.double()))
    _check_and_time(benchmark, step, step(), refs, impl, "layer_norm fwd+bwd", shape, dtype,
                    bytes=5 * m * n * x.element_size())


@_grid(FL_SHAPES, grads=["dx+db", "db"])
def test_frozen_linear_fwd_bwd(benchmark, impl, grads, shape, dtype):
    """``x·Wᵀ + b`` forward + backward with W frozen and only the bias trainable (BitFit): db, plus dx when the
    input needs a gradient (a layer inside the network) -- "db" alone is the first trainable layer."""
    torch.manual_seed(0)
    m, k, n = shape
    x = torch.randn(m, k, device=DEVICE, dtype=dtype, requires_grad=grads == "dx+db")
    weight = torch.randn(n, k, device=DEVICE, dtype=dtype) / k**0.5
    bias = (0.1 * torch.randn(n, device=DEVICE, dtype=dtype)).requires_grad_()
    dy = torch.randn(m, n, device=DEVICE, dtype=dtype)
    inputs = (x, bias) if x.requires_grad else (bias,)
    if impl == "leanclip":
        fn = lambda: kernels.frozen_linear(x, weight, bias)
    else:
        fn = lambda: F.linear(x, weight, bias)  # x @ W.T + b in one addmm, as nn.Linear with a frozen weight

    def step():
        y = fn()
        g = torch.autograd.grad(y, inputs, dy)
        _sync()
        return (y, *g)

    w64 = weight.double()
    dx64, db64 = frozen_linear_bwd_ref(dy.double(), w64)
    y64 = frozen_linear_ref(x.detach().double(), w64, bias.detach().double())
    refs = (y64, dx64, db64) if x.requires_grad else (y64, db64)
    _check_and_time(benchmark, step, step(), refs, impl, f"frozen_linear fwd+bwd({grads})", shape, dtype,
                    flops=2 * m * k * n * (1 + x.requires_grad))


@_grid(MS_SHAPES, passes=["fwd", "fwd+bwd"])
def test_max_sim(benchmark, impl, passes, shape, dtype):
    """Row max/argmax of ``x·dᵀ`` (N queries against a frozen bank of M rows): leanclip never materialises the N×M
    scores, eager does ``(x @ d.T).max(1)``. "fwd+bwd" adds dx of the max values."""
    torch.manual_seed(0)
    n, m, k = shape
    bwd = passes == "fwd+bwd"
    x = torch.randn(n, k, device=DEVICE, dtype=dtype, requires_grad=bwd)
    d = torch.randn(m, k, device=DEVICE, dtype=dtype)
    dvals = torch.randn(n, device=DEVICE)
    if impl == "leanclip":
        fn = lambda: kernels.max_sim(x, d)
    else:
        fn = lambda: (x @ d.T).max(dim=1)

    def step():
        vals, idx = fn()
        out = (vals, idx)
        if bwd:
            out += torch.autograd.grad(vals, (x,), dvals.to(vals.dtype))
        _sync()
        return out

    x64, d64 = x.detach().double(), d.double()
    vals64, _ = max_sim_ref(x64, d64)
    vals, idx, *dx = step()
    # ties (frequent once eager rounds the scores to bf16) may pick another row: check that the row picked scores
    # the maximum, rather than comparing indices
    picked = (x64 * d64.index_select(0, idx)).sum(-1)
    refs = [vals64, vals64]
    if bwd:
        refs.append(dvals.double()[:, None] * d64.index_select(0, idx))  # d vals[i] / d x[i] = d[idx[i]]
    _check_and_time(benchmark, step, [vals, picked, *dx], refs, impl, f"max_sim {passes}", shape, dtype,
                    flops=2 * n * m * k)
