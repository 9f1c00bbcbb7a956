"""kernels.frozen_linear: y = x·Wᵀ + b with W frozen; dx and db (fused into the dx GEMM) only.

Every backend that runs here is compared with the float64 torch reference on the CPU (relative Frobenius error);
the Triton kernels run under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes stay small.
"""
from __future__ import annotations

import pytest
import torch

from leanclip import kernels
from leanclip.kernels.ops import frozen_linear as fl_mod
from leanclip.kernels.ops.frozen_linear import frozen_linear_bwd_ref, frozen_linear_ref

BACKENDS = [b for b in ("torch", "triton") if b in kernels.available_backends()]
TOL = {torch.float32: {"torch": 1e-5, "triton": 5e-4}, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _tol(dtype, backend):
    t = TOL[dtype]
    return t[backend] if isinstance(t, dict) else t


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    out, ref = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out).all(), "non-finite values in output"
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)


def _make(lead, k, n, dtype, *, bias="trainable", bias_dtype=None, x_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g).to(dtype).requires_grad_(x_grad)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = None
    if bias != "none":
        b = torch.randn(n, generator=g).to(bias_dtype or dtype).requires_grad_(bias == "trainable")
    dy = torch.randn(*lead, n, generator=g).to(dtype)
    return x, w, b, dy


def _run(backend, x, w, b, dy):
    with kernels.set_backend(backend):
        y = kernels.frozen_linear(x, w, b)
        if y.requires_grad:
            y.backward(dy)
    return y


def _reference(x, w, b, dy):
    xd = x.detach().double().requires_grad_(x.requires_grad)
    bd = None if b is None else b.detach().double().requires_grad_(b.requires_grad)
    yd = frozen_linear_ref(xd, w.double(), bd)
    if yd.requires_grad:
        yd.backward(dy.double())
    return yd, xd.grad, (None if bd is None else bd.grad)


def _check(backend, x, w, b, dy):
    y = _run(backend, x, w, b, dy)
    yr, dxr, dbr = _reference(x, w, b, dy)
    tol = _tol(x.dtype, backend)
    assert y.dtype == x.dtype and y.shape == yr.shape
    assert _rel(y, yr) < tol
    if x.requires_grad:
        assert x.grad is not None and x.grad.dtype == x.dtype and x.grad.shape == x.shape
        assert _rel(x.grad, dxr) < tol
    else:
        assert x.grad is None
    if b is not None and b.requires_grad:
        assert b.grad is not None and b.grad.dtype == b.dtype
        assert _rel(b.grad, dbr) < tol
    elif b is not None:
        assert b.grad is None


# ------------------------------------------------------------------------------------------------ accuracy
SHAPES = [  # (leading dims, K, Nout)
    ((1,), 64, 96),
    ((7,), 64, 96),
    ((197,), 64, 96),
    ((1000,), 64, 96),
    ((3, 197), 64, 96),
    ((7,), 768, 3072),
    ((33,), 1023, 65),
    ((65,), 96, 1023),
    ((300,), 200, 130),  # several row blocks × several column blocks, a partial last group
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,k,n", SHAPES)
def test_matches_reference_fp32(backend, lead, k, n):
    _check(backend, *_make(lead, k, n, torch.float32))


def test_large_shape_torch_backend():
    _check("torch", *_make((197,), 768, 3072, torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead,k,n", [((3, 197), 64, 96), ((7,), 1023, 65)])
def test_matches_reference_16bit(backend, dtype, lead, k, n):
    _check(backend, *_make(lead, k, n, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_fp32_bias(backend, dtype):
    x, w, b, dy = _make((2, 61), 64, 96, dtype, bias_dtype=torch.float32)
    _check(backend, x, w, b, dy)
    assert b.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", ["none", "frozen", "trainable"])
@pytest.mark.parametrize("x_grad", [True, False])
def test_grad_combinations(backend, bias, x_grad):
    x, w, b, dy = _make((2, 45), 64, 80, torch.float32, bias=bias, x_grad=x_grad)
    with kernels.set_backend(backend):
        assert kernels.frozen_linear(x, w, b).requires_grad == (x_grad or bias == "trainable")
    _check(backend, x, w, b, dy)  # grads exactly where needed (x.grad / b.grad None otherwise)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_x(backend):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 64, generator=g) / 8
    b = torch.randn(96, generator=g).requires_grad_()
    cases = [
        torch.randn(64, 37, generator=g).t(),  # transposed: last-dim stride 37
        torch.randn(5, 40, 64, generator=g)[:, ::3],  # strided rows, contiguous last dim
        torch.randn(29, 128, generator=g)[:, ::2],  # last-dim stride 2
    ]
    for x in cases:
        assert not x.is_contiguous()
        x = x.detach().requires_grad_()
        b.grad = None
        dy = torch.randn(*x.shape[:-1], 96, generator=g)
        _check(backend, x, w, b, dy)
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_dy_and_1d_x(backend):
    w = torch.randn(48, 64) / 8
    b = torch.randn(48, requires_grad=True)
    x = torch.randn(3, 5, 64, requires_grad=True)
    with kernels.set_backend(backend):
        kernels.frozen_linear(x, w, b).sum().backward()  # dy is a stride-0 expanded tensor
    assert torch.allclose(x.grad, w.sum(0).expand(3, 5, 64), atol=1e-5)
    assert torch.allclose(b.grad, torch.full((48,), 15.0))
    x1 = torch.randn(64, requires_grad=True)
    b.grad = None
    _check(backend, x1, w, b, torch.randn(48))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_weight_and_bias(backend):
    """The dx kernels index W through both its strides; bias/db never assume a unit stride."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 21, 64, generator=g).requires_grad_()
    weights = [
        (torch.randn(64, 96, generator=g) / 8).t(),  # transposed: strides (1, 96)
        (torch.randn(96, 128, generator=g) / 8)[:, ::2],  # column stride 2
        (torch.randn(192, 64, generator=g) / 8)[1::2],  # row stride 128, storage offset
    ]
    for w in weights:
        assert not w.is_contiguous() and w.shape == (96, 64)
        b = torch.randn(288, generator=g)[::3].requires_grad_()
        x.grad = None
        _check(backend, x, w, b, torch.randn(3, 21, 96, generator=g))


# ------------------------------------------------------------------------------------------------ float64
def test_float64_gradcheck_torch_backend():
    """The torch backend keeps float64 (db included), so gradcheck holds on the public op."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 7, dtype=torch.float64, generator=g)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    with kernels.set_backend("torch"):
        y = kernels.frozen_linear(x, w, b)
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, frozen_linear_ref(x, w, b), rtol=1e-12, atol=1e-12)
        assert torch.autograd.gradcheck(lambda x, b: kernels.frozen_linear(x, w, b), (x, b))
        assert torch.autograd.gradcheck(lambda b: kernels.frozen_linear(x.detach(), w, b), (b,))
        assert torch.autograd.gradcheck(lambda x: kernels.frozen_linear(x, w.t().contiguous().t(), None), (x,))
        dx, db = torch.ops.leanclip.frozen_linear_bwd(torch.randn(3, 4, dtype=torch.float64), w, True, True, "torch")
        assert dx.dtype == db.dtype == torch.float64
    # the fake (meta) kernels report the float64 db the torch backend returns
    torch.library.opcheck(torch.ops.leanclip.frozen_linear_fwd.default, (x, w, b, "torch"))
    torch.library.opcheck(torch.ops.leanclip.frozen_linear_bwd.default,
                          (torch.randn(3, 4, dtype=torch.float64), w, True, True, "torch"))
    # automatic selection sends float64 to torch, even where float32 would go to Triton
    with kernels.set_backend("auto"):
        torch.testing.assert_close(kernels.frozen_linear(x, w, b), frozen_linear_ref(x, w, b), rtol=0, atol=0)


def test_float64_rejected_by_triton_backend():
    x, w, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64), None
    with kernels.set_backend("triton"):
        with pytest.raises(TypeError, match=r"x must be float32, bfloat16 or float16 on the triton backend.*float64"):
            kernels.frozen_linear(x, w, b)


# ------------------------------------------------------------------------------------------------ kernel variants
VARIANT_CONFIGS = [  # bypass the autotuner: tile shapes, grouping, and both ways of placing the db partial sums
    dict(BLOCK_M=16, BLOCK_K=64, BLOCK_N=32, GROUP_M=1, DB_SPREAD=False),
    dict(BLOCK_M=32, BLOCK_K=64, BLOCK_N=32, GROUP_M=2, DB_SPREAD=True),
    dict(BLOCK_M=64, BLOCK_K=32, BLOCK_N=64, GROUP_M=8, DB_SPREAD=True),
    dict(BLOCK_M=32, BLOCK_K=128, BLOCK_N=32, GROUP_M=3, DB_SPREAD=False),
]


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend")
@pytest.mark.parametrize("use_tma", [False, True], ids=["pointer", "tma"])
@pytest.mark.parametrize("config", VARIANT_CONFIGS, ids=lambda c: f"m{c['BLOCK_M']}k{c['BLOCK_K']}n{c['BLOCK_N']}"
                         f"g{c['GROUP_M']}{'s' if c['DB_SPREAD'] else ''}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_variants(use_tma, config, dtype):
    # M, K, Nout not multiples of the tiles; rows 16-byte aligned so the TMA flavour can run too
    g = torch.Generator().manual_seed(5)
    dy = torch.randn(70, 136, generator=g).to(dtype)
    w = (torch.randn(136, 104, generator=g) / 12).to(dtype)
    dxr, dbr = frozen_linear_bwd_ref(dy.double(), w.double(), True)
    for need_db in (True, False) if not config["DB_SPREAD"] else (True,):  # DB_SPREAD only matters with db
        dx, db = fl_mod._dx_db_triton(dy, w, need_db, use_tma=use_tma, config=config)
        assert dx.dtype == dtype and _rel(dx, dxr) < _tol(dtype, "triton")
        if need_db:
            assert db.dtype == torch.float32 and _rel(db, dbr) < 1e-5
        else:
            assert db is None


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tma_flavour_end_to_end(dtype, monkeypatch):
    monkeypatch.setattr(fl_mod, "_use_tma", lambda dy2d, weight: True)
    _check("triton", *_make((3, 37), 64, 96, dtype))


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend")
@pytest.mark.parametrize("x_grad", [True, False])
def test_every_output_element_written(x_grad, monkeypatch):
    # every buffer the launchers allocate starts as NaN: anything left unwritten would show up
    real_empty = torch.empty

    def poisoned_empty(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    x, w, b, dy = _make((300,), 130, 200, torch.float32, x_grad=x_grad)
    with kernels.set_backend("triton"):
        y = kernels.frozen_linear(x, w, b)
    monkeypatch.setattr(torch, "empty", poisoned_empty)
    y.backward(dy)
    monkeypatch.undo()
    _, dxr, dbr = _reference(x, w, b, dy)
    if x_grad:
        assert _rel(x.grad, dxr) < 5e-4
    assert _rel(b.grad, dbr) < 1e-5


# ------------------------------------------------------------------------------------------------ semantics
@pytest.mark.parametrize("backend", BACKENDS)
def test_only_db_skips_gemm(backend):
    def boom(*a, **k):
        raise AssertionError("the dx GEMM must not run when x does not require grad")

    x, w, b, dy = _make((1000,), 64, 96, torch.float32, x_grad=False)  # several row groups in the column sum
    with kernels.set_backend(backend):
        y = kernels.frozen_linear(x, w, b)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fl_mod, "_dx_db_triton", boom)
        mp.setattr(torch, "mm", boom)
        mp.setattr(torch, "matmul", boom)
        y.backward(dy)
    yr, _, dbr = _reference(x, w, b, dy)
    assert x.grad is None
    assert _rel(y, yr) < _tol(torch.float32, backend) and _rel(b.grad, dbr) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_x_not_saved(backend):
    x, w, b, dy = _make((4, 33), 64, 96, torch.float32)
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), kernels.set_backend(backend):
        y = kernels.frozen_linear(x, w, b)
    assert len(packed) >= 1
    for t in packed:  # only the frozen weight (a parameter): no activation
        assert t.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
        assert t.shape == w.shape
    y.backward(dy)
    assert x.grad is not None and b.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_db_deterministic(backend):
    x, w, b, dy = _make((300,), 64, 96, torch.float32)
    grads = []
    for _ in range(2):
        x.grad = None
        b.grad = None
        _run(backend, x, w, b, dy)
        grads.append((x.grad.clone(), b.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_zero_rows(backend, lead):
    x, w, b, dy = _make(lead, 64, 96, torch.float32)
    y = _run(backend, x, w, b, dy)
    assert y.shape == (*lead, 96)
    assert x.grad.shape == x.shape
    assert torch.equal(b.grad, torch.zeros(96))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,n", [(0, 12), (12, 0)])
def test_zero_width(backend, k, n):
    x, w, b, dy = _make((5,), k, n, torch.float32)
    y = _run(backend, x, w, b, dy)
    assert y.shape == (5, n)
    assert torch.equal(y, b.detach().expand(5, n))
    assert torch.equal(x.grad, torch.zeros(5, k)) and torch.allclose(b.grad, dy.sum(0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend):
    x, w, b, dy = _make((70,), 64, 96, torch.float32)
    with torch.no_grad():
        x[5, 3] = float("nan")
    dy[9, 7] = float("nan")
    y = _run(backend, x, w, b, dy)
    assert torch.isnan(y[5]).all() and not torch.isnan(y[6]).any()
    assert torch.isnan(x.grad[9]).all() and not torch.isnan(x.grad[10]).any()
    assert torch.isnan(b.grad[7]) and not torch.isnan(b.grad[8])


def test_bwd_ref():
    dy = torch.randn(2, 5, 12, dtype=torch.float64)
    w = torch.randn(12, 7, dtype=torch.float64)
    dx, db = frozen_linear_bwd_ref(dy, w, True)
    assert torch.allclose(dx, dy @ w) and torch.allclose(db, dy.sum((0, 1)))
    assert frozen_linear_bwd_ref(dy, w, False)[1] is None


def test_gradcheck_reference():
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 7, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: frozen_linear_ref(x, w, b), (x, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("need_dx,need_db", [(True, True), (True, False), (False, True)])
def test_bwd_op_matches_bwd_ref(backend, need_dx, need_db):
    dy = torch.randn(3, 41, 80)
    w = torch.randn(80, 64) / 8
    dx, db = torch.ops.leanclip.frozen_linear_bwd(dy, w, need_dx, need_db, backend)
    dxr, dbr = frozen_linear_bwd_ref(dy.double(), w.double(), True)
    if need_dx:
        assert _rel(dx, dxr) < _tol(torch.float32, backend)
    else:
        assert dx.numel() == 0
    if need_db:
        assert db.dtype == torch.float32 and _rel(db, dbr) < 1e-5
    else:
        assert db.numel() == 0


# ------------------------------------------------------------------------------------------------ errors
def test_trainable_weight_raises():
    w = torch.randn(8, 4, requires_grad=True)
    with pytest.raises(ValueError, match="weight.*(freeze|F.linear|functional.linear)"):
        kernels.frozen_linear(torch.randn(3, 4), w, None)


def _bad_inputs():
    x, w, b = torch.randn(3, 4), torch.randn(8, 4), torch.randn(8)
    return [
        ("not_tensor_x", ([[1.0] * 4], w, b), TypeError, "x"),
        ("int_x", (x.long(), w, b), TypeError, "x"),
        ("int_w", (x, w.int(), b), TypeError, "weight"),
        ("int_b", (x, w, b.long()), TypeError, "bias"),
        ("complex_x", (x.to(torch.complex64), w, b), TypeError, "x"),
        ("f64_w_for_fp32_x", (x, w.double(), b), TypeError, "weight"),
        ("f64_b_for_fp32_x", (x, w, b.double()), TypeError, "bias"),
        ("fp32_b_for_f64_x", (x.double(), w.double(), b), TypeError, "bias"),
        ("x_0d", (torch.tensor(1.0), w, b), ValueError, "x"),
        ("w_1d", (x, w.flatten(), b), ValueError, "weight"),
        ("w_3d", (x, w[None], b), ValueError, "weight"),
        ("w_k_mismatch", (x, torch.randn(8, 5), b), ValueError, "weight"),
        ("b_2d", (x, w, b[None]), ValueError, "bias"),
        ("b_wrong_len", (x, w, torch.randn(7)), ValueError, "bias"),
        ("w_dtype", (x, w.half(), b), TypeError, "weight"),
        ("b_dtype_fp16_for_fp32_x", (x, w, b.half()), TypeError, "bias"),
        ("b_dtype_fp16_for_bf16_x", (x.bfloat16(), w.bfloat16(), b.half()), TypeError, "bias"),
        ("w_device", (x, w.to("meta"), b), ValueError, "weight"),
        ("b_device", (x, w, b.to("meta")), ValueError, "bias"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_inputs(case):
    _, args, exc, name = case
    with pytest.raises(exc, match=name):
        kernels.frozen_linear(*args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cuda_backend_on_cpu_raises():
    with kernels.set_backend("cuda"), pytest.raises(RuntimeError, match="cuda"):
        kernels.frozen_linear(torch.randn(3, 4), torch.randn(8, 4), None)


# ------------------------------------------------------------------------------------------------ tracing
def test_opcheck():
    x = torch.randn(2, 9, 16, requires_grad=True)
    w = torch.randn(24, 16)
    b = torch.randn(24, requires_grad=True)
    torch.library.opcheck(torch.ops.leanclip.frozen_linear_fwd.default, (x, w, b, "torch"))
    torch.library.opcheck(torch.ops.leanclip.frozen_linear_fwd.default, (x.detach(), w, None, "torch"))
    torch.library.opcheck(torch.ops.leanclip.frozen_linear_bwd.default, (torch.randn(2, 9, 24), w, True, True, "torch"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_smoke(backend):
    torch._dynamo.reset()
    x, w, b, dy = _make((2, 19), 64, 96, torch.float32)

    def f(x, b):
        return torch.nn.functional.gelu(kernels.frozen_linear(x, w, b))

    with kernels.set_backend(backend):
        y = torch.compile(f, backend="aot_eager", fullgraph=True)(x, b)
        y.backward(dy)
    xr, br = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    torch.nn.functional.gelu(frozen_linear_ref(xr, w, br)).backward(dy)
    assert torch.allclose(y, torch.nn.functional.gelu(frozen_linear_ref(xr, w, br)), atol=1e-5)
    assert torch.allclose(x.grad, xr.grad, atol=1e-5) and torch.allclose(b.grad, br.grad, atol=1e-4)
