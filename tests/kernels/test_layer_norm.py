"""kernels.layer_norm: every backend against layer_norm_ref in float64 (forward and all gradients)."""
import math

import pytest
import torch
import torch.nn.functional as F

from leanclip import kernels
import leanclip.kernels.ops.layer_norm as ln_mod
from leanclip.kernels.ops.layer_norm import layer_norm_ref

BACKENDS = ["torch", "triton"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(name, out, ref, dtype):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"{name}: relative error {err:.3g} >= {TOL[dtype]}"
    # Element-wise too, so a single unwritten/garbage element cannot hide in the norm.
    scale = ref.detach().double().abs().max().item() + 1e-30
    worst = (out.detach().double() - ref.detach().double()).abs().max().item() / scale
    assert worst < 50 * TOL[dtype], f"{name}: worst element error {worst:.3g} (relative to max |ref|)"


def make(shape, dtype, *, weight=True, bias=True, wdtype=None, grads=(True, True, True)):
    wdtype = wdtype or dtype
    n = shape[-1]
    x = torch.randn(shape, dtype=dtype).mul_(2).add_(0.5)
    w = (torch.randn(n, dtype=wdtype) * 0.5 + 1) if weight else None
    b = torch.randn(n, dtype=wdtype) * 0.5 if bias else None
    x.requires_grad_(grads[0])
    if w is not None:
        w.requires_grad_(grads[1])
    if b is not None:
        b.requires_grad_(grads[2])
    return x, w, b


def run_and_check(backend, x, w, b, eps=1e-5, dy=None):
    """Forward + backward on `backend` vs layer_norm_ref in float64; checks y and every requested gradient."""
    with kernels.set_backend(backend):
        y = kernels.layer_norm(x, w, b, eps)
    assert y.dtype == x.dtype and y.shape == x.shape
    if dy is None:
        dy = torch.randn(x.shape, dtype=x.dtype)
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    xd, wd, bd = (None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in (x, w, b))
    yr = layer_norm_ref(xd, wd, bd, eps)
    assert_close("y", y, yr, x.dtype)
    if not inputs:
        return
    with kernels.set_backend(backend):
        grads = torch.autograd.grad(y, inputs, dy)
    refs = torch.autograd.grad(yr, [t for t in (xd, wd, bd) if t is not None and t.requires_grad], dy.double())
    names = [n for n, t in zip(("dx", "dweight", "dbias"), (x, w, b)) if t is not None and t.requires_grad]
    for name, g, r, t in zip(names, grads, refs, inputs):
        assert g.dtype == t.dtype, f"{name} dtype {g.dtype} != {t.dtype}"
        assert_close(name, g, r, x.dtype)


# Triton shapes stay small: the interpreter runs each program in numpy (~ms per forward row).
CASES = {
    "torch": [
        ((1, 7), torch.float32),
        ((3, 197, 768), torch.float32),
        ((5, 1000, 64), torch.bfloat16),
        ((4, 512), torch.bfloat16),
        ((3, 1023), torch.float32),
        ((2, 1023), torch.float16),
        ((16, 1280), torch.bfloat16),
        ((2, 4100), torch.float32),
        ((2, 8200), torch.float32),
    ],
    "triton": [
        ((1, 7), torch.float32),
        ((2, 197, 768), torch.float32),
        ((5, 40, 64), torch.bfloat16),
        ((4, 512), torch.bfloat16),
        ((3, 1023), torch.float32),
        ((2, 1023), torch.float16),
        ((16, 1280), torch.bfloat16),
        ((2, 4100), torch.float32),  # single pass, BLOCK_N = 8192
        ((2, 8200), torch.float32),  # wider than _MAX_BLOCK_N: column-block loops
    ],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(CASES["torch"])))
def test_matches_reference(backend, case):
    shape, dtype = CASES[backend][case]
    torch.manual_seed(case)
    run_and_check(backend, *make(shape, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight,bias", [(True, True), (True, False), (False, True), (False, False)])
def test_affine_optional(backend, weight, bias):
    torch.manual_seed(1)
    run_and_check(backend, *make((6, 96), torch.float32, weight=weight, bias=bias))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_fp32_params(backend, dtype):
    torch.manual_seed(2)
    run_and_check(backend, *make((10, 768), dtype, wdtype=torch.float32))
    # weight in fp32, bias in x's dtype is allowed too
    x, w, _ = make((3, 64), dtype, wdtype=torch.float32)
    b = torch.randn(64, dtype=dtype, requires_grad=True)
    run_and_check(backend, x, w, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_is_used(backend):
    torch.manual_seed(3)
    x, w, b = make((4, 33), torch.float32)
    x = (x * 1e-2).detach().requires_grad_()  # variance ~ eps: eps matters
    run_and_check(backend, x, w, b, eps=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    torch.manual_seed(4)
    # transpose: leading dims not collapsible into one row stride -> copied
    base = torch.randn(50, 3, 64)
    x = base.transpose(0, 1).requires_grad_()
    assert not x.is_contiguous()
    _, w, b = make((64,), torch.float32)
    run_and_check(backend, x, w, b)
    # strided slice of the last dim: a 2-D view with row stride 100
    x = torch.randn(2, 7, 100)[..., 10:74].requires_grad_()
    run_and_check(backend, x, w, b)
    # non-unit last-dim stride
    x = torch.randn(5, 128)[:, ::2].requires_grad_()
    run_and_check(backend, x, w, b)
    # dy with row stride 0 (expanded) and dy non-contiguous
    x = torch.randn(9, 64, requires_grad=True)
    run_and_check(backend, x, w, b, dy=torch.randn(64).expand(9, 64))
    run_and_check(backend, x, w, b, dy=torch.randn(64, 9).t())


def _strided_leaf(n, dtype, step, offset=0):
    """A length-n leaf that is a strided view of a bigger buffer (stride ``step``, storage offset ``offset``)."""
    base = torch.randn(n * step + offset, dtype=dtype) * 0.5 + 1
    return base[offset::step][:n].detach().requires_grad_()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                          (torch.float16, torch.float16)])
def test_strided_weight_and_bias(backend, dtype, wdtype):
    """weight/bias views with non-unit strides (and a storage offset): forward and all grads match the reference."""
    torch.manual_seed(13)
    n = 24
    x, _, _ = make((5, n), dtype)
    w = _strided_leaf(n, wdtype, 2)
    b = _strided_leaf(n, wdtype, 3, offset=1)
    assert w.stride() == (2,) and b.stride() == (3,)
    run_and_check(backend, x, w, b)
    # weight alone, a column of a matrix (stride 5); bias alone
    w_col = (torch.randn(n, 5, dtype=wdtype) + 1)[:, 2].detach().requires_grad_()
    run_and_check(backend, x, w_col, None)
    run_and_check(backend, x, None, b)
    # only dx asked for: the backward still reads weight
    run_and_check(backend, x, w.detach(), b.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_everything(backend):
    """x with a non-unit last stride, strided weight/bias, a transposed dy, and a stride-0 (expanded) weight."""
    torch.manual_seed(14)
    n = 32
    x = torch.randn(6, 2 * n)[:, ::2].requires_grad_()
    w, b = _strided_leaf(n, torch.float32, 2), _strided_leaf(n, torch.float32, 4, offset=3)
    run_and_check(backend, x, w, b, dy=torch.randn(n, 6).t())
    w_scalar = torch.randn(1).add_(1).requires_grad_()
    w_expanded = w_scalar.expand(n)  # one value broadcast over the row: stride 0
    with kernels.set_backend(backend):
        y = kernels.layer_norm(x, w_expanded, b)
    dy = torch.randn(6, n)
    gx, gws, gb = torch.autograd.grad(y, (x, w_scalar, b), dy)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w_scalar, b))
    yr = layer_norm_ref(xd, wd.expand(n), bd)
    assert_close("y", y, yr, torch.float32)
    refs = torch.autograd.grad(yr, (xd, wd, bd), dy.double())
    for name, g, r in zip(("dx", "dweight", "dbias"), (gx, gws, gb), refs):
        assert_close(name, g, r, torch.float32)


@pytest.mark.parametrize("n", [256, 300])
def test_triton_column_loop_path_strided_affine(monkeypatch, n):
    """The column-block loops (forward and backward) read weight/bias too."""
    monkeypatch.setattr(ln_mod, "_MAX_BLOCK_N", 128)
    torch.manual_seed(15)
    x, _, _ = make((4, n), torch.float32)
    run_and_check("triton", x, _strided_leaf(n, torch.float32, 2), _strided_leaf(n, torch.float32, 3, offset=2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_backward_expanded_grad(backend):
    # y.sum().backward() hands the op a fully stride-0 dy
    torch.manual_seed(5)
    x, w, b = make((3, 5, 48), torch.float32)
    with kernels.set_backend(backend):
        kernels.layer_norm(x, w, b).sum().backward()
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    layer_norm_ref(xd, wd, bd).sum().backward()
    for t, r in ((x, xd), (w, wd), (b, bd)):
        assert_close("grad", t.grad, r.grad, torch.float32)


@pytest.mark.parametrize("weight,bias", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("n", [256, 300])
def test_triton_column_loop_path(monkeypatch, weight, bias, n):
    """Rows wider than _MAX_BLOCK_N loop over column blocks (forward and backward); lowered here to stay cheap."""
    monkeypatch.setattr(ln_mod, "_MAX_BLOCK_N", 128)
    torch.manual_seed(6)
    run_and_check("triton", *make((11, n), torch.float32, weight=weight, bias=bias))
    run_and_check("triton", *make((3, n), torch.bfloat16, weight=weight, bias=bias, wdtype=torch.float32))
    # subsets of gradients on the looping path
    run_and_check("triton", *make((5, n), torch.float32, weight=weight, bias=bias, grads=(False, True, True)))
    run_and_check("triton", *make((5, n), torch.float32, weight=weight, bias=bias, grads=(True, False, False)))


GRAD_SUBSETS = [(True, False, False), (False, True, False), (False, False, True), (False, True, True),
                (True, True, False), (False, False, False)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grads", GRAD_SUBSETS)
def test_needs_input_grad_subsets(backend, grads, monkeypatch):
    torch.manual_seed(7)
    x, w, b = make((13, 80), torch.float32, grads=grads)
    seen = []
    if backend == "triton":
        real = ln_mod._layer_norm_bwd_triton

        def spy(dy2d, x2d, weight, mean, rstd, need_dx, need_dw, need_db):
            seen.append((need_dx, need_dw, need_db))
            return real(dy2d, x2d, weight, mean, rstd, need_dx, need_dw, need_db)

        monkeypatch.setattr(ln_mod, "_layer_norm_bwd_triton", spy)
    run_and_check(backend, x, w, b)
    with kernels.set_backend(backend):
        y = kernels.layer_norm(x, w, b)
    assert y.requires_grad == any(grads)
    if any(grads):
        y.backward(torch.randn_like(y))
        for t, need in zip((x, w, b), grads):
            assert (t.grad is not None) == need
    if backend == "triton" and any(grads):
        assert seen and all(s == grads for s in seen), seen


def test_triton_dweight_dbias_deterministic():
    """dγ/dβ come from per-program partials plus a fixed-order sum: bit-identical across runs."""
    torch.manual_seed(8)
    x, w, b = make((100, 96), torch.float32)  # 7 row tiles over 4 programs: several tiles per program
    dy = torch.randn(100, 96)
    results = []
    with kernels.set_backend("triton"):
        for _ in range(2):
            y = kernels.layer_norm(x, w, b)
            results.append(torch.autograd.grad(y, (x, w, b), dy))
    for a, c in zip(*results):
        assert torch.equal(a, c)
    M, N = x.shape
    block_n = 128
    block_m = max(1, ln_mod._BWD_TILE // block_n)
    assert min(math.ceil(M / block_m), ln_mod._INTERPRET_PROGRAMS) > 1  # really several programs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 32)])
def test_zero_rows(backend, shape):
    x, w, b = make(shape, torch.float32)
    with kernels.set_backend(backend):
        y = kernels.layer_norm(x, w, b)
        assert y.shape == x.shape
        gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
    assert gx.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend):
    torch.manual_seed(9)
    x, w, b = make((4, 40), torch.float32, grads=(False, False, False))
    x[1, 3] = float("nan")
    with kernels.set_backend(backend):
        y = kernels.layer_norm(x, w, b)
    assert torch.isnan(y[1]).all()
    keep = [0, 2, 3]
    ref = layer_norm_ref(x[keep].double(), w.double(), b.double())
    assert_close("finite rows", y[keep], ref, torch.float32)


def test_reference_matches_functional_and_gradcheck():
    torch.manual_seed(10)
    x = torch.randn(3, 5, 17, dtype=torch.float64, requires_grad=True)
    w = torch.randn(17, dtype=torch.float64, requires_grad=True)
    b = torch.randn(17, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(layer_norm_ref(x, w, b, 1e-5), F.layer_norm(x, (17,), w, b, 1e-5))
    assert layer_norm_ref(x, w, b).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda *a: layer_norm_ref(*a, 1e-5), (x, w, b))
    assert torch.autograd.gradcheck(lambda a: layer_norm_ref(a, None, None, 1e-5), (x,))
    xb = torch.randn(4, 8, dtype=torch.bfloat16)
    assert layer_norm_ref(xb, None, None).dtype == torch.bfloat16


def test_custom_ops_opcheck():
    torch.manual_seed(11)
    x = torch.randn(3, 4, 24, requires_grad=True)
    w = torch.randn(24, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    torch.library.opcheck(torch.ops.leanclip.layer_norm_fwd, (x, w, b, 1e-5, "torch"))
    torch.library.opcheck(torch.ops.leanclip.layer_norm_fwd, (x, None, b, 1e-5, "triton"))
    _, mean, rstd = torch.ops.leanclip.layer_norm_fwd(x.detach(), w.detach(), None, 1e-5, "torch")
    dy = torch.randn(3, 4, 24)
    torch.library.opcheck(torch.ops.leanclip.layer_norm_bwd,
                          (dy, x.detach(), w.detach(), mean, rstd, True, False, True, "torch"))


def test_torch_compile_fullgraph():
    torch.manual_seed(12)

    def f(x, w, b):
        return kernels.layer_norm(x * 2, w, b).sin()

    x, w, b = make((4, 10, 32), torch.float32)
    with kernels.set_backend("torch"):
        # aot_eager: dynamo + AOTAutograd tracing of the custom ops (fake tensors, autograd), without the
        # minutes-long inductor C++ build on this CPU box.
        cf = torch.compile(f, fullgraph=True, backend="aot_eager")
        y = cf(x, w, b)
        g = torch.autograd.grad(y.square().sum(), (x, w, b))
        y0 = f(x, w, b)
        g0 = torch.autograd.grad(y0.square().sum(), (x, w, b))
    torch.testing.assert_close(y, y0)
    for a, c in zip(g, g0):
        torch.testing.assert_close(a, c)


def test_requested_backend_that_cannot_run_raises():
    x = torch.randn(2, 8)
    with kernels.set_backend("cuda"):
        with pytest.raises(RuntimeError, match="cuda"):
            kernels.layer_norm(x, None, None)


BAD = [
    (lambda: ([1.0, 2.0], None, None, 1e-5), TypeError, "x"),
    (lambda: (torch.arange(8).view(2, 4), None, None, 1e-5), TypeError, "x"),
    (lambda: (torch.randn(2, 4, dtype=torch.complex64), None, None, 1e-5), TypeError, "x"),
    (lambda: (torch.randn(2, 4, dtype=torch.float64), torch.randn(4, dtype=torch.bfloat16), None, 1e-5),
     TypeError, "weight"),
    (lambda: (torch.tensor(1.0), None, None, 1e-5), ValueError, "x"),
    (lambda: (torch.randn(2, 4), torch.randn(5), None, 1e-5), ValueError, "weight"),
    (lambda: (torch.randn(2, 4), torch.randn(1, 4), None, 1e-5), ValueError, "weight"),
    (lambda: (torch.randn(2, 4), "w", None, 1e-5), TypeError, "weight"),
    (lambda: (torch.randn(2, 4), torch.randn(4, dtype=torch.bfloat16), None, 1e-5), TypeError, "weight"),
    (lambda: (torch.randn(2, 4, dtype=torch.bfloat16), torch.randn(4, dtype=torch.float16), None, 1e-5),
     TypeError, "weight"),
    (lambda: (torch.randn(2, 4), torch.randn(4, device="meta"), None, 1e-5), ValueError, "weight"),
    (lambda: (torch.randn(2, 4), None, torch.randn(3), 1e-5), ValueError, "bias"),
    (lambda: (torch.randn(2, 4), None, torch.randn(4, dtype=torch.float64), 1e-5), TypeError, "bias"),
    (lambda: (torch.randn(2, 4), None, torch.randn(4, device="meta"), 1e-5), ValueError, "bias"),
    (lambda: (torch.randn(2, 4), None, None, 0.0), ValueError, "eps"),
    (lambda: (torch.randn(2, 4), None, None, -1e-5), ValueError, "eps"),
    (lambda: (torch.randn(2, 4), None, None, float("nan")), ValueError, "eps"),
    (lambda: (torch.randn(2, 4), None, None, float("inf")), ValueError, "eps"),
    (lambda: (torch.randn(2, 4), None, None, "1e-5"), TypeError, "eps"),
    (lambda: (torch.randn(2, 4), None, None, None), TypeError, "eps"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_inputs(backend, case):
    make_args, exc, name = BAD[case]
    with kernels.set_backend(backend):
        with pytest.raises(exc, match=name):
            kernels.layer_norm(*make_args())


# ----------------------------------------------------------------------------------------------- float64


def test_float64_gradcheck_torch_backend():
    """The torch backend computes in float64 for float64 inputs, so gradcheck holds on the public op."""
    torch.manual_seed(16)
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    with kernels.set_backend("torch"):
        y = kernels.layer_norm(x, w, b, 1e-5)
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, F.layer_norm(x, (7,), w, b, 1e-5), rtol=1e-12, atol=1e-12)
        assert torch.autograd.gradcheck(lambda *a: kernels.layer_norm(*a, 1e-5), (x, w, b))
        assert torch.autograd.gradcheck(lambda a: kernels.layer_norm(a, None, None, 1e-5), (x,))
        # strided float64 affine, and a float32 weight with float64 x (only float32 may differ from x)
        ws = torch.randn(14, dtype=torch.float64)[::2].requires_grad_()
        assert torch.autograd.gradcheck(lambda a, c: kernels.layer_norm(a, c, None, 1e-5), (x, ws))
        w32 = torch.randn(7)
        y = kernels.layer_norm(x, w32, b)
        torch.testing.assert_close(y, F.layer_norm(x, (7,), w32.double(), b, 1e-5), rtol=1e-12, atol=1e-12)


def test_float64_automatic_backend_is_torch():
    """With no backend requested, float64 runs on torch even where float32 would go to Triton."""
    x = torch.randn(2, 8, dtype=torch.float64)
    with kernels.set_backend("auto"):
        y = kernels.layer_norm(x, None, None)
    torch.testing.assert_close(y, F.layer_norm(x, (8,)), rtol=1e-12, atol=1e-12)


def test_float64_custom_ops_opcheck():
    """Fake (meta) kernels report the float64 statistics and grads the torch backend returns."""
    torch.manual_seed(17)
    x = torch.randn(3, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(24, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.leanclip.layer_norm_fwd, (x, w, None, 1e-5, "torch"))
    _, mean, rstd = torch.ops.leanclip.layer_norm_fwd(x.detach(), w.detach(), None, 1e-5, "torch")
    assert mean.dtype == rstd.dtype == torch.float64
    torch.library.opcheck(torch.ops.leanclip.layer_norm_bwd,
                          (torch.randn(3, 24, dtype=torch.float64), x.detach(), w.detach(), mean, rstd,
                           True, True, True, "torch"))


def test_float64_rejected_by_triton_backend():
    x = torch.randn(2, 8, dtype=torch.float64)
    with kernels.set_backend("triton"):
        with pytest.raises(TypeError, match=r"x must be float32, bfloat16 or float16 on the triton backend.*float64"):
            kernels.layer_norm(x, None, None)
        with pytest.raises(TypeError, match="x must be .* on the triton backend"):
            kernels.layer_norm(x, torch.randn(8, dtype=torch.float64), None)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_float64_rejected_by_kernel_backends_check(backend):
    """The dtype gate every op runs once its backend is known (the cuda backend cannot run on this CPU box)."""
    from leanclip.kernels import _validate

    ok = torch.randn(3)
    _validate.check_backend_dtype(backend, x=ok, weight=None, bias=ok.half())
    _validate.check_backend_dtype("torch", x=ok.double())
    with pytest.raises(TypeError, match=rf"bias must be float32, bfloat16 or float16 on the {backend} backend"):
        _validate.check_backend_dtype(backend, x=ok, bias=ok.double())
