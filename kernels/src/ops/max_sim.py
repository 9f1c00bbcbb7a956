r"""Row-wise max / argmax of an inner-product matrix that is never materialised.

Math
----
For ``x`` of shape (N, K) and ``d`` of shape (M, K), M >= 1::

    S[n, m]  = <x[n], d[m]>                       (accumulated in float32; float64 in the reference on float64)
    vals[n]  = max_m S[n, m]                      float32 (float64 for float64 inputs), shape (N,)
    idx[n]   = min { m : S[n, m] == vals[n] }     int64, shape (N,)   (ties -> the LOWEST index)

NaN: if any S[n, m] is NaN, vals[n] is NaN (a plain max would silently drop it). idx[n] is then some valid index in
[0, M) (the torch backend returns the first NaN position of the first M-chunk holding one; the Triton kernel the start
of the first BLOCK_M tile holding one); do not rely on it.

Gradient (idx is not differentiable; vals is, w.r.t. x and d)::

    dx[n]      = dvals[n] * d[idx[n]]                              (gather)
    dd[m]      = sum_{n : idx[n] == m} dvals[n] * x[n]             (scatter-add into the rows idx[n])

Memory: no N x M tensor anywhere. The Triton kernel keeps an (BLOCK_N, BLOCK_M) fp32 tile in registers; the extra
memory is O(N * splits) (per-split partial max/argmax) plus the outputs. The torch reference is chunked over M (and N)
and holds at most ``row_chunk x chunk`` scores at a time; for backward only x, d (inputs) and idx are kept.

Determinism: forward is deterministic on every backend (fixed reduction order: within a tile the lowest column among
equal maxima, across tiles and M-splits a strict ``>`` in increasing-index order). Backward: dx is a gather; dd is
accumulated in fp32 with ``index_add_`` on CPU (serial, deterministic) and with ``index_put_(accumulate=True)`` on CUDA,
which uses PyTorch's sort-based (deterministic) kernel rather than atomics; then cast to d's dtype. (If the backward is
itself compiled by inductor, inductor may lower it to atomic adds.)

fp32 inputs on CUDA: ``tl.dot`` may use TF32. ``input_precision=None`` (default) picks ``"tf32"`` only when
``torch.backends.cuda.matmul.allow_tf32`` is True (PyTorch's own matmul policy; False by default), else ``"ieee"``
(exact fp32 FMA products). ``"tf32x3"`` is also accepted. 16-bit inputs use their tensor-core path with fp32
accumulation regardless.

Kernel (Triton)
---------------
Grid (row blocks, M-splits). Each program keeps its BLOCK_N rows of x and walks its contiguous range of d in BLOCK_M
tiles (inner loop over K in BLOCK_K steps, ``tl.dot`` into an fp32 tile), then folds each tile into a running
(max, argmax) per row: NaN-propagating row max, lowest column equal to it, strict ``>`` against the running best.
Rows/columns past the edge are *clamped* (they re-read row N-1 / M-1) instead of masked, so loads are unmasked; a
clamped column scores exactly like column M-1 and loses the lowest-index tie to it. When N is small, M is split
over programs (``_choose_splits``: fill the SMs to >= 90 %); the per-split partials [splits, N] are reduced by a
second tiny kernel in split order (deterministic, lowest index kept). Autotuned over BLOCK_M 128/256, 3/4 stages and
loop flattening (one config under TRITON_INTERPRET=1). Interpreter-only deviations (same results): bf16 tiles are
upcast to fp32 before ``tl.dot`` (the triton 3.8 interpreter's bf16 dot returns garbage), and the row max uses
``tl.max`` + an explicit NaN test (a custom reduction runs element by element there).
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch

from leanclip.kernels import _backend, _validate
from leanclip.kernels._backend import tl, triton  # None without triton: only the torch backend runs

__all__ = ["max_sim", "max_sim_ref"]

_PRECISIONS = ("ieee", "tf32", "tf32x3")
_REF_CHUNK = 2048  # columns (rows of d) per reference chunk
_REF_ROW_CHUNK = 8192  # rows of x per reference chunk  -> at most 16 Mi scores (64 MiB fp32) at a time


# ----------------------------------------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------------------------------------
def _better(v: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """Mask where candidate ``v`` replaces ``best`` in an increasing-index scan: strictly greater, or the first NaN."""
    return (v > best) | (torch.isnan(v) & ~torch.isnan(best))


@torch.no_grad()
def _max_argmax_chunked(x: torch.Tensor, d: torch.Tensor, chunk: int, row_chunk: int):
    """(best scores, idx) without autograd; scores in float64 for float64 inputs, else float32."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    N, M = x.shape[0], d.shape[0]
    best = torch.full((N,), float("-inf"), dtype=cdt, device=x.device)
    idx = torch.zeros((N,), dtype=torch.int64, device=x.device)
    for n0 in range(0, N, row_chunk):
        xc = x[n0:n0 + row_chunk].to(cdt)
        b = best[n0:n0 + row_chunk]
        i = idx[n0:n0 + row_chunk]
        for m0 in range(0, M, chunk):
            s = xc @ d[m0:m0 + chunk].to(cdt).T  # (row_chunk, chunk): the only score block alive
            am = torch.argmax(s, dim=1)  # first maximal index (NaN counts as maximal)
            v = s.gather(1, am[:, None]).squeeze(1)
            upd = _better(v, b)
            b.copy_(torch.where(upd, v, b))
            i.copy_(torch.where(upd, am + m0, i))
            del s
    return best, idx


def max_sim_ref(x: torch.Tensor, d: torch.Tensor, chunk: int = _REF_CHUNK, row_chunk: int = _REF_ROW_CHUNK):
    """Pure-torch reference: ``(vals, idx)``, chunked so that at most ``row_chunk x chunk`` scores exist at a time.

    Differentiable w.r.t. x and d through a gather of the winning row (``vals = <x, d[idx]>``), so nothing of size
    N x M is saved for backward. Works in float64 (vals float64 then; float32 for every other input dtype)."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D, got shape {tuple(x.shape)}")
    if d.dim() != 2 or d.shape[1] != x.shape[1]:
        raise ValueError(f"d must be 2-D with {x.shape[1]} columns (like x), got shape {tuple(d.shape)}")
    if d.shape[0] == 0:
        raise ValueError("d must have at least one row (max over an empty set)")
    if chunk < 1 or row_chunk < 1:
        raise ValueError(f"chunk and row_chunk must be >= 1, got {chunk}, {row_chunk}")
    best, idx = _max_argmax_chunked(x, d, chunk, row_chunk)
    cdt = best.dtype
    # (N, K) gather, never (N, M). The product/sum is the same dot as above up to summation order.
    g = (x.to(cdt) * d.to(cdt).index_select(0, idx)).sum(-1)
    vals = torch.where(torch.isnan(best), best, g)  # NaN rows stay NaN even if the recomputed dot was not
    return vals, idx


def _vals_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of vals and of the backward's arithmetic: float32, float64 for float64 inputs (torch backend only)."""
    return torch.promote_types(dtype, torch.float32)


def _max_sim_fwd_torch(x: torch.Tensor, d: torch.Tensor):
    best, idx = _max_argmax_chunked(x, d, _REF_CHUNK, _REF_ROW_CHUNK)
    return best.to(_vals_dtype(x.dtype)), idx


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------------

if triton is not None:

    # BLOCK_N (64/128) and BLOCK_K (64; 32 for fp32) are picked by the launcher. FLATTEN lets the pipeliner overlap
    # the next tile's loads with this tile's max/argmax epilogue. 4 warps on 128x128 spills, so none.
    _GPU_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "FLATTEN": fl}, num_warps=8, num_stages=st)
        for bm in (128, 256)
        for st in (3, 4)
        for fl in (False, True)
    ]

    def _kernel_configs():
        if _backend.triton_interpret():
            # The interpreter takes exactly one config; small tiles so the tests hit every masking path.
            return [triton.Config({"BLOCK_M": 64, "FLATTEN": False}, num_warps=4, num_stages=1)]
        return _GPU_CONFIGS

    def _prune_configs(configs, named_args, **kwargs):
        """Drop BLOCK_M=256 where it spills registers on sm_90 (ptxas -v, triton 3.6 and 3.8: 255 regs + 370-480
        bytes of stack for fp32, and for bf16 when K is not a multiple of BLOCK_K); every other config compiles
        without spills (120-255 regs). Keeps the list whole if it would empty it."""
        even_k = kwargs.get("EVEN_K", named_args.get("EVEN_K", True))
        x = named_args.get("x_ptr")
        fp32 = getattr(x, "dtype", None) == torch.float32
        keep = [c for c in configs if c.kwargs["BLOCK_M"] <= 128 or (even_k and not fp32)]
        return keep or configs

    _CONFIGS = _kernel_configs()
    # Under the interpreter, use tl.max + an explicit NaN check instead of the NaN-propagating custom reduction
    # (identical results, ~20x faster there). Tests switch it off to run the GPU code path.
    _INTERPRETER_FAST_MAX = True
    # M-splits are whole multiples of every config's BLOCK_M, so a tile never straddles two splits.
    _SPLIT_GRANULARITY = max(c.kwargs["BLOCK_M"] for c in _CONFIGS)

    @triton.jit
    def _max_nan(a, b):
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    def _bench_or_inf(kernel_call, quantiles):
        # A config that fails to compile for a reason the autotuner does not catch itself (it only skips
        # OutOfResources / PTXAS / compile-time asserts), e.g. a loop-flattening pass failure, is skipped too. If every
        # config fails, the final launch re-raises the real error.
        try:
            return triton.testing.do_bench(kernel_call, quantiles=quantiles)
        except Exception:  # noqa: BLE001
            return [float("inf")] * len(quantiles) if quantiles else float("inf")

    @triton.autotune(configs=_CONFIGS, key=["N_KEY", "M_KEY", "K", "BLOCK_N", "BLOCK_K", "EVEN_K", "PRECISION"],
                     do_bench=_bench_or_inf, prune_configs_by={"early_config_prune": _prune_configs})
    @triton.jit
    def _max_sim_kernel(
        x_ptr, d_ptr, val_ptr, idx_ptr,
        N, M, K,
        stride_xn, stride_xk, stride_dm, stride_dk,
        split_m,  # columns per M-split (multiple of BLOCK_M)
        N_KEY, M_KEY,  # autotune buckets only
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr, PRECISION: tl.constexpr, FLATTEN: tl.constexpr, FAST_MAX: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        # program (row block, M-split): rows [pid_n*BLOCK_N, +BLOCK_N) against d rows [pid_s*split_m, +split_m)
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Clamp instead of masking: rows past N re-read row N-1 (never stored), columns past M re-read row M-1, whose
        # score equals column M-1's and loses the lowest-index tie to it. Loads stay unmasked and vectorised.
        rows_ld = tl.minimum(rows, N - 1).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + rows_ld[:, None] * stride_xn  # (BLOCK_N, 1)

        m_start = pid_s * split_m
        m_end = tl.minimum(m_start + split_m, M)
        best = tl.full([BLOCK_N], float("-inf"), tl.float32)
        bidx = tl.zeros([BLOCK_N], tl.int32) + m_start

        for m0 in tl.range(m_start, m_end, BLOCK_M, flatten=FLATTEN):
            cols = m0 + tl.arange(0, BLOCK_M)
            cols_ld = tl.minimum(cols, M - 1).to(tl.int64)
            d_cols = d_ptr + cols_ld[None, :] * stride_dm  # (1, BLOCK_M): d read as its transpose (K, BLOCK_M)
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs_k
                if EVEN_K:
                    a = tl.load(x_rows + kk[None, :] * stride_xk)
                    b = tl.load(d_cols + kk[:, None] * stride_dk)
                else:
                    a = tl.load(x_rows + kk[None, :] * stride_xk, mask=kk[None, :] < K, other=0.0)
                    b = tl.load(d_cols + kk[:, None] * stride_dk, mask=kk[:, None] < K, other=0.0)
                if UPCAST:  # interpreter only: its bf16 tl.dot is broken (triton 3.8); bf16->fp32 is exact
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
            # tile epilogue: NaN-propagating row max, then the lowest column attaining it (a NaN max -> column m0)
            if FAST_MAX:
                # interpreter: a custom combine runs element by element in Python, so take the (NaN-dropping) tl.max
                # and put the NaN back explicitly. Same result as the branch below.
                cmax = tl.max(acc, 1)
                cmax = tl.where(tl.max(tl.where(acc != acc, 1, 0), 1) > 0, float("nan"), cmax)
            else:
                cmax = tl.reduce(acc, 1, _max_nan)  # max.NaN.f32; plain tl.max lowers to NaN-dropping maxnum
            cidx = tl.min(tl.where(acc < cmax[:, None], 2147483647, cols[None, :]), 1)
            # tiles come in increasing column order: strict '>' keeps the earlier index on ties; the first NaN sticks
            upd = (cmax > best) | ((cmax != cmax) & (best == best))
            best = tl.where(upd, cmax, best)
            bidx = tl.where(upd, cidx, bidx)

        bidx = tl.minimum(bidx, M - 1)  # belt and braces for the clamped tail columns
        out = pid_s * N + rows
        tl.store(val_ptr + out, best, mask=rows < N)
        tl.store(idx_ptr + out, bidx.to(tl.int64), mask=rows < N)

    @triton.jit
    def _max_sim_combine_kernel(pval_ptr, pidx_ptr, val_ptr, idx_ptr, N, S, BLOCK: tl.constexpr):
        # Deterministic reduction of the per-split partials [S, N]: splits in increasing column order, strict '>'.
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        best = tl.load(pval_ptr + offs, mask=mask, other=float("-inf"))
        bidx = tl.load(pidx_ptr + offs, mask=mask, other=0)
        for s in range(1, S):
            v = tl.load(pval_ptr + s * N + offs, mask=mask, other=float("-inf"))
            i = tl.load(pidx_ptr + s * N + offs, mask=mask, other=0)
            upd = (v > best) | ((v != v) & (best == best))
            best = tl.where(upd, v, best)
            bidx = tl.where(upd, i, bidx)
        tl.store(val_ptr + offs, best, mask=mask)
        tl.store(idx_ptr + offs, bidx, mask=mask)


# ----------------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: a few "SMs", so small-N tests take the M-split path


@functools.lru_cache(maxsize=4096)
def _choose_splits(n_row_blocks: int, m_tiles: int, sms: int, min_tiles_per_split: int = 4) -> int:
    """Number of M-splits: the smallest that fills the machine well.

    Efficiency of a launch of P = row_blocks * splits equal programs on ``sms`` SMs (one resident program per SM at
    these tile sizes) is P / (ceil(P / sms) * sms). Take the smallest split count reaching >= 90 % (else the best),
    keeping at least ``min_tiles_per_split`` split-granules of columns per split so the O(N * splits) partials and the
    per-program prologue stay negligible. ``m_tiles`` counts split granules (_SPLIT_GRANULARITY columns each)."""
    max_splits = max(1, min(m_tiles // min_tiles_per_split, 8 * sms))
    best_s, best_eff = 1, 0.0
    for s in range(1, max_splits + 1):
        per = -(-m_tiles // s)
        s_eff = -(-m_tiles // per)  # splits actually produced with equal-sized splits of `per` granules
        if s_eff != s:
            continue
        p = n_row_blocks * s
        eff = p / (math.ceil(p / sms) * sms)
        if eff > best_eff + 1e-9:
            best_s, best_eff = s, eff
        if eff >= 0.9:
            break
    return best_s


def _pow2_bucket(v: int, cap: int) -> int:
    return min(cap, 1 << max(0, (max(1, v) - 1).bit_length()))


def _max_sim_fwd_triton(x: torch.Tensor, d: torch.Tensor, input_precision: str = "ieee", splits: int = 0):
    """Launch the tiled max/argmax kernel. ``splits`` > 0 forces the number of M-splits (tests); 0 = automatic."""
    if triton is None:  # pragma: no cover
        raise RuntimeError("kernels.max_sim: triton is not installed")
    N, K = x.shape
    M = d.shape[0]
    vals = torch.empty((N,), dtype=torch.float32, device=x.device)
    idx = torch.empty((N,), dtype=torch.int64, device=x.device)
    if N == 0:
        return vals, idx
    if x.is_cuda:
        # A strided last dim would make every (re-)read of a tile uncoalesced; one copy is cheaper.
        if x.stride(1) != 1:
            x = x.contiguous()
        if d.stride(1) != 1:
            d = d.contiguous()
    interp = _backend.triton_interpret()
    block_n = 32 if interp else (64 if N <= 64 else 128)
    block_k = 64 if (interp or x.dtype != torch.float32) else 32
    even_k = K % block_k == 0
    gran = _SPLIT_GRANULARITY
    m_gran = -(-M // gran)
    n_blocks = -(-N // block_n)
    s_req = splits if splits > 0 else _choose_splits(n_blocks, m_gran, _num_sms(x.device))
    s_req = max(1, min(s_req, m_gran))
    split_m = -(-m_gran // s_req) * gran
    S = -(-M // split_m)
    if S == 1:
        pval, pidx = vals, idx
    else:
        pval = torch.empty((S, N), dtype=torch.float32, device=x.device)
        pidx = torch.empty((S, N), dtype=torch.int64, device=x.device)
    precision = input_precision if x.dtype == torch.float32 else "ieee"
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _max_sim_kernel[(n_blocks, S)](
            x, d, pval, pidx,
            N, M, K,
            x.stride(0), x.stride(1), d.stride(0), d.stride(1),
            split_m,
            _pow2_bucket(N, 1 << 16), _pow2_bucket(M, 1 << 22),
            BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=even_k, PRECISION=precision,
            FAST_MAX=interp and _INTERPRETER_FAST_MAX, UPCAST=interp and x.dtype == torch.bfloat16,
        )
        if S > 1:
            blk = 1024
            _max_sim_combine_kernel[(-(-N // blk),)](pval, pidx, vals, idx, N, S, BLOCK=blk)
    return vals, idx


def _max_sim_fwd_cuda_ext(x: torch.Tensor, d: torch.Tensor):
    from leanclip.kernels import _cuda_ext

    ext = _cuda_ext.load()
    if ext is None:
        raise RuntimeError("kernels.max_sim: the leanclip CUDA extension is not built")
    x = x if x.stride(1) == 1 else x.contiguous()
    d = d if d.stride(1) == 1 else d.contiguous()
    vals, idx = ext.max_sim_fwd(x, d)
    return vals, idx


# ----------------------------------------------------------------------------------------------------------------------
# custom op + autograd
# ----------------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("leanclip::max_sim_fwd", mutates_args=())
def max_sim_fwd(x: torch.Tensor, d: torch.Tensor, backend: str, input_precision: str,
                splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "torch":
        return _max_sim_fwd_torch(x, d)
    if backend == "triton":
        return _max_sim_fwd_triton(x, d, input_precision, splits)
    if backend == "cuda":
        return _max_sim_fwd_cuda_ext(x, d)
    raise ValueError(f"kernels.max_sim: unknown backend {backend!r}")


@max_sim_fwd.register_fake
def _max_sim_fwd_fake(x, d, backend, input_precision, splits):
    n = x.shape[0]
    return x.new_empty((n,), dtype=_vals_dtype(x.dtype)), x.new_empty((n,), dtype=torch.int64)


def _max_sim_setup_context(ctx, inputs, output):
    x, d = inputs[0], inputs[1]
    _, idx = output
    ctx.mark_non_differentiable(idx)
    ctx.save_for_backward(x, d, idx)  # inputs + an output of size N: nothing N x M


def _max_sim_backward(ctx, dvals, didx):
    x, d, idx = ctx.saved_tensors
    need_dx, need_dd = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx = dd = None
    if dvals is None:
        return dx, dd, None, None, None
    ct = _vals_dtype(x.dtype)
    g = dvals.to(ct)[:, None]
    if need_dx:
        dx = (g * d.index_select(0, idx).to(ct)).to(x.dtype)
    if need_dd:
        contrib = g * x.to(ct)
        acc = torch.zeros(d.shape, dtype=ct, device=d.device)
        if acc.is_cuda:
            acc.index_put_((idx,), contrib, accumulate=True)  # sort-based, deterministic on CUDA
        else:
            acc.index_add_(0, idx, contrib)  # serial on CPU, deterministic
        dd = acc.to(d.dtype)
    return dx, dd, None, None, None


max_sim_fwd.register_autograd(_max_sim_backward, setup_context=_max_sim_setup_context)


# ----------------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------------
def _default_precision(dtype: torch.dtype, device_type: str) -> str:
    if dtype == torch.float32 and device_type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def max_sim(x: torch.Tensor, d: torch.Tensor, *, input_precision: str | None = None, _splits: int = 0):
    """``vals, idx = max_sim(x, d)``: for x (N, K) and d (M, K), ``vals[n] = max_m <x[n], d[m]>`` (float32) and
    ``idx[n]`` its lowest argmax (int64), without an N x M matrix in memory. ``vals`` is differentiable w.r.t. x and d.

    x and d share a dtype (float32/bfloat16/float16; float64 on the torch backend, which automatic selection picks
    for it, and then vals is float64), a device and K; M >= 1; N == 0 gives empty outputs.
    ``input_precision`` ("ieee", "tf32", "tf32x3") applies to fp32 inputs on the Triton backend; None follows
    ``torch.backends.cuda.matmul.allow_tf32``. ``_splits`` (private, tests/benchmarks) forces the M-split count."""
    _validate.check_tensor("x", x, dim=2, float64=True)
    _validate.check_tensor("d", d, dim=2, float64=True)
    _validate.check_same("d", d, "x", x)
    if d.shape[1] != x.shape[1]:
        raise ValueError(f"d must have {x.shape[1]} columns like x (shape {tuple(x.shape)}), "
                         f"got shape {tuple(d.shape)}")
    if d.shape[0] == 0:
        raise ValueError(f"d must have at least one row (max over an empty set), got shape {tuple(d.shape)}")
    if input_precision is None:
        input_precision = _default_precision(x.dtype, x.device.type)
    elif input_precision not in _PRECISIONS:
        raise ValueError(f"input_precision must be one of {_PRECISIONS} or None, got {input_precision!r}")
    backend = _backend.resolve("max_sim", x.device, x.dtype)
    _validate.check_backend_dtype(backend, x=x, d=d)
    return max_sim_fwd(x, d, backend, input_precision, int(_splits))
