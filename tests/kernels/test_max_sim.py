"""kernels.max_sim vs a float64 brute-force reference (x @ d.T).max(1) on CPU.

Backends "torch" and "triton" (the Triton kernel under TRITON_INTERPRET=1, set by tests/conftest.py). The interpreter
is slow, so the Triton cases use fewer / smaller shapes; its single config (BLOCK_N 32, BLOCK_M 64, BLOCK_K 64) still
hits partial row blocks, partial column tiles, K tails (K=96) and the M-split path.
"""
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from leanclip import kernels
from leanclip.kernels.ops import max_sim as ms_mod
from leanclip.kernels.ops.max_sim import max_sim_ref

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# fp32: every N in {1, 7, 197, 1000} x M in {1, 5, 1023, 4099} x K in {64, 96, 512}; 16-bit: a spread of them
TORCH_CASES = [((n, m, k), torch.float32) for n in (1, 7, 197, 1000) for m in (1, 5, 1023, 4099) for k in (64, 96, 512)]
TORCH_CASES += [(s, dt) for s in [(1, 4099, 96), (7, 1023, 512), (197, 5, 64), (1000, 1023, 96), (197, 1, 64)]
                for dt in (torch.bfloat16, torch.float16)]
# interpreter cost ~ ceil(N/32) * ceil(M/64) * ceil(K/64) loop iterations (~2 ms each): every dtype on the cheap
# shapes, the expensive ones once each.
_CHEAP = [(7, 1023, 96), (197, 5, 64), (7, 1, 512), (1, 5, 96), (197, 300, 96)]
TRITON_CASES = [(s, dt) for s in _CHEAP for dt in DTYPES] + [
    ((1, 4099, 96), torch.float32), ((1000, 5, 64), torch.float32), ((197, 1023, 64), torch.bfloat16),
]


def _gen(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen).to(dtype)


def _check_against_float64(x, d, vals, idx, tol=1e-5):
    """vals within `tol` (relative, norm-wise) of the exact max; d[idx] attains the max up to accumulation rounding;
    idx equals the float64 argmax wherever the top-2 gap is clearly bigger than rounding."""
    N, M = x.shape[0], d.shape[0]
    assert vals.shape == (N,) and idx.shape == (N,)
    assert vals.dtype == torch.float32 and idx.dtype == torch.int64
    if N == 0:
        return
    S = x.double() @ d.double().T
    ref_vals = S.max(1).values
    ref_idx = S.argmax(1)
    assert torch.isfinite(vals).all()
    assert ((idx >= 0) & (idx < M)).all()
    rel = (vals.double() - ref_vals).norm() / ref_vals.norm().clamp_min(1e-30)
    assert rel < tol, f"rel err {rel:.3e}"
    # fp32 accumulation error bound, generously: K * 2^-24 * sum|x||d| <= 1e-5-ish of |x|*max|d|
    scale = x.double().norm(dim=1) * d.double().norm(dim=1).max()
    achieved = S.gather(1, idx[:, None]).squeeze(1)
    assert (ref_vals - achieved <= 1e-5 * scale).all()
    if M >= 2:
        top2 = S.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-4 * scale
        assert torch.equal(idx[clear], ref_idx[clear])
    else:
        assert (idx == 0).all()


@pytest.mark.parametrize("shape,dtype", TORCH_CASES, ids=str)
def test_forward_torch_backend(shape, dtype):
    N, M, K = shape
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    x, d = _gen(N, K, dtype=dtype, gen=g), _gen(M, K, dtype=dtype, gen=g)
    with kernels.set_backend("torch"):
        vals, idx = kernels.max_sim(x, d)
    _check_against_float64(x, d, vals, idx)


@pytest.mark.parametrize("shape,dtype", TRITON_CASES, ids=str)
def test_forward_triton_backend(shape, dtype):
    N, M, K = shape
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    x, d = _gen(N, K, dtype=dtype, gen=g), _gen(M, K, dtype=dtype, gen=g)
    with kernels.set_backend("triton"):
        vals, idx = kernels.max_sim(x, d)
    _check_against_float64(x, d, vals, idx)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_take_lowest_index(backend, dtype):
    # Small integers: every dot is exact in fp32 (and the inputs exact in 16-bit), so ties are exact and frequent.
    g = torch.Generator().manual_seed(1)
    N, M, K = 40, 300, 16
    x = torch.randint(-2, 3, (N, K), generator=g).to(dtype)
    d = torch.randint(-2, 3, (M, K), generator=g).to(dtype)
    # duplicate rows across tile (64) and split boundaries, and the last row
    d[[70, 130, 200, 299]] = d[5].clone()
    d[[128, 255]] = d[127].clone()
    x[:8] = d[5]  # rows whose max is attained (at least) at 5, 70, 130, 200, 299
    x[8:12] = d[127]
    S = x.double() @ d.double().T
    first = (S == S.max(1, keepdim=True).values).int().argmax(1)  # lowest index among all maxima
    assert (S == S.max(1, keepdim=True).values).sum(1).gt(1).sum() >= 12  # the test really has ties
    for splits in ([0, 2, 3, 5] if backend == "triton" else [0]):
        with kernels.set_backend(backend):
            vals, idx = kernels.max_sim(x, d, _splits=splits)
        assert torch.equal(idx, first), f"splits={splits}"
        assert torch.equal(vals.double(), S.max(1).values)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    g = torch.Generator().manual_seed(2)
    N, M, K = 37, 150, 96
    xbig = torch.randn(3 * N, 2 * K, generator=g)
    x = xbig[::3, ::2]  # row stride 6K, column stride 2
    d = torch.randn(K, M, generator=g).T  # transpose view: stride (1, M)
    assert not x.is_contiguous() and not d.is_contiguous()
    with kernels.set_backend(backend):
        vals, idx = kernels.max_sim(x, d)
    _check_against_float64(x, d, vals, idx)
    ref_vals, ref_idx = max_sim_ref(x.contiguous(), d.contiguous())
    assert torch.equal(idx, ref_idx)


def _grad_case(backend, dtype, N, M, K, splits, need_x=True, need_d=True, seed=3):
    g = torch.Generator().manual_seed(seed)
    x0, d0 = _gen(N, K, dtype=dtype, gen=g), _gen(M, K, dtype=dtype, gen=g)
    dvals = torch.randn(N, generator=g)
    x = x0.clone().requires_grad_(need_x)
    d = d0.clone().requires_grad_(need_d)
    with kernels.set_backend(backend):
        vals, idx = kernels.max_sim(x, d, _splits=splits)
    (vals * dvals).sum().backward()
    # float64 brute force with autograd
    x64 = x0.double().requires_grad_(need_x)
    d64 = d0.double().requires_grad_(need_d)
    S = x64 @ d64.T
    ref_vals, ref_idx = S.max(1)
    assert torch.equal(idx, ref_idx)  # random Gaussian data: distinct maxima (checked by the gap below)
    top2 = S.detach().topk(min(2, M), dim=1).values
    if M >= 2:
        assert ((top2[:, 0] - top2[:, 1]) > 1e-3).all()
    (ref_vals * dvals.double()).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, ours, ref, want in (("x", x, x64, need_x), ("d", d, d64, need_d)):
        if not want:
            assert ours.grad is None
            continue
        assert ours.grad.dtype == dtype and ours.grad.shape == ours.shape
        rel = (ours.grad.double() - ref.grad).norm() / ref.grad.norm()
        assert rel < tol, f"d{name} rel err {rel:.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_vs_float64_autograd(backend, dtype):
    # M=200 with 7 rows: several rows hit the same d row only rarely; N=60 over M=20 makes index collisions certain.
    _grad_case(backend, dtype, N=7, M=200, K=64, splits=0, seed=3)
    _grad_case(backend, dtype, N=60, M=20, K=96, splits=0, seed=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_partial_requires_grad(backend):
    _grad_case(backend, torch.float32, N=9, M=130, K=64, splits=3, need_x=True, need_d=False, seed=5)
    _grad_case(backend, torch.float32, N=9, M=130, K=64, splits=3, need_x=False, need_d=True, seed=6)


def test_m_split_path_matches():
    g = torch.Generator().manual_seed(7)
    N, M, K = 5, 700, 64
    x, d = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g)
    with kernels.set_backend("triton"):
        base = kernels.max_sim(x, d, _splits=1)
        for s in (2, 3, 7, 100):  # 100 > number of 64-column tiles: clamped
            vals, idx = kernels.max_sim(x, d, _splits=s)
            assert torch.equal(idx, base[1]) and torch.equal(vals, base[0])
        # automatic choice with a small N and a large M also splits (interpreter pretends to have 4 SMs)
        vals, idx = kernels.max_sim(x, d)
        assert torch.equal(idx, base[1])
    _check_against_float64(x, d, *base)


def test_choose_splits_fills_the_gpu():
    sms = 132
    # N=4096 rows (32 row blocks of 128), M=262144 (1024 granules of 256): split until ~all SMs are busy
    s = ms_mod._choose_splits(32, 1024, sms)
    assert s > 1 and (32 * s) / (-(-32 * s // sms) * sms) >= 0.9
    assert ms_mod._choose_splits(1, 4096, sms) >= 100  # N tiny, M huge: most SMs get a slice of M
    assert ms_mod._choose_splits(1024, 4096, sms) <= 2  # N large: row blocks already fill the GPU
    assert ms_mod._choose_splits(1, 3, sms) == 1  # too little M to split


def test_n_zero():
    x = torch.empty(0, 64)
    d = torch.randn(10, 64)
    for backend in BACKENDS:
        with kernels.set_backend(backend):
            vals, idx = kernels.max_sim(x, d)
        assert vals.shape == (0,) and vals.dtype == torch.float32
        assert idx.shape == (0,) and idx.dtype == torch.int64
        xr = x.clone().requires_grad_()
        dr = d.clone().requires_grad_()
        with kernels.set_backend(backend):
            v, _ = kernels.max_sim(xr, dr)
        v.sum().backward()
        assert xr.grad.shape == (0, 64) and torch.equal(dr.grad, torch.zeros_like(d))


@pytest.mark.filterwarnings("ignore:All-NaN slice")
@pytest.mark.parametrize("backend,fast_max", [("torch", True), ("triton", True), ("triton", False)])
def test_nan_propagates(backend, fast_max, monkeypatch):
    # fast_max=False runs the GPU code path of the kernel epilogue (NaN-propagating custom reduction) in the interpreter
    monkeypatch.setattr(ms_mod, "_INTERPRETER_FAST_MAX", fast_max)
    g = torch.Generator().manual_seed(8)
    N, M, K = 6, 200, 64
    x, d = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g)
    x[2, 10] = float("nan")  # row 2: every dot is NaN
    split_list = [0] if backend == "torch" else ([0, 3] if fast_max else [3])
    with kernels.set_backend(backend):
        for splits in split_list:
            vals, idx = kernels.max_sim(x, d, _splits=splits)
            assert torch.isnan(vals[2])
            assert ((idx >= 0) & (idx < M)).all()
            ok = torch.tensor([n != 2 for n in range(N)])
            _check_against_float64(x[ok], d, vals[ok], idx[ok])
    # a NaN in one row of d (late, in the last tile / last split): every row's max is NaN, not silently skipped
    d2 = d.clone()
    d2[190, 3] = float("nan")
    x2 = torch.randn(N, K, generator=g)
    with kernels.set_backend(backend):
        for splits in split_list:
            vals, idx = kernels.max_sim(x2, d2, _splits=splits)
            assert torch.isnan(vals).all()
            assert ((idx >= 0) & (idx < M)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    x = torch.randn(4, 8)
    d = torch.randn(5, 8)
    cases = [
        ((torch.randn(8), d), ValueError, "x"),
        ((x, torch.randn(2, 5, 8)), ValueError, "d"),
        ((x, torch.randn(5, 9)), ValueError, "d"),
        ((x, d.double()), TypeError, "d"),
        ((x.double(), d), TypeError, "d"),
        ((x.to(torch.complex64), d), TypeError, "x"),
        ((x, d.half()), TypeError, "d"),
        ((x.long(), d), TypeError, "x"),
        ((x, d.int()), TypeError, "d"),
        ((x, torch.randn(0, 8)), ValueError, "d"),
        (([[1.0]], d), TypeError, "x"),
        ((x, torch.randn(5, 8, device="meta")), ValueError, "d"),
    ]
    with kernels.set_backend(backend):
        for args, exc, name in cases:
            with pytest.raises(exc, match=rf"\b{name}\b"):
                kernels.max_sim(*args)
        with pytest.raises(ValueError, match="input_precision"):
            kernels.max_sim(x, d, input_precision="fp8")


def test_cuda_backend_on_cpu_raises():
    with kernels.set_backend("cuda"):
        with pytest.raises(RuntimeError):
            kernels.max_sim(torch.randn(3, 8), torch.randn(4, 8))


def test_default_input_precision():
    assert ms_mod._default_precision(torch.float32, "cpu") == "ieee"
    assert ms_mod._default_precision(torch.bfloat16, "cuda") == "ieee"
    # set and restore by hand: pytest >= 9.2's monkeypatch cannot undo a setattr on torch's cuBLAS module
    matmul = torch.backends.cuda.matmul
    old = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert ms_mod._default_precision(torch.float32, "cuda") == "ieee"
        matmul.allow_tf32 = True
        assert ms_mod._default_precision(torch.float32, "cuda") == "tf32"
    finally:
        matmul.allow_tf32 = old


def test_gpu_configs_pruned_where_they_spill():
    """BLOCK_M=256 spills on sm_90 for fp32 and for uneven K (ptxas): the autotuner never times those."""
    cfgs = ms_mod._GPU_CONFIGS
    bm = lambda kept: sorted({c.kwargs["BLOCK_M"] for c in kept})  # noqa: E731
    bf16, fp32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1)
    assert bm(ms_mod._prune_configs(cfgs, {"x_ptr": bf16}, EVEN_K=True)) == [128, 256]
    assert bm(ms_mod._prune_configs(cfgs, {"x_ptr": bf16}, EVEN_K=False)) == [128]
    assert bm(ms_mod._prune_configs(cfgs, {"x_ptr": fp32}, EVEN_K=True)) == [128]
    only_256 = [c for c in cfgs if c.kwargs["BLOCK_M"] == 256]
    assert ms_mod._prune_configs(only_256, {"x_ptr": fp32}, EVEN_K=True) == only_256  # never empty


def test_ref_gradcheck_float64():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    d = torch.randn(7, 8, dtype=torch.float64, generator=g, requires_grad=True)
    S = (x @ d.T).detach()
    top2 = S.topk(2, dim=1).values
    assert ((top2[:, 0] - top2[:, 1]) > 1e-3).all()  # distinct maxima: the max is locally smooth
    assert torch.autograd.gradcheck(lambda a, b: max_sim_ref(a, b, chunk=3, row_chunk=2)[0], (x, d))


def test_float64_gradcheck_torch_backend():
    """The torch backend keeps float64 (vals and both grads), so gradcheck holds on the public op."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(6, 8, dtype=torch.float64, generator=g, requires_grad=True)
    d = torch.randn(9, 8, dtype=torch.float64, generator=g, requires_grad=True)
    S = (x @ d.T).detach()
    top2 = S.topk(2, dim=1).values
    assert ((top2[:, 0] - top2[:, 1]) > 1e-3).all()  # distinct maxima: the max is locally smooth
    with kernels.set_backend("torch"):
        vals, idx = kernels.max_sim(x, d)
        assert vals.dtype == torch.float64
        torch.testing.assert_close(vals, S.max(1).values, rtol=1e-12, atol=1e-12)
        assert torch.equal(idx, S.argmax(1))
        assert torch.autograd.gradcheck(lambda a, b: kernels.max_sim(a, b)[0], (x, d))
        # strided inputs (row stride 3, transposed d)
        xs = torch.randn(18, 8, dtype=torch.float64, generator=g)[::3].requires_grad_()
        ds = torch.randn(8, 9, dtype=torch.float64, generator=g).T.requires_grad_()
        assert torch.autograd.gradcheck(lambda a, b: kernels.max_sim(a, b)[0], (xs, ds))
    with kernels.set_backend("auto"):  # automatic selection sends float64 to torch
        assert kernels.max_sim(x, d)[0].dtype == torch.float64
    # the fake (meta) kernel reports the float64 vals the torch backend returns
    torch.library.opcheck(torch.ops.leanclip.max_sim_fwd.default, (x, d, "torch", "ieee", 0))


def test_float64_rejected_by_triton_backend():
    x, d = torch.randn(4, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    with kernels.set_backend("triton"):
        with pytest.raises(TypeError, match=r"x must be float32, bfloat16 or float16 on the triton backend.*float64"):
            kernels.max_sim(x, d)


class _MaxNumelMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_ref_is_chunked():
    g = torch.Generator().manual_seed(10)
    N, M, K = 30, 200, 4  # N*M = 6000 >> every other tensor (N*K = 120, M*K = 800)
    x, d = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g)
    full_vals, full_idx = (x.double() @ d.double().T).max(1)
    with _MaxNumelMode() as mode:
        vals, idx = max_sim_ref(x, d, chunk=3, row_chunk=4)
    assert mode.max_numel <= max(M * K, 4 * 3)
    assert torch.equal(idx, full_idx)
    assert torch.allclose(vals.double(), full_vals, rtol=1e-6, atol=1e-6)
    # the default chunk sizes agree with the tiny ones
    v2, i2 = max_sim_ref(x, d)
    assert torch.equal(i2, idx)


@pytest.mark.parametrize("which", ["ref", "torch", "triton"])
def test_nothing_n_by_m_saved_for_backward(which):
    g = torch.Generator().manual_seed(11)
    N, M, K = 64, 1000, 8
    x = torch.randn(N, K, generator=g, requires_grad=True)
    d = torch.randn(M, K, generator=g, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if which == "ref":
            vals, _ = max_sim_ref(x, d, chunk=128)
        else:
            with kernels.set_backend(which):
                vals, _ = kernels.max_sim(x, d)
    assert saved and max(saved) <= M * K < N * M
    vals.sum().backward()
    assert x.grad is not None and d.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_smoke(backend):
    g = torch.Generator().manual_seed(12)
    x0, d0 = torch.randn(7, 64, generator=g), torch.randn(100, 64, generator=g)

    def f(x, d):
        vals, idx = kernels.max_sim(x, d)
        return (vals * vals).sum(), idx

    outs = []
    for compiled in (False, True):
        x, d = x0.clone().requires_grad_(), d0.clone().requires_grad_()
        # aot_eager traces the custom op, its fake impl and autograd formula like inductor does (no C++ build)
        fn = torch.compile(f, backend="aot_eager", fullgraph=True) if compiled else f
        with kernels.set_backend(backend), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss, idx = fn(x, d)
        loss.backward()
        outs.append((loss.detach(), idx, x.grad, d.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_op_registration(backend):
    g = torch.Generator().manual_seed(13)
    x = torch.randn(5, 64, generator=g, requires_grad=True)
    d = torch.randn(70, 64, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.leanclip.max_sim_fwd, (x, d, backend, "ieee", 2))
