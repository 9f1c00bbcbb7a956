"""Linear layer with a frozen weight: ``y = x·Wᵀ + b``, gradients for ``x`` and ``b`` only.

Math (x: (..., K) flattened to M rows, W: (Nout, K), b: (Nout,), dy: (M, Nout)):

    forward   y[m, n]  = Σ_k x[m, k] · W[n, k] + b[n]
    backward  dx[m, k] = Σ_n dy[m, n] · W[n, k]          (an M×K GEMM, reduction over Nout)
              db[n]    = Σ_m dy[m, n]                    (column sum of dy, accumulated in fp32)
              dW       never computed: W is frozen.

Only W is saved for backward (it is a parameter, so this costs no memory); the activation x is not saved.

The forward is a plain cuBLAS/CPU matmul (``torch.addmm``) - nothing to gain from a custom kernel there. The Triton
backward is one GEMM pass for dx that reads every dy tile once: the output dx is tiled (BLOCK_M rows × BLOCK_K
columns, grouped program order for L2 reuse) and each program loops over Nout in BLOCK_N chunks, loading a dy tile
[BLOCK_M, BLOCK_N] and a W tile [BLOCK_N, BLOCK_K] and accumulating ``tl.dot`` in fp32. Programs of the first
output-column block (pid_k == 0) also sum each dy tile they load over its rows and write that fp32 partial to
``partial[pid_m, n-chunk]`` (autotune variant DB_SPREAD: chunk i is summed by the program with
pid_k == i % num_pid_k instead, spreading that work over the row block); a single ``partial.sum(0)`` afterwards gives
db deterministically (no atomics). When only db is wanted the GEMM is skipped and a column-sum kernel reads dy once.

Two kernel flavours with the same tiling: pointer loads (any GPU, any strides) and, on Hopper+ with 16-byte aligned
rows, TMA descriptors (out-of-bounds boxes are zero-filled, so no masks). Exact fp32 (no tf32 allowed) on CUDA routes
dx to cuBLAS, since Triton has no tensor-core path for it.

dtypes: float32/bfloat16/float16 on every backend; float64 on the torch backend only (db then accumulates in float64,
so ``torch.autograd.gradcheck`` applies).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from leanclip.kernels import _backend, _cuda_ext
from leanclip.kernels._backend import tl, triton  # None without triton: only the torch backend runs
from leanclip.kernels._validate import check_backend_dtype, check_same, check_tensor

_HALF_DTYPES = (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------------------------
# torch references
# ----------------------------------------------------------------------------------------------------------------
def frozen_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference forward (differentiable, works in float64): ``F.linear``. A float32 bias with 16-bit x is cast to
    x's dtype, as autocast does."""
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return F.linear(x, weight, bias)


def frozen_linear_bwd_ref(dy: torch.Tensor, weight: torch.Tensor, need_db: bool = True):
    """Reference backward: ``(dx, db)`` with ``dx = dy·W`` of shape ``dy.shape[:-1] + (K,)`` and
    ``db = Σ_rows dy`` accumulated in (at least) float32, or None when ``need_db`` is False."""
    n_out = dy.shape[-1]
    dy2d = dy.reshape(-1, n_out)
    dx = torch.matmul(dy, weight)
    db = None
    if need_db:
        acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
        db = dy2d.sum(0, dtype=acc)
    return dx, db


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

# Set LEANCLIP_FROZEN_LINEAR_TMA=0 to force the pointer-based kernel on Hopper+ GPUs.
_TMA_ENABLED = os.environ.get("LEANCLIP_FROZEN_LINEAR_TMA", "1") != "0"
_SMEM_BUDGET = 227 * 1024  # bytes of shared memory per block on H100; configs whose operand tiles exceed it are pruned


if triton is not None:

    def _set_tma_block_shapes(nargs):
        """Autotune pre-hook: the host-side TMA descriptors take their box size from the chosen config."""
        bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
        nargs["dy_desc"].block_shape = [bm, bn]
        nargs["w_desc"].block_shape = [bn, bk]
        nargs["dx_desc"].block_shape = [bm, bk]

    def _dx_configs(tma: bool):
        hook = _set_tma_block_shapes if tma else None
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            # The interpreter cannot autotune over several configs; big tiles mean fewer (slow, Python) programs.
            return [triton.Config({"BLOCK_K": 64, "BLOCK_N": 64, "GROUP_M": 4, "DB_SPREAD": False},
                                  num_warps=4, num_stages=1, pre_hook=hook)]
        # H100-oriented (bf16 wgmma, fp32 accumulators). BLOCK_M is chosen by the launcher: the db partial buffer
        # has one row per BLOCK_M rows of dy and is allocated before the launch.
        shapes = [  # (BLOCK_K = output columns, BLOCK_N = reduction chunk, warps, stages)
            (256, 64, 8, 3), (256, 64, 8, 4), (128, 64, 8, 4), (128, 64, 4, 4), (128, 32, 4, 5),
            (64, 64, 4, 4), (256, 32, 8, 4), (64, 32, 4, 3),
        ]
        configs = [triton.Config({"BLOCK_K": bk, "BLOCK_N": bn, "GROUP_M": 8, "DB_SPREAD": False},
                                 num_warps=w, num_stages=s, pre_hook=hook) for bk, bn, w, s in shapes]
        # Spreading the column sums over all programs of a row block (rather than the pid_k == 0 ones) trades a
        # register copy of every dy tile for balance; let the tuner decide on the biggest tiles.
        configs += [triton.Config({"BLOCK_K": bk, "BLOCK_N": bn, "GROUP_M": 8, "DB_SPREAD": True},
                                  num_warps=w, num_stages=s, pre_hook=hook) for bk, bn, w, s in shapes[:3]]
        return configs

    def _prune_dx_configs(configs, named_args, **kwargs):
        """Drop output-column tiles much wider than K, configs whose pipelined tiles overflow shared memory and,
        without db, the DB_SPREAD duplicates; always keep at least the smallest config."""
        k = named_args["K"]
        bm = kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 128))
        elem = kwargs.get("ELEM_BYTES", named_args.get("ELEM_BYTES", 2))
        compute_db = kwargs.get("COMPUTE_DB", named_args.get("COMPUTE_DB", True))
        cap = max(64, triton.next_power_of_2(k))

        def smem(c):  # pipelined operand tiles only; the autotuner also skips configs that fail to launch
            return max(c.num_stages, 1) * c.kwargs["BLOCK_N"] * (bm + c.kwargs["BLOCK_K"]) * elem

        kept = [c for c in configs if c.kwargs["BLOCK_K"] <= cap and smem(c) <= _SMEM_BUDGET
                and (compute_db or not c.kwargs["DB_SPREAD"])]
        return kept or [min(configs, key=smem)]

    @triton.jit
    def _grouped_pids(M, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """(pid_m, pid_k) of this program in grouped order: GROUP_M row blocks sweep all column blocks together, so
        their dy rows and the W column panels stay in L2."""
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_k = tl.cdiv(K, BLOCK_K)
        num_pid_in_group = GROUP_M * num_pid_k
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_k = (pid % num_pid_in_group) // group_size_m
        return pid_m, pid_k

    @triton.jit
    def _dot_acc(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
        if UPCAST_DOT:  # the interpreter's tl.dot mishandles bfloat16 (stored as raw uint16): exact fp32 instead
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    # ---- pointer-based variant (any GPU, any strides) ----
    @triton.jit
    def _dx_tile_loop(dy_ptr, w_ptr, dbp_ptr, pid_m, pid_k, num_pid_k, M, N, K,
                      stride_dym, stride_dyn, stride_wn, stride_wk,
                      DB_MODE: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """acc[BLOCK_M, BLOCK_K] = dy[rows, :] @ W[:, cols]; the column sums of the dy tiles it loads go to
        dbp_ptr[pid_m, chunk]: DB_MODE 0 none, 1 every chunk, 2 chunks i with i % num_pid_k == pid_k."""
        offs_n = tl.arange(0, BLOCK_N)
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        if DB_MODE != 0:
            # Rows past M must contribute exactly zero to the column sums: mask them.
            row_mask = rows < M
            rows_safe = rows
        else:
            # Out-of-range rows/cols are clamped onto valid ones (no load masks); their results are never stored.
            rows_safe = rows % M
        cols_safe = tl.max_contiguous(tl.multiple_of(cols % K, BLOCK_K), BLOCK_K)
        dy_ptrs = dy_ptr + rows_safe[:, None] * stride_dym + offs_n[None, :] * stride_dyn
        w_ptrs = w_ptr + offs_n[:, None] * stride_wn + cols_safe[None, :] * stride_wk
        dbp_ptrs = dbp_ptr + pid_m.to(tl.int64) * N + offs_n
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for i in range(0, tl.cdiv(N, BLOCK_N)):
            n_mask = offs_n < N - i * BLOCK_N
            if DB_MODE != 0:
                a = tl.load(dy_ptrs, mask=row_mask[:, None] & n_mask[None, :], other=0.0)
            else:
                a = tl.load(dy_ptrs, mask=n_mask[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0)
            acc = _dot_acc(a, b, acc, INPUT_PRECISION, UPCAST_DOT)
            if DB_MODE == 1:
                tl.store(dbp_ptrs, tl.sum(a.to(tl.float32), axis=0), mask=n_mask)
            if DB_MODE == 2:
                if i % num_pid_k == pid_k:
                    tl.store(dbp_ptrs, tl.sum(a.to(tl.float32), axis=0), mask=n_mask)
            dbp_ptrs += BLOCK_N
            dy_ptrs += BLOCK_N * stride_dyn
            w_ptrs += BLOCK_N * stride_wn
        return acc

    @triton.autotune(configs=_dx_configs(tma=False), key=["M_BUCKET", "N", "K", "COMPUTE_DB"],
                     prune_configs_by={"early_config_prune": _prune_dx_configs})
    @triton.jit(do_not_specialize=["M_BUCKET"])
    def _frozen_linear_bwd_kernel(
        dy_ptr, w_ptr, dx_ptr, dbp_ptr,
        M, N, K, M_BUCKET,
        stride_dym, stride_dyn, stride_wn, stride_wk, stride_dxm, stride_dxk,
        COMPUTE_DB: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
        ELEM_BYTES: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        DB_SPREAD: tl.constexpr,
    ):
        """dx = dy @ W over a (cdiv(M, BLOCK_M) × cdiv(K, BLOCK_K)) tile grid. With COMPUTE_DB the dy tiles the
        programs load anyway are also summed over their rows into dbp[pid_m, :], each tile exactly once: by the
        pid_k == 0 program of the row block, or (DB_SPREAD) chunk i by the program with pid_k == i % num_pid_k."""
        pid_m, pid_k = _grouped_pids(M, K, BLOCK_M, BLOCK_K, GROUP_M)
        npk = tl.cdiv(K, BLOCK_K)
        # Separate copies of the loop, so that programs without db work run the plain pipelined matmul loop.
        if COMPUTE_DB:
            if DB_SPREAD:
                acc = _dx_tile_loop(dy_ptr, w_ptr, dbp_ptr, pid_m, pid_k, npk, M, N, K,
                                    stride_dym, stride_dyn, stride_wn, stride_wk,
                                    2, INPUT_PRECISION, UPCAST_DOT, BLOCK_M, BLOCK_N, BLOCK_K)
            elif pid_k == 0:
                acc = _dx_tile_loop(dy_ptr, w_ptr, dbp_ptr, pid_m, pid_k, npk, M, N, K,
                                    stride_dym, stride_dyn, stride_wn, stride_wk,
                                    1, INPUT_PRECISION, UPCAST_DOT, BLOCK_M, BLOCK_N, BLOCK_K)
            else:
                acc = _dx_tile_loop(dy_ptr, w_ptr, dbp_ptr, pid_m, pid_k, npk, M, N, K,
                                    stride_dym, stride_dyn, stride_wn, stride_wk,
                                    0, INPUT_PRECISION, UPCAST_DOT, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            acc = _dx_tile_loop(dy_ptr, w_ptr, dbp_ptr, pid_m, pid_k, npk, M, N, K,
                                stride_dym, stride_dyn, stride_wn, stride_wk,
                                0, INPUT_PRECISION, UPCAST_DOT, BLOCK_M, BLOCK_N, BLOCK_K)
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        dx_ptrs = dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < K))

    # ---- TMA variant (Hopper+, 16-byte aligned rows): bulk async tile copies, out-of-bounds boxes zero-filled ----
    @triton.jit
    def _dx_tile_loop_tma(dy_desc, w_desc, dbp_ptr, pid_m, pid_k, num_pid_k, N,
                          DB_MODE: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        offs_n = tl.arange(0, BLOCK_N)
        off_m = pid_m * BLOCK_M
        off_k = pid_k * BLOCK_K
        dbp_ptrs = dbp_ptr + pid_m.to(tl.int64) * N + offs_n
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for i in range(0, tl.cdiv(N, BLOCK_N)):
            a = dy_desc.load([off_m, i * BLOCK_N])  # rows >= M and columns >= N read as zero
            b = w_desc.load([i * BLOCK_N, off_k])
            acc = _dot_acc(a, b, acc, INPUT_PRECISION, UPCAST_DOT)
            if DB_MODE == 1:
                tl.store(dbp_ptrs, tl.sum(a.to(tl.float32), axis=0), mask=offs_n < N - i * BLOCK_N)
            if DB_MODE == 2:
                if i % num_pid_k == pid_k:
                    tl.store(dbp_ptrs, tl.sum(a.to(tl.float32), axis=0), mask=offs_n < N - i * BLOCK_N)
            dbp_ptrs += BLOCK_N
        return acc

    @triton.autotune(configs=_dx_configs(tma=True), key=["M_BUCKET", "N", "K", "COMPUTE_DB"],
                     prune_configs_by={"early_config_prune": _prune_dx_configs})
    @triton.jit(do_not_specialize=["M_BUCKET"])
    def _frozen_linear_bwd_tma_kernel(
        dy_desc, w_desc, dx_desc, dbp_ptr,
        M, N, K, M_BUCKET,
        COMPUTE_DB: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
        ELEM_BYTES: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        DB_SPREAD: tl.constexpr,
    ):
        """Same tiling and db scheme as _frozen_linear_bwd_kernel, with TMA descriptors for dy, W and dx."""
        pid_m, pid_k = _grouped_pids(M, K, BLOCK_M, BLOCK_K, GROUP_M)
        npk = tl.cdiv(K, BLOCK_K)
        if COMPUTE_DB:
            if DB_SPREAD:
                acc = _dx_tile_loop_tma(dy_desc, w_desc, dbp_ptr, pid_m, pid_k, npk, N,
                                        2, INPUT_PRECISION, UPCAST_DOT, BLOCK_M, BLOCK_N, BLOCK_K)
            elif pid_k == 0:
                acc = _dx_tile_loop_tma(dy_desc, w_desc, dbp_ptr, pid_m, pid_k, npk, N,
                                        1, INPUT_PRECISION, UPCAST_DOT, BLOCK_M, BLOCK_N, BLOCK_K)
            else:
                acc = _dx_tile_loop_tma(dy_desc, w_desc, dbp_ptr, pid_m, pid_k, npk, N,
                                        0, INPUT_PRECISION, UPCAST_DOT, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            acc = _dx_tile_loop_tma(dy_desc, w_desc, dbp_ptr, pid_m, pid_k, npk, N,
                                    0, INPUT_PRECISION, UPCAST_DOT, BLOCK_M, BLOCK_N, BLOCK_K)
        # The part of the box outside dx is dropped by the TMA store.
        dx_desc.store([pid_m * BLOCK_M, pid_k * BLOCK_K], acc.to(dx_desc.dtype))

    # ---- column sum (db only, when dx is not needed) ----
    @triton.jit
    def _col_sum_kernel(dy_ptr, out_ptr, M, N, ROWS_PER_PROG, stride_dym, stride_dyn,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """out[pid_m, cols] = Σ dy[rows of this program, cols] in fp32 (ROWS_PER_PROG is a multiple of BLOCK_M)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        row0 = pid_m.to(tl.int64) * ROWS_PER_PROG
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r in range(0, ROWS_PER_PROG, BLOCK_M):
            rows = row0 + r + tl.arange(0, BLOCK_M)
            mask = (rows[:, None] < M) & col_mask[None, :]
            acc += tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask,
                           other=0.0).to(tl.float32)
        tl.store(out_ptr + pid_m.to(tl.int64) * N + cols, tl.sum(acc, axis=0), mask=col_mask)


# ----------------------------------------------------------------------------------------------------------------
# launchers (2-D dy with a unit last-dim stride; M, N, K > 0)
# ----------------------------------------------------------------------------------------------------------------
def _num_programs_target(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # interpreter: few, large programs


def _dx_block_m(m: int) -> int:
    if m <= 16:
        return 16
    if m <= 32:
        return 32
    if m <= 2048 or _backend.triton_interpret():
        return 64
    return 128


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's own matmul setting (tf32 only when the user allowed it, e.g.
    # torch.set_float32_matmul_precision("high")); 16-bit inputs ignore the flag.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA descriptors need 2-D tensors with unit last stride, 16-byte aligned base and row stride."""
    for t in tensors:
        if t.stride(-1) != 1 or t.stride(0) <= 0 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
    return True


def _use_tma(dy2d: torch.Tensor, weight: torch.Tensor) -> bool:
    if not _TMA_ENABLED or dy2d.device.type != "cuda" or _backend.triton_interpret():
        return False
    if torch.cuda.get_device_capability(dy2d.device)[0] < 9:
        return False
    k = weight.shape[1]
    return _tma_ok(dy2d, weight) and (k * dy2d.element_size()) % 16 == 0


def _col_sum_triton(dy2d: torch.Tensor) -> torch.Tensor:
    """fp32 column sums of dy2d (M, N), deterministic: per-program partials, then one ``sum(0)``."""
    m, n = dy2d.shape
    on_gpu = dy2d.device.type == "cuda"
    block_m, block_n = (64, 128) if on_gpu else (32, 64)
    col_blocks = triton.cdiv(n, block_n)
    row_blocks = triton.cdiv(m, block_m)
    groups = max(1, min(row_blocks, _num_programs_target(dy2d.device) // col_blocks))
    rows_per_prog = triton.cdiv(row_blocks, groups) * block_m
    groups = triton.cdiv(m, rows_per_prog)
    partial = torch.empty((groups, n), device=dy2d.device, dtype=torch.float32)
    _col_sum_kernel[(groups, col_blocks)](dy2d, partial, m, n, rows_per_prog, dy2d.stride(0), dy2d.stride(1),
                                          BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8 if on_gpu else 4)
    return partial.sum(0)


def _dx_db_triton(dy2d: torch.Tensor, weight: torch.Tensor, need_db: bool, use_tma: Optional[bool] = None,
                  config: Optional[dict] = None):
    """dx = dy2d @ weight (dy2d's dtype) and, if need_db, db = Σ_rows dy2d (fp32), from one pass over dy.
    ``use_tma`` None picks the TMA kernel where it can run; ``config`` (BLOCK_K, BLOCK_N, GROUP_M, DB_SPREAD,
    optionally BLOCK_M, num_warps, num_stages) bypasses the autotuner (tests, benchmarks)."""
    m, n = dy2d.shape
    k = weight.shape[1]
    config = dict(config or {})
    block_m = config.pop("BLOCK_M", None) or _dx_block_m(m)
    num_pid_m = triton.cdiv(m, block_m)
    dx = torch.empty((m, k), device=dy2d.device, dtype=dy2d.dtype)
    partial = torch.empty((num_pid_m, n) if need_db else (1,), device=dy2d.device, dtype=torch.float32)
    meta = dict(COMPUTE_DB=need_db, INPUT_PRECISION=_input_precision(dy2d.dtype),
                UPCAST_DOT=_backend.triton_interpret() and dy2d.dtype == torch.bfloat16,
                ELEM_BYTES=dy2d.element_size(), BLOCK_M=block_m)

    def grid(cfg):
        return (num_pid_m * triton.cdiv(k, cfg["BLOCK_K"]),)

    if use_tma is None:
        use_tma = _use_tma(dy2d, weight)
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        # Box sizes are placeholders; the autotune pre-hook sets them from the chosen config.
        args = (TensorDescriptor.from_tensor(dy2d, [block_m, 16]), TensorDescriptor.from_tensor(weight, [16, 16]),
                TensorDescriptor.from_tensor(dx, [block_m, 16]), partial, m, n, k, triton.next_power_of_2(m))
        kernel = _frozen_linear_bwd_tma_kernel
    else:
        args = (dy2d, weight, dx, partial, m, n, k, triton.next_power_of_2(m),
                dy2d.stride(0), dy2d.stride(1), weight.stride(0), weight.stride(1), dx.stride(0), dx.stride(1))
        kernel = _frozen_linear_bwd_kernel
    if config:
        full = {**meta, **config}
        if use_tma:
            _set_tma_block_shapes({"dy_desc": args[0], "w_desc": args[1], "dx_desc": args[2], **full})
        kernel.fn[(grid(full))](*args, **full)
    else:
        kernel[grid](*args, **meta)
    db = partial.sum(0) if need_db else None
    return dx, db


def _frozen_linear_bwd_triton(dy2d, weight, need_dx: bool, need_db: bool):
    if not need_dx:
        return None, (_col_sum_triton(dy2d) if need_db else None)
    if dy2d.device.type == "cuda" and _input_precision(dy2d.dtype) == "ieee" and dy2d.dtype == torch.float32:
        # Exact fp32 (tf32 not allowed) has no tensor-core path in Triton; cuBLAS SGEMM is far faster there.
        return torch.mm(dy2d, weight), (_col_sum_triton(dy2d) if need_db else None)
    return _dx_db_triton(dy2d, weight, need_db)


def _db_dtype(dy_dtype: torch.dtype) -> torch.dtype:
    """db accumulates (and is returned by the op) in float32, float64 for float64 dy (torch backend)."""
    return torch.promote_types(dy_dtype, torch.float32)


def _frozen_linear_bwd_torch(dy2d, weight, need_dx: bool, need_db: bool):
    dx = torch.mm(dy2d, weight) if need_dx else None
    db = dy2d.sum(0, dtype=_db_dtype(dy2d.dtype)) if need_db else None
    return dx, db


def _frozen_linear_bwd_cuda(dy2d, weight, need_dx: bool, need_db: bool):
    ext = _cuda_ext.load()
    if ext is None:
        raise RuntimeError("kernels.frozen_linear: the leanclip CUDA extension is not built")
    if need_dx and hasattr(ext, "frozen_linear_bwd"):
        dx, db = ext.frozen_linear_bwd(dy2d, weight.contiguous(), need_db)
        return dx, (db.float() if need_db else None)
    dx = torch.mm(dy2d, weight) if need_dx else None
    db = ext.bias_grad(dy2d).float() if need_db else None
    return dx, db


# ----------------------------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------------------------
def _rows(t: torch.Tensor) -> int:
    return math.prod(t.shape[:-1])


@torch.library.custom_op("leanclip::frozen_linear_fwd", mutates_args=())
def _frozen_linear_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          backend: str) -> torch.Tensor:
    k = x.shape[-1]
    n_out = weight.shape[0]
    x2d = x.reshape(_rows(x), k)
    if bias is None:
        y = torch.mm(x2d, weight.t())
    else:
        y = torch.addmm(bias.to(x.dtype), x2d, weight.t())
    return y.view(*x.shape[:-1], n_out)


@_frozen_linear_fwd_op.register_fake
def _(x, weight, bias, backend):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("leanclip::frozen_linear_bwd", mutates_args=())
def _frozen_linear_bwd_op(dy: torch.Tensor, weight: torch.Tensor, need_dx: bool, need_db: bool,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx of shape dy.shape[:-1] + (K,), db (Nout,) in _db_dtype); a tensor that was not asked for is empty."""
    n_out = dy.shape[-1]
    k = weight.shape[1]
    m = _rows(dy)
    dy2d = dy.reshape(m, n_out)
    if m == 0 or n_out == 0 or k == 0:  # degenerate sizes: nothing for a kernel to do
        dx, db = _frozen_linear_bwd_torch(dy2d, weight, need_dx, need_db)
    else:
        if dy2d.stride(-1) != 1:
            dy2d = dy2d.contiguous()
        if backend == "triton":
            dx, db = _frozen_linear_bwd_triton(dy2d, weight, need_dx, need_db)
        elif backend == "cuda":
            dx, db = _frozen_linear_bwd_cuda(dy2d, weight, need_dx, need_db)
        elif backend == "torch":
            dx, db = _frozen_linear_bwd_torch(dy2d, weight, need_dx, need_db)
        else:
            raise ValueError(f"unknown backend {backend!r}")
    dx = dx.view(*dy.shape[:-1], k) if need_dx else dy.new_empty((0,))
    db = db if need_db else dy.new_empty((0,), dtype=_db_dtype(dy.dtype))
    return dx, db


@_frozen_linear_bwd_op.register_fake
def _(dy, weight, need_dx, need_db, backend):
    dx = dy.new_empty((*dy.shape[:-1], weight.shape[1])) if need_dx else dy.new_empty((0,))
    db = dy.new_empty((dy.shape[-1],) if need_db else (0,), dtype=_db_dtype(dy.dtype))
    return dx, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, backend = inputs
    ctx.save_for_backward(weight)  # a frozen parameter: no activation is kept
    ctx.backend = backend
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, dy):
    (weight,) = ctx.saved_tensors
    if ctx.needs_input_grad[1]:
        raise RuntimeError("kernels.frozen_linear never computes a gradient for weight; freeze it "
                           "(weight.requires_grad_(False)) or use torch.nn.functional.linear")
    need_dx = bool(ctx.needs_input_grad[0])
    need_db = bool(ctx.needs_input_grad[2])
    if not (need_dx or need_db):
        return None, None, None, None
    dx, db = torch.ops.leanclip.frozen_linear_bwd(dy, weight, need_dx, need_db, ctx.backend)
    return (dx if need_dx else None), None, (db.to(ctx.bias_dtype) if need_db else None), None


_frozen_linear_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------
def _validate(x, weight, bias) -> None:
    check_tensor("x", x, min_dim=1, float64=True)
    check_tensor("weight", weight, dim=2, float64=True)
    if weight.requires_grad:
        raise ValueError("weight must not require grad: kernels.frozen_linear never computes dW; freeze it "
                         "(weight.requires_grad_(False)) or use torch.nn.functional.linear for a trainable weight")
    check_same("weight", weight, "x", x)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape (Nout, {x.shape[-1]}) to match x's last dim, "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dim=1, float64=True)
        check_same("bias", bias, "x", x, dtype=False)
        if bias.dtype != x.dtype and not (bias.dtype == torch.float32 and x.dtype in _HALF_DTYPES):
            raise TypeError(f"bias must have x's dtype ({x.dtype}) or be float32 with 16-bit x, got {bias.dtype}")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},) to match weight, got {tuple(bias.shape)}")


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x·Wᵀ + b`` like ``F.linear`` for a frozen ``weight`` (must not require grad). Gradients flow to ``x`` and
    ``bias`` only; x is not saved for backward and db is fused into the dx GEMM. x and weight share a dtype
    (float32/bfloat16/float16; float64 on the torch backend, which automatic selection picks for it); bias may be
    float32 with 16-bit x (then db is float32). Output has x's dtype and shape ``x.shape[:-1] + (Nout,)``."""
    _validate(x, weight, bias)
    backend = _backend.resolve("frozen_linear", x.device, x.dtype)
    check_backend_dtype(backend, x=x, weight=weight, bias=bias)
    return torch.ops.leanclip.frozen_linear_fwd(x, weight, bias, backend)
