"""LayerNorm over the last dimension with an optional trainable affine (weight γ, bias β).

Math, per row x ∈ R^N (all leading dims flattened into M rows):

    μ = (1/N) Σ_j x_j            σ² = (1/N) Σ_j (x_j − μ)²          r = 1 / sqrt(σ² + eps)
    x̂_j = (x_j − μ) · r          y_j = γ_j · x̂_j + β_j              (γ = 1, β = 0 when absent)

Backward, given dy (g_j = γ_j · dy_j):

    dx_j = r · ( g_j − (1/N) Σ_k g_k − x̂_j · (1/N) Σ_k g_k x̂_k )
    dγ_j = Σ_rows dy_j · x̂_j        dβ_j = Σ_rows dy_j

The forward saves μ and r in float32 ([M] each) and recomputes x̂ from x in the backward. Statistics and
reductions accumulate in float32. dγ/dβ are reduced deterministically: a persistent grid of G programs each
accumulates its strided set of rows into a float32 register partial and writes one row of a [G, N] buffer,
which is then summed over G in a fixed order (no atomics), so two runs give bit-identical dγ/dβ.

dtypes: x float32/bfloat16/float16; weight/bias either x's dtype or float32 (fp32 master params with a 16-bit x).
y takes x's dtype; dγ/dβ take their parameter's dtype. The torch backend also takes float64 x (statistics and
reductions then run in float64, so ``torch.autograd.gradcheck`` applies); the Triton and CUDA kernels do not.

weight/bias may have any stride: the Triton kernels (and the csrc ones) index them as dense vectors, so the
launchers hand them a contiguous copy when they are not (N elements; dγ/dβ go to fresh buffers either way).
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Optional

import torch

from leanclip.kernels import _backend, _validate
from leanclip.kernels._backend import tl, triton

# Largest column block held in registers at once. Rows up to this width run single-pass (one read of x in the
# forward, one read of x and dy in the backward); wider rows loop over column blocks (3 reads of x forward,
# 2 of x and dy backward). Tests lower it to exercise the looping path at small widths.
_MAX_BLOCK_N = 8192
# Backward tile: BLOCK_M rows × BLOCK_N columns per loop iteration, about this many elements.
_BWD_TILE = 2048
# Persistent backward grid on CUDA: this many warps resident per SM (programs per SM = _BWD_WARPS_PER_SM / num_warps).
_BWD_WARPS_PER_SM = 16
# Persistent grid size under the Triton interpreter (CPU): small, so tests stay fast yet use several programs.
_INTERPRET_PROGRAMS = 4


# ----------------------------------------------------------------------------------------------- reference


def layer_norm_ref(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   eps: float = 1e-5) -> torch.Tensor:
    """Pure-torch LayerNorm over the last dim; computes in float32 (float64 for float64 x), returns x.dtype.
    Differentiable with ordinary autograd; the float64 ground truth for the tests."""
    ct = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(ct)
    mean = xf.mean(-1, keepdim=True)
    xc = xf - mean
    var = (xc * xc).mean(-1, keepdim=True)
    y = xc * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype)


def _stats_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """dtype of mean/rstd and of the dγ/dβ accumulation: float32, or float64 for float64 x (torch backend)."""
    return torch.promote_types(x_dtype, torch.float32)


def _aten_ok(x2d, *params) -> bool:
    """fp32 or fp64 rows with an affine (where present) of the same dtype: ATen's fused kernels, whose mean/rstd
    then have the dtype ours have."""
    return x2d.dtype in (torch.float32, torch.float64) and all(p is None or p.dtype == x2d.dtype for p in params)


def _fwd_torch(x2d, weight, bias, eps):
    """[M, N] rows → (y, mean, rstd) — the "torch" backend: ATen's fused LayerNorm for fp32/fp64, otherwise the
    reference math in _stats_dtype (ATen would keep a 16-bit mean/rstd)."""
    if _aten_ok(x2d, weight, bias):
        y, mean, rstd = torch.native_layer_norm(x2d, (x2d.shape[-1],), weight, bias, eps)
        return y, mean.view(-1), rstd.view(-1)
    ct = _stats_dtype(x2d.dtype)
    xf = x2d.to(ct)
    mean = xf.mean(-1)
    xc = xf - mean[:, None]
    rstd = torch.rsqrt((xc * xc).mean(-1) + eps)
    y = xc * rstd[:, None]
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x2d.dtype), mean, rstd


def _bwd_torch(dy2d, x2d, weight, mean, rstd, need_dx, need_dw, need_db):
    if _aten_ok(x2d, weight) and dy2d.dtype == x2d.dtype:
        n = x2d.shape[-1]
        # ATen reads only the bias's presence (to return db), never its values
        bias = x2d.new_empty(n) if need_db else None
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(
            dy2d, x2d, (n,), mean.view(-1, 1), rstd.view(-1, 1), weight, bias, [need_dx, need_dw, need_db])
        return dx, dw, db
    ct = mean.dtype
    dyf = dy2d.to(ct)
    dx = dw = db = None
    if need_dx or need_dw:
        xhat = (x2d.to(ct) - mean[:, None]) * rstd[:, None]
    if need_dx:
        g = dyf * weight.to(ct) if weight is not None else dyf
        c1 = (g * xhat).mean(-1, keepdim=True)
        c2 = g.mean(-1, keepdim=True)
        dx = ((g - c2 - xhat * c1) * rstd[:, None]).to(x2d.dtype)
    if need_dw:
        dw = (dyf * xhat).sum(0)
    if need_db:
        db = dyf.sum(0)
    return dx, dw, db


# ----------------------------------------------------------------------------------------------- Triton
if triton is not None:  # optional (leanclip.kernels._backend): without it the torch backend runs

    @triton.jit
    def _ln_fwd_kernel(
        X, Y, W, B, MEAN, RSTD,
        stride_x, stride_y, N, eps,
        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr, SINGLE_PASS: tl.constexpr,
    ):
        """One row per program. SINGLE_PASS: the whole row sits in registers (BLOCK_N >= N); else loop over
        column blocks: sum -> mean, sum of squared deviations -> var, then normalise and write."""
        row = tl.program_id(0).to(tl.int64)
        X += row * stride_x
        Y += row * stride_y
        if SINGLE_PASS:
            cols = tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.sum(x, axis=0) / N
            xc = tl.where(mask, x - mean, 0.0)
            var = tl.sum(xc * xc, axis=0) / N
            rstd = tl.rsqrt(var + eps)
            y = xc * rstd
            if HAS_WEIGHT:
                y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
        else:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                cols = off + tl.arange(0, BLOCK_N)
                acc += tl.load(X + cols, mask=cols < N, other=0.0).to(tl.float32)
            mean = tl.sum(acc, axis=0) / N
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                cols = off + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
                xc = tl.where(mask, x - mean, 0.0)
                acc += xc * xc
            var = tl.sum(acc, axis=0) / N
            rstd = tl.rsqrt(var + eps)
            for off in range(0, N, BLOCK_N):
                cols = off + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
                y = (x - mean) * rstd
                if HAS_WEIGHT:
                    y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)


    @triton.jit
    def _ln_bwd_kernel(
        DY, X, W, MEAN, RSTD, DX, DW_PART, DB_PART,
        stride_dy, stride_x, stride_dx, M, N,
        HAS_WEIGHT: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
        NEED_XHAT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_PASS: tl.constexpr,
    ):
        """Persistent grid: program p handles row tiles p, p+G, p+2G, ... (BLOCK_M rows each) and writes its
        float32 dγ/dβ partial to row p of DW_PART/DB_PART ([G, N]). SINGLE_PASS keeps whole rows in registers and
        the partials in a [BLOCK_M, BLOCK_N] register accumulator. Otherwise (BLOCK_M == 1, rows wider than
        BLOCK_N): per row, one pass for the two row sums, a second for dx, and the partials accumulate in the
        program's own (zero-initialised) row of DW_PART/DB_PART — owned by one program, so no races."""
        pid = tl.program_id(0)
        n_prog = tl.num_programs(0)
        if SINGLE_PASS:
            _ln_bwd_rows_in_registers(DY, X, W, MEAN, RSTD, DX, DW_PART, DB_PART, stride_dy, stride_x, stride_dx, M, N,
                                      pid, n_prog, HAS_WEIGHT, COMPUTE_DX, COMPUTE_DW, COMPUTE_DB, NEED_XHAT, BLOCK_M,
                                      BLOCK_N)
        else:
            _ln_bwd_wide_rows(DY, X, W, MEAN, RSTD, DX, DW_PART, DB_PART, stride_dy, stride_x, stride_dx, M, N, pid,
                              n_prog, HAS_WEIGHT, COMPUTE_DX, COMPUTE_DW, COMPUTE_DB, NEED_XHAT, BLOCK_N)


    @triton.jit
    def _ln_bwd_rows_in_registers(
        DY, X, W, MEAN, RSTD, DX, DW_PART, DB_PART, stride_dy, stride_x, stride_dx, M, N, pid, n_prog,
        HAS_WEIGHT: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
        NEED_XHAT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Tiles of BLOCK_M whole rows; the program's dγ/dβ partials in a [BLOCK_M, BLOCK_N] register accumulator,
        summed over rows into its row of DW_PART/DB_PART at the end."""
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < N
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(pid * BLOCK_M, M, n_prog * BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            rmask = rows < M
            rows64 = rows.to(tl.int64)
            mask = rmask[:, None] & cmask[None, :]
            dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if COMPUTE_DB:
                db_acc += dy
            if NEED_XHAT:
                x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
                rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
                xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
                if COMPUTE_DW:
                    dw_acc += dy * xhat
                if COMPUTE_DX:
                    if HAS_WEIGHT:
                        g = dy * w[None, :]
                    else:
                        g = dy
                    c1 = tl.sum(xhat * g, axis=1) / N
                    c2 = tl.sum(g, axis=1) / N
                    dx = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
                    tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            tl.store(DW_PART + pid * N + cols, tl.sum(dw_acc, axis=0), mask=cmask)
        if COMPUTE_DB:
            tl.store(DB_PART + pid * N + cols, tl.sum(db_acc, axis=0), mask=cmask)


    @triton.jit
    def _ln_bwd_wide_rows(
        DY, X, W, MEAN, RSTD, DX, DW_PART, DB_PART, stride_dy, stride_x, stride_dx, M, N, pid, n_prog,
        HAS_WEIGHT: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
        NEED_XHAT: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """One row at a time, BLOCK_N columns per pass: the two row sums, then dx; the partials accumulate in the
        program's own (zero-initialised) row of DW_PART/DB_PART."""
        for row in range(pid, M, n_prog):
            row64 = tl.cast(row, tl.int64)
            dy_row = DY + row64 * stride_dy
            x_row = X + row64 * stride_x
            if NEED_XHAT:
                mean = tl.load(MEAN + row)
                rstd = tl.load(RSTD + row)
            c1 = 0.0
            c2 = 0.0
            if COMPUTE_DX:
                acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
                acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
                for off in range(0, N, BLOCK_N):
                    cols = off + tl.arange(0, BLOCK_N)
                    mask = cols < N
                    dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
                    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                    if HAS_WEIGHT:
                        g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                    else:
                        g = dy
                    acc1 += xhat * g
                    acc2 += g
                c1 = tl.sum(acc1, axis=0) / N
                c2 = tl.sum(acc2, axis=0) / N
            for off in range(0, N, BLOCK_N):
                cols = off + tl.arange(0, BLOCK_N)
                mask = cols < N
                dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
                if COMPUTE_DB:
                    part = DB_PART + pid * N + cols
                    tl.store(part, tl.load(part, mask=mask, other=0.0) + dy, mask=mask)
                if NEED_XHAT:
                    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                    if COMPUTE_DW:
                        part = DW_PART + pid * N + cols
                        tl.store(part, tl.load(part, mask=mask, other=0.0) + dy * xhat, mask=mask)
                    if COMPUTE_DX:
                        if HAS_WEIGHT:
                            g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                        else:
                            g = dy
                        dx = (g - (xhat * c1 + c2)) * rstd
                        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------- launchers


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _warps_for(elems: int) -> int:
    """~8 elements per thread (one 16-byte vector for 16-bit types), 1..16 warps."""
    return max(1, min(16, triton.next_power_of_2(max(elems, 1)) // 256))


def _block_n(N: int) -> tuple[int, bool]:
    block = triton.next_power_of_2(N)
    if block <= _MAX_BLOCK_N:
        return block, True
    return triton.next_power_of_2(_MAX_BLOCK_N), False


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [M, N] with a unit last-dim stride and one row stride: a view where possible, else a copy."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.reshape(-1, t.shape[-1])


def _dense(p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """weight/bias as the kernels read them: unit stride (they take no stride argument for the affine)."""
    return p.contiguous() if p is not None else None


def _layer_norm_fwd_triton(x2d, weight, bias, eps):
    M, N = x2d.shape
    weight, bias = _dense(weight), _dense(bias)
    y = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    mean = torch.empty(M, dtype=torch.float32, device=x2d.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x2d.device)
    block_n, single = _block_n(N)
    _ln_fwd_kernel[(M,)](
        x2d, y, weight if weight is not None else x2d, bias if bias is not None else x2d, mean, rstd,
        x2d.stride(0), y.stride(0), N, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, SINGLE_PASS=single, num_warps=_warps_for(block_n),
    )
    return y, mean, rstd


def _layer_norm_bwd_triton(dy2d, x2d, weight, mean, rstd, need_dx, need_dw, need_db):
    M, N = x2d.shape
    weight = _dense(weight)
    dev = x2d.device
    block_n, single = _block_n(N)
    block_m = max(1, _BWD_TILE // block_n) if single else 1
    num_warps = _warps_for(block_m * block_n)
    tiles = triton.cdiv(M, block_m)
    if dev.type == "cuda":
        per_sm = max(1, _BWD_WARPS_PER_SM // num_warps)
        n_prog = min(tiles, _sm_count(dev.index if dev.index is not None else torch.cuda.current_device()) * per_sm)
    else:
        n_prog = min(tiles, _INTERPRET_PROGRAMS)
    alloc = torch.empty if single else torch.zeros  # the looping path accumulates into its partial row
    dx = torch.empty((M, N), dtype=x2d.dtype, device=dev) if need_dx else None
    dw_part = alloc((n_prog, N), dtype=torch.float32, device=dev) if need_dw else None
    db_part = alloc((n_prog, N), dtype=torch.float32, device=dev) if need_db else None
    _ln_bwd_kernel[(n_prog,)](
        dy2d, x2d, weight if weight is not None else x2d, mean, rstd,
        dx if dx is not None else dy2d, dw_part if dw_part is not None else mean,
        db_part if db_part is not None else mean,
        dy2d.stride(0), x2d.stride(0), N, M, N,
        HAS_WEIGHT=weight is not None, COMPUTE_DX=need_dx, COMPUTE_DW=need_dw, COMPUTE_DB=need_db,
        NEED_XHAT=need_dx or need_dw, BLOCK_M=block_m, BLOCK_N=block_n, SINGLE_PASS=single, num_warps=num_warps,
    )
    # Fixed-order reduction over the G partial rows: deterministic.
    dw = dw_part.sum(0) if need_dw else None
    db = db_part.sum(0) if need_db else None
    return dx, dw, db


# ----------------------------------------------------------------------------------------------- custom ops


def _empty(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0)


@torch.library.custom_op("leanclip::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm forward over the last dim. Returns (y shaped like x, contiguous; mean [M]; rstd [M]), the
    statistics in float32 (float64 for float64 x)."""
    N = x.shape[-1]
    M = math.prod(x.shape[:-1])
    if M == 0 or N == 0:
        stats = dict(dtype=_stats_dtype(x.dtype), device=x.device)
        return x.new_empty(x.shape), torch.zeros(M, **stats), torch.zeros(M, **stats)
    x2d = _as_rows(x)
    if backend == "torch":
        y, mean, rstd = _fwd_torch(x2d, weight, bias, eps)
    elif backend == "triton":
        y, mean, rstd = _layer_norm_fwd_triton(x2d, weight, bias, eps)
    elif backend == "cuda":
        from leanclip.kernels import _cuda_ext

        y, mean, rstd = _cuda_ext.load().layer_norm_fwd(x2d, weight, bias, eps)
    else:
        raise ValueError(f"unknown backend {backend!r}")
    return y.reshape(x.shape), mean, rstd


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps, backend):
    M = math.prod(x.shape[:-1])
    stats = _stats_dtype(x.dtype)
    return (x.new_empty(x.shape), x.new_empty((M,), dtype=stats), x.new_empty((M,), dtype=stats))


@torch.library.custom_op("leanclip::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor,
                   rstd: torch.Tensor, need_dx: bool, need_dw: bool, need_db: bool,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm backward. Returns (dx shaped like x in x's dtype, dw [N], db [N]) with dw/db in mean's dtype
    (float32, float64 for float64 x); a gradient not asked for comes back as an empty tensor (custom ops cannot
    return None)."""
    N = x.shape[-1]
    M = math.prod(x.shape[:-1])
    if M == 0 or N == 0:
        return (x.new_zeros(x.shape) if need_dx else _empty(x),
                mean.new_zeros(N) if need_dw else _empty(mean),
                mean.new_zeros(N) if need_db else _empty(mean))
    x2d = _as_rows(x)
    dy2d = _as_rows(dy)
    if backend == "torch":
        dx, dw, db = _bwd_torch(dy2d, x2d, weight, mean, rstd, need_dx, need_dw, need_db)
    elif backend == "triton":
        dx, dw, db = _layer_norm_bwd_triton(dy2d, x2d, weight, mean, rstd, need_dx, need_dw, need_db)
    elif backend == "cuda":
        from leanclip.kernels import _cuda_ext

        dx, dw, db = _cuda_ext.load().layer_norm_bwd(dy2d, x2d, weight, mean, rstd, need_dx, need_dw, need_db)
    else:
        raise ValueError(f"unknown backend {backend!r}")
    dx = dx.reshape(x.shape) if need_dx else _empty(x)
    dw = dw.to(mean.dtype) if need_dw else _empty(mean)
    db = db.to(mean.dtype) if need_db else _empty(mean)
    return dx, dw, db


@layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, need_dx, need_dw, need_db, backend):
    N = x.shape[-1]
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            mean.new_empty((N,)) if need_dw else mean.new_empty(0),
            mean.new_empty((N,)) if need_db else mean.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.backend = backend
    ctx.weight_dtype = weight.dtype if weight is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    if not (need_dx or need_dw or need_db):
        return None, None, None, None, None
    dx, dw, db = torch.ops.leanclip.layer_norm_bwd(dy, x, weight, mean, rstd, need_dx, need_dw, need_db, ctx.backend)
    return (dx if need_dx else None,
            dw.to(ctx.weight_dtype) if need_dw else None,
            db.to(ctx.bias_dtype) if need_db else None,
            None, None)


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- public API


def _check_param(name: str, p, x: torch.Tensor) -> None:
    if p is None:
        return
    _validate.check_tensor(name, p, dim=1, float64=True)
    if p.shape[0] != x.shape[-1]:
        raise ValueError(f"{name}: normalized shape ({x.shape[-1]},) (last dim of x) ≠ {name} shape {tuple(p.shape)}")
    _validate.check_same(name, p, "x", x, dtype=False)
    if p.dtype != x.dtype and p.dtype != torch.float32:
        raise TypeError(f"{name} has dtype {p.dtype} but x has dtype {x.dtype} (only float32 may differ)")


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim of ``x`` (like ``F.layer_norm(x, (x.shape[-1],), weight, bias, eps)``).

    x: float32/bfloat16/float16 (float64 on the torch backend, which is what automatic selection picks for it),
    any leading dims, any strides. weight/bias: optional, shape (x.shape[-1],), any stride, x's dtype or float32.
    Gradients are computed only for inputs that require them; dγ/dβ are deterministic.
    """
    _validate.check_tensor("x", x, min_dim=1, float64=True)
    _check_param("weight", weight, x)
    _check_param("bias", bias, x)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    backend = _backend.resolve("layer_norm", x.device, x.dtype)
    _validate.check_backend_dtype(backend, x=x, weight=weight, bias=bias)
    y, _, _ = torch.ops.leanclip.layer_norm_fwd(x, weight, bias, float(eps), backend)
    return y
