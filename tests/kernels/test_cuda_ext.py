"""The csrc CUDA extension (backend "cuda").

(a) test_jit_build compiles csrc/ with torch.utils.cpp_extension.load (ninja) into a cached build dir, in a
    subprocess with a time limit. Cold: about 100 s on 2 CPU cores for one arch; cached: about 5 s (ninja no-op).
    Deselect with ``-m "not slow"`` or LEANCLIP_SKIP_CUDA_BUILD=1. Archs: $TORCH_CUDA_ARCH_LIST, else the visible
    GPU's, else 9.0. Build dir: $LEANCLIP_BUILD_DIR, else ~/.cache/leanclip/<torch>-<cuda>-<archs>.
(b) the built module imports (a CPU-only box loads it too; without a driver only a GPU call would fail).
(c) on a GPU: every entry point against float64 references and against the Triton backend.
(d) CPU tensors raise a RuntimeError naming the problem, through the module and through torch.ops.leanclip_cuda.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT_S = int(os.environ.get("LEANCLIP_CUDA_BUILD_TIMEOUT", "1200"))


def _ext_module():
    """leanclip.kernels._cuda_ext, or the same file loaded on its own when the kernels package does not import."""
    try:
        from leanclip.kernels import _cuda_ext

        return _cuda_ext
    except ImportError:
        spec = importlib.util.spec_from_file_location("leanclip_cuda_ext_standalone", REPO / "kernels" / "src" / "_cuda_ext.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


def _cuda_home() -> str | None:
    """A CUDA toolkit root with bin/nvcc and include/cuda_runtime.h (CUDA_HOME, torch's guess, /usr/local/cuda, the
    nvcc on PATH), or None."""
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = shutil.which("nvcc")
    for home in (os.environ.get("CUDA_HOME"), CUDA_HOME, "/usr/local/cuda", nvcc and str(Path(nvcc).parent.parent)):
        if home and (Path(home) / "bin" / "nvcc").exists() and (Path(home) / "include" / "cuda_runtime.h").exists():
            return home
    return None


def _archs() -> str:
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return "9.0"


def _build_env() -> dict:
    env = dict(os.environ)
    home = _cuda_home()
    if home:
        env["CUDA_HOME"] = home
    env["TORCH_CUDA_ARCH_LIST"] = _archs()
    return env


def _build_dir() -> Path:
    return Path(_ext_module().build_dir(_archs()))


def _artifact() -> Path:
    return _build_dir() / f"{_ext_module().JIT_NAME}.so"


_MODULE = None


def _module():
    """The extension: a copy already loaded or the prebuilt kernels._C, else the JIT build from (a), else skip."""
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    ext = _ext_module()
    mod = ext.load()
    if mod is None:
        if not _artifact().exists():
            pytest.skip(f"the CUDA extension is not built (no kernels._C, no {_artifact()}): run test_jit_build")
        env = _build_env()
        old = {k: os.environ.get(k) for k in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST")}
        os.environ.update({k: env[k] for k in old if k in env})
        try:
            mod = ext.build_jit()  # ninja finds everything up to date: just the import
        except ImportError as e:
            if "libcuda" in str(e) or "driver" in str(e).lower():
                assert _artifact().exists()
                pytest.skip(f"built ({_artifact()}) but not importable without a CUDA driver: {e}")
            raise
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    _MODULE = mod
    return mod


# ------------------------------------------------------------------------------------------------ (a) build
@pytest.mark.slow
def test_jit_build():
    if os.environ.get("LEANCLIP_SKIP_CUDA_BUILD") == "1":
        pytest.skip("LEANCLIP_SKIP_CUDA_BUILD=1")
    home = _cuda_home()
    if home is None:
        pytest.skip("nvcc not found (set CUDA_HOME to a CUDA toolkit): the CUDA extension cannot be built here")
    out = subprocess.run([str(Path(home) / "bin" / "nvcc"), "--version"], capture_output=True, text=True).stdout
    release = out.split("release ")[-1].split(",")[0].strip() if "release " in out else ""
    if torch.version.cuda and release.split(".")[0] != torch.version.cuda.split(".")[0]:
        pytest.skip(f"nvcc {release or '?'} in {home} does not match torch's CUDA {torch.version.cuda}")
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        pytest.skip("ninja is not installed")
    script = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("cuda_ext", {str(REPO / "kernels" / "src" / "_cuda_ext.py")!r})
        ext = importlib.util.module_from_spec(spec); spec.loader.exec_module(ext)
        try:
            mod = ext.build_jit(verbose=False)
            print("LOADED", mod.__file__)
        except ImportError as e:  # compiled but not loadable (e.g. no driver): the test checks the artifact
            print("IMPORT_FAILED", e)
    """)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_build_env(), capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT_S)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, f"build failed after {elapsed:.0f} s:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    assert _artifact().exists(), f"no {_artifact()} after the build:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    print(f"CUDA extension build ({_archs()}) took {elapsed:.1f} s -> {_artifact()}")


# ------------------------------------------------------------------------------------------------ (b) import
def test_module_imports():
    mod = _module()
    for name in ("layer_norm_fwd", "layer_norm_bwd", "bias_grad", "frozen_linear_bwd", "max_sim_fwd"):
        assert callable(getattr(mod, name)), name
        assert hasattr(torch.ops.leanclip_cuda, name), name


def test_load_never_compiles_implicitly(tmp_path):
    """Without LEANCLIP_CUDA_JIT (and, for =1, without a GPU) load() builds nothing."""
    script = textwrap.dedent(f"""
        import importlib.util, os
        spec = importlib.util.spec_from_file_location("cuda_ext", {str(REPO / "kernels" / "src" / "_cuda_ext.py")!r})
        ext = importlib.util.module_from_spec(spec); spec.loader.exec_module(ext)
        m = ext.load()
        import torch
        print("RESULT", m is None or m.__name__, torch.cuda.is_available())
    """)
    for jit in ("0", "1"):
        env = dict(os.environ, LEANCLIP_BUILD_DIR=str(tmp_path / f"b{jit}"), LEANCLIP_CUDA_JIT=jit)
        if jit == "1" and torch.cuda.is_available():
            continue  # a GPU box would legitimately compile here
        proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert not (tmp_path / f"b{jit}").exists(), f"load() compiled with LEANCLIP_CUDA_JIT={jit}"


# ------------------------------------------------------------------------------------------------ (d) CPU tensors
def test_cpu_tensors_raise_clear_error():
    mod = _module()
    x = torch.randn(4, 8)
    w = torch.randn(8)
    calls = {
        "layer_norm_fwd": (x, w, w, 1e-5),
        "layer_norm_bwd": (x, x, w, torch.zeros(4), torch.ones(4), True, True, True),
        "bias_grad": (x,),
        "frozen_linear_bwd": (x, torch.randn(8, 8), True),
        "max_sim_fwd": (x, torch.randn(5, 8)),
    }
    for name, args in calls.items():
        with pytest.raises(RuntimeError, match="the cuda backend needs CUDA tensors"):
            getattr(mod, name)(*args)
        with pytest.raises(RuntimeError, match="the cuda backend needs CUDA tensors"):
            getattr(torch.ops.leanclip_cuda, name)(*args)


def test_meta_shapes():
    """Meta kernels give torch.compile / fake tensors the output shapes and dtypes."""
    _module()
    x = torch.empty(5, 7, device="meta", dtype=torch.bfloat16)
    w32 = torch.empty(7, device="meta")
    st = torch.empty(5, device="meta")
    y, mean, rstd = torch.ops.leanclip_cuda.layer_norm_fwd(x, w32, None, 1e-5)
    assert (y.shape, y.dtype, mean.shape, mean.dtype, rstd.dtype) == ((5, 7), torch.bfloat16, (5,), torch.float32,
                                                                      torch.float32)
    dx, dw, db = torch.ops.leanclip_cuda.layer_norm_bwd(x, x, w32, st, st, True, True, False)
    assert (dx.shape, dw.shape, dw.dtype, db.numel()) == ((5, 7), (7,), torch.float32, 0)
    assert torch.ops.leanclip_cuda.bias_grad(x).shape == (7,)
    dx, db = torch.ops.leanclip_cuda.frozen_linear_bwd(x, torch.empty(7, 3, device="meta", dtype=torch.bfloat16), True)
    assert (dx.shape, db.shape, db.dtype) == ((5, 3), (7,), torch.float32)
    v, i = torch.ops.leanclip_cuda.max_sim_fwd(x, torch.empty(9, 7, device="meta", dtype=torch.bfloat16))
    assert (v.shape, v.dtype, i.dtype) == ((5,), torch.float32, torch.int64)


# ------------------------------------------------------------------------------------------------ (c) GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # relative L2 error vs float64


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert not torch.isnan(out).any(), "NaN in output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _rows(M: int, N: int, dtype, layout: str, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """(M, N) on the GPU: contiguous, padded rows (row stride > N) or misaligned (data pointer off by one element)."""
    if layout == "contiguous":
        base = torch.randn(M, N, device="cuda")
        return (base * scale + shift).to(dtype)
    if layout == "padded":
        base = torch.randn(M, N + 8, device="cuda") * scale + shift
        return base.to(dtype)[:, :N]
    base = torch.randn(M, N + 1, device="cuda") * scale + shift
    return base.to(dtype)[:, 1:]


def _project_ref(module: str, name: str):
    try:
        return getattr(importlib.import_module(f"leanclip.kernels.ops.{module}"), name)
    except (ImportError, AttributeError):
        return None


def _ln_ref64(x, w, b, eps):
    ref = _project_ref("layer_norm", "layer_norm_ref")
    x64 = x.double().cpu()
    w64 = None if w is None else w.double().cpu()
    b64 = None if b is None else b.double().cpu()
    if ref is not None:
        return ref(x64, w64, b64, eps)
    return torch.nn.functional.layer_norm(x64, (x64.shape[-1],), w64, b64, eps)


LN_SHAPES = [(1, 64), (7, 512), (197, 768), (33, 1000), (5, 1280), (3, 1023), (65, 4104), (2, 9000), (2, 20000)]


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N", LN_SHAPES)
@pytest.mark.parametrize("affine", ["none", "same", "fp32"])
@pytest.mark.parametrize("layout", ["contiguous", "padded", "misaligned"])
def test_layer_norm_vs_float64(dtype, M, N, affine, layout):
    mod = _module()
    torch.manual_seed(M * 31 + N)
    x = _rows(M, N, dtype, layout, scale=2.0, shift=3.0)  # non-zero mean: the two-pass variance matters
    pdt = torch.float32 if affine == "fp32" else dtype
    w = None if affine == "none" else (1 + 0.1 * torch.randn(N, device="cuda")).to(pdt)
    b = None if affine == "none" else (0.1 * torch.randn(N, device="cuda")).to(pdt)
    eps = 1e-5
    y, mean, rstd = mod.layer_norm_fwd(x, w, b, eps)
    assert y.dtype == dtype and y.shape == (M, N) and mean.dtype == rstd.dtype == torch.float32
    x64 = x.double().cpu()
    assert _rel(y, _ln_ref64(x, w, b, eps)) < TOL[dtype]
    assert _rel(mean, x64.mean(-1)) < 1e-6
    assert _rel(rstd, torch.rsqrt(x64.var(-1, unbiased=False) + eps)) < 1e-5

    # backward against autograd in float64, every combination of requested outputs
    dy = _rows(M, N, dtype, layout)
    xr = x64.clone().requires_grad_(True)
    wr = None if w is None else w.double().cpu().requires_grad_(True)
    br = None if b is None else b.double().cpu().requires_grad_(True)
    torch.nn.functional.layer_norm(xr, (N,), wr, br, eps).backward(dy.double().cpu())
    for need_dx, need_dw, need_db in [(True, True, True), (True, False, False), (False, True, True),
                                      (False, False, True)]:
        if w is None and need_dw:
            continue
        dx, dw, db = mod.layer_norm_bwd(dy, x, w, mean, rstd, need_dx, need_dw, need_db)
        if need_dx:
            assert dx.dtype == dtype and _rel(dx, xr.grad) < TOL[dtype]
        else:
            assert dx.numel() == 0
        if need_dw:
            assert dw.dtype == w.dtype and _rel(dw, wr.grad) < max(TOL[w.dtype], 1e-5)
        else:
            assert dw.numel() == 0
        if need_db:
            db_ref = dy.double().cpu().sum(0)
            assert db.dtype == (w.dtype if w is not None else torch.float32)
            assert _rel(db, db_ref) < max(TOL[db.dtype], 1e-5)
        else:
            assert db.numel() == 0
    # deterministic: the same bits twice
    d1 = mod.layer_norm_bwd(dy, x, w, mean, rstd, True, w is not None, True)
    d2 = mod.layer_norm_bwd(dy, x, w, mean, rstd, True, w is not None, True)
    for a, c in zip(d1, d2):
        assert torch.equal(a, c)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N", [(1, 1), (7, 64), (1000, 768), (4097, 1023), (3, 5000), (20000, 512)])
@pytest.mark.parametrize("layout", ["contiguous", "padded", "misaligned"])
def test_bias_grad_and_frozen_linear_bwd(dtype, M, N, layout):
    mod = _module()
    torch.manual_seed(M + N)
    dy = _rows(M, N, dtype, layout)
    db = mod.bias_grad(dy)
    ref = dy.double().cpu().sum(0)
    assert db.dtype == torch.float32 and db.shape == (N,)
    assert _rel(db, ref) < 1e-5
    assert torch.equal(db, mod.bias_grad(dy)), "bias_grad is not deterministic"
    K = 48
    w = torch.randn(N, K, device="cuda").to(dtype)
    dx, db2 = mod.frozen_linear_bwd(dy, w, True)
    assert dx.dtype == dtype and dx.shape == (M, K)
    assert _rel(dx, dy.double().cpu() @ w.double().cpu()) < TOL[dtype] * 2
    assert torch.equal(db2, db)
    dx3, db3 = mod.frozen_linear_bwd(dy, w, False)
    assert db3.numel() == 0 and torch.equal(dx3, dx)


MS_SHAPES = [(1, 1, 64), (7, 13, 512), (197, 1023, 768), (1000, 5000, 512), (1, 5000, 512), (37, 300, 20),
             (5, 7, 1), (129, 129, 100)]


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,M,K", MS_SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "padded", "misaligned"])
def test_max_sim_vs_float64(dtype, N, M, K, layout):
    mod = _module()
    torch.manual_seed(N * 7 + M + K)
    x = _rows(N, K, dtype, layout)
    d = _rows(M, K, dtype, layout)
    vals, idx = mod.max_sim_fwd(x, d)
    assert vals.dtype == torch.float32 and idx.dtype == torch.int64 and vals.shape == idx.shape == (N,)
    scores = x.double().cpu() @ d.double().cpu().T  # small shapes: the full matrix is fine here
    ref_vals = scores.max(1).values
    tol = 1e-4  # fp32 accumulation of the (exactly representable) products: close to the float64 dot
    assert _rel(vals, ref_vals) < tol
    idx_c = idx.cpu()
    assert ((idx_c >= 0) & (idx_c < M)).all()
    chosen = scores.gather(1, idx_c[:, None]).squeeze(1)
    scale = scores.abs().max().item() + 1e-30
    assert ((ref_vals - chosen).abs() <= 1e-4 * scale).all(), "argmax does not point at a maximal score"
    ref = _project_ref("max_sim", "max_sim_ref")
    if ref is not None:
        rv, _ = ref(x.double().cpu(), d.double().cpu())
        assert _rel(vals, rv) < tol


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_max_sim_ties_nan_and_splits(dtype):
    mod = _module()
    torch.manual_seed(1)
    K = 64
    x = torch.randn(300, K, device="cuda").to(dtype)
    d = torch.randn(2000, K, device="cuda").to(dtype)
    d[1500] = x[3] * 4  # <x3, 4 x3> = 4 |x3|^2 beats every random row by far; exact in 16-bit (power of two)
    d[700] = x[3] * 4  # the same row twice: the lower index wins
    x[5, 7] = float("nan")  # every score of row 5 is NaN: NaN comes out, at the first index
    vals, idx = mod.max_sim_fwd(x, d)
    assert idx[3].item() == 700
    assert torch.isnan(vals[5]) and idx[5].item() == 0
    assert not torch.isnan(vals[torch.arange(300, device="cuda") != 5]).any()
    # 8 rows -> many splits joined by the reduce kernel; the scores do not depend on the split: same bits
    v8, i8 = mod.max_sim_fwd(x[:8], d)
    assert torch.equal(i8, idx[:8])
    assert torch.equal(torch.nan_to_num(v8, nan=0.0), torch.nan_to_num(vals[:8], nan=0.0))


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_backend_matches_triton(dtype):
    """The public ops under backend "cuda" vs "triton" (forward and gradients)."""
    _module()
    try:
        from leanclip import kernels
    except ImportError as e:
        pytest.skip(f"kernels package not importable: {e}")
    if "cuda" not in kernels.available_backends() or "triton" not in kernels.available_backends():
        pytest.skip(f"need both backends, have {kernels.available_backends()}")
    torch.manual_seed(0)
    x = torch.randn(4, 197, 768, device="cuda").to(dtype)
    w = (1 + 0.1 * torch.randn(768, device="cuda")).requires_grad_(True)
    b = (0.1 * torch.randn(768, device="cuda")).requires_grad_(True)
    dy = torch.randn_like(x)
    outs = {}
    for backend in ("triton", "cuda"):
        xx = x.clone().requires_grad_(True)
        w.grad = b.grad = None
        with kernels.set_backend(backend):
            y = kernels.layer_norm(xx, w, b)
            y.backward(dy)
        outs[backend] = (y.detach(), xx.grad, w.grad.clone(), b.grad.clone())
    for a, c in zip(outs["triton"], outs["cuda"]):
        assert _rel(c, a) < TOL[dtype] * 2

    q = torch.randn(300, 512, device="cuda").to(dtype)
    dd = torch.randn(3000, 512, device="cuda").to(dtype)
    with kernels.set_backend("triton"):
        vt, it = kernels.max_sim(q, dd)
    with kernels.set_backend("cuda"):
        vc, ic = kernels.max_sim(q, dd)
    assert _rel(vc, vt) < 1e-3  # triton may use tf32 for fp32 inputs
    assert (ic == it).float().mean().item() > 0.99  # near-ties may resolve differently under tf32

    wf = torch.randn(256, 768, device="cuda").to(dtype)
    bf = torch.zeros(256, device="cuda", dtype=dtype, requires_grad=True)
    grads = {}
    for backend in ("triton", "cuda"):
        xx = x.clone().requires_grad_(True)
        bf.grad = None
        with kernels.set_backend(backend):
            kernels.frozen_linear(xx, wf, bf).sum().backward()
        grads[backend] = (xx.grad, bf.grad.clone())
    for a, c in zip(grads["triton"], grads["cuda"]):
        assert _rel(c, a) < TOL[dtype] * 2
