// LayerNorm over the last dim of x2d (M, N), forward and backward.
//
// Layout: a block is (tx, ty) threads; each of its ty row groups (tx threads, a multiple of 32) owns one row at a
// time and walks rows with a grid stride. A thread holds up to CACHE packs of VEC elements (16 bytes per pack on the
// vector path) in registers, so a row is read from memory once; wider rows re-read the overflow from L1/L2.
// Row reductions: warp shuffles, then shared memory across the warps of the row group; all fp32.
//
// forward : mean = sum(x)/N; var = sum((x-mean)^2)/N (two passes over registers); rstd = rsqrt(var + eps)
//           y = (x - mean) * rstd * w + b
// backward: xhat = (x-mean)*rstd, g = dy*w; dx = rstd * (g - mean(g) - xhat * mean(g*xhat))
//           dw = sum_rows dy*xhat, db = sum_rows dy: each thread accumulates its columns over the rows its group
//           visits; the ty groups are added in a fixed order through shared memory into partial[block, N] (fp32),
//           then sum_partials adds the blocks in a fixed order. Deterministic, no atomics. Rows wider than the
//           register capacity (512 threads x 16 elements) get dw/db from col_sums (bias_grad.cu) instead.
#include <algorithm>

#include "common.h"

namespace leanclip {
namespace {

constexpr int kElems = 16;         // elements a thread keeps in registers per row (16-byte packs)
constexpr int kScalarCache = 8;    // scalar path (unaligned rows): elements kept in registers per row
constexpr int kMaxThreadsX = 512;  // threads per row group at most
constexpr int kBlockThreads = 256; // target block size when row groups are narrow

struct RowCfg {
  int tx, ty;
};

RowCfg row_cfg(int nvec, int cache) {
  int per = (nvec + cache - 1) / cache;
  int tx = std::min(kMaxThreadsX, std::max(32, (per + 31) / 32 * 32));
  int ty = tx >= kBlockThreads ? 1 : kBlockThreads / tx;
  return {tx, ty};
}

template <typename W, int VEC>
__device__ __forceinline__ void load_param(const W* p, int col, float (&out)[VEC], float dflt) {
  if (p != nullptr) {
    load_f<W, VEC>(p + col, out);
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) out[v] = dflt;
  }
}

template <typename T, typename W, int VEC, int CACHE>
__global__ void __launch_bounds__(kMaxThreadsX)
    ln_fwd_kernel(const T* __restrict__ x, int64_t sx, const W* __restrict__ w, const W* __restrict__ b,
                  T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out, int M, int N,
                  float eps) {
  __shared__ float red[32];
  const int nvec = N / VEC, tx = threadIdx.x, TX = blockDim.x;
  const float inv_n = 1.f / float(N);
  for (int64_t row0 = int64_t(blockIdx.x) * blockDim.y; row0 < M; row0 += int64_t(gridDim.x) * blockDim.y) {
    const int64_t row = row0 + threadIdx.y;
    const bool valid = row < M;
    const T* xr = x + row * sx;
    float c[CACHE][VEC];
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < CACHE; ++i) {
      const int j = tx + i * TX;
      if (valid && j < nvec) {
        load_f<T, VEC>(xr + j * VEC, c[i]);
#pragma unroll
        for (int v = 0; v < VEC; ++v) s += c[i][v];
      }
    }
    for (int j = tx + CACHE * TX; valid && j < nvec; j += TX) {
      float t[VEC];
      load_f<T, VEC>(xr + j * VEC, t);
#pragma unroll
      for (int v = 0; v < VEC; ++v) s += t[v];
    }
    const float mu = row_sum2(s, 0.f, red).x * inv_n;
    float q = 0.f;
#pragma unroll
    for (int i = 0; i < CACHE; ++i) {
      const int j = tx + i * TX;
      if (valid && j < nvec) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const float d = c[i][v] - mu;
          q += d * d;
        }
      }
    }
    for (int j = tx + CACHE * TX; valid && j < nvec; j += TX) {
      float t[VEC];
      load_f<T, VEC>(xr + j * VEC, t);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const float d = t[v] - mu;
        q += d * d;
      }
    }
    const float var = row_sum2(q, 0.f, red).x * inv_n;
    const float rs = rsqrtf(var + eps);
    if (valid) {
      if (tx == 0) {
        mean_out[row] = mu;
        rstd_out[row] = rs;
      }
      T* yr = y + row * int64_t(N);
#pragma unroll
      for (int i = 0; i < CACHE; ++i) {
        const int j = tx + i * TX;
        if (j < nvec) {
          float wv[VEC], bv[VEC], o[VEC];
          load_param<W, VEC>(w, j * VEC, wv, 1.f);
          load_param<W, VEC>(b, j * VEC, bv, 0.f);
#pragma unroll
          for (int v = 0; v < VEC; ++v) o[v] = (c[i][v] - mu) * rs * wv[v] + bv[v];
          store_f<T, VEC>(yr + j * VEC, o);
        }
      }
      for (int j = tx + CACHE * TX; j < nvec; j += TX) {
        float t[VEC], wv[VEC], bv[VEC], o[VEC];
        load_f<T, VEC>(xr + j * VEC, t);
        load_param<W, VEC>(w, j * VEC, wv, 1.f);
        load_param<W, VEC>(b, j * VEC, bv, 0.f);
#pragma unroll
        for (int v = 0; v < VEC; ++v) o[v] = (t[v] - mu) * rs * wv[v] + bv[v];
        store_f<T, VEC>(yr + j * VEC, o);
      }
    }
  }
}

// dw_part / db_part (each [gridDim.x, N], or null): only when nvec <= CACHE * blockDim.x (the host guarantees it).
// Dynamic shared memory: blockDim.y * N floats when a partial is requested.
template <typename T, typename W, int VEC, int CACHE>
__global__ void __launch_bounds__(kMaxThreadsX)
    ln_bwd_kernel(const T* __restrict__ dy, int64_t sdy, const T* __restrict__ x, int64_t sx,
                  const W* __restrict__ w, const float* __restrict__ mean, const float* __restrict__ rstd,
                  T* __restrict__ dx, float* __restrict__ dw_part, float* __restrict__ db_part, int M, int N) {
  extern __shared__ float acc_smem[];
  __shared__ float red[32];
  const int nvec = N / VEC, tx = threadIdx.x, TX = blockDim.x;
  const float inv_n = 1.f / float(N);
  const bool want_w = dw_part != nullptr, want_b = db_part != nullptr;
  float aw[CACHE][VEC], ab[CACHE][VEC];
#pragma unroll
  for (int i = 0; i < CACHE; ++i)
#pragma unroll
    for (int v = 0; v < VEC; ++v) aw[i][v] = ab[i][v] = 0.f;

  for (int64_t row0 = int64_t(blockIdx.x) * blockDim.y; row0 < M; row0 += int64_t(gridDim.x) * blockDim.y) {
    const int64_t row = row0 + threadIdx.y;
    const bool valid = row < M;
    const T* xr = x + row * sx;
    const T* gr = dy + row * sdy;
    const float mu = valid ? mean[row] : 0.f;
    const float rs = valid ? rstd[row] : 0.f;
    float xh[CACHE][VEC], g[CACHE][VEC];
    float s1 = 0.f, s2 = 0.f;
#pragma unroll
    for (int i = 0; i < CACHE; ++i) {
      const int j = tx + i * TX;
      if (valid && j < nvec) {
        float xv[VEC], dv[VEC], wv[VEC];
        load_f<T, VEC>(xr + j * VEC, xv);
        load_f<T, VEC>(gr + j * VEC, dv);
        load_param<W, VEC>(w, j * VEC, wv, 1.f);
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          xh[i][v] = (xv[v] - mu) * rs;
          g[i][v] = dv[v] * wv[v];
          s1 += g[i][v];
          s2 += g[i][v] * xh[i][v];
          if (want_w) aw[i][v] += dv[v] * xh[i][v];
          if (want_b) ab[i][v] += dv[v];
        }
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) xh[i][v] = g[i][v] = 0.f;
      }
    }
    if (dx == nullptr) continue;  // uniform across the block: no reduction needed
    for (int j = tx + CACHE * TX; valid && j < nvec; j += TX) {
      float xv[VEC], dv[VEC], wv[VEC];
      load_f<T, VEC>(xr + j * VEC, xv);
      load_f<T, VEC>(gr + j * VEC, dv);
      load_param<W, VEC>(w, j * VEC, wv, 1.f);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const float gv = dv[v] * wv[v];
        s1 += gv;
        s2 += gv * ((xv[v] - mu) * rs);
      }
    }
    const float2 r = row_sum2(s1, s2, red);
    const float c1 = r.x * inv_n, c2 = r.y * inv_n;
    if (valid) {
      T* dxr = dx + row * int64_t(N);
#pragma unroll
      for (int i = 0; i < CACHE; ++i) {
        const int j = tx + i * TX;
        if (j < nvec) {
          float o[VEC];
#pragma unroll
          for (int v = 0; v < VEC; ++v) o[v] = rs * (g[i][v] - c1 - xh[i][v] * c2);
          store_f<T, VEC>(dxr + j * VEC, o);
        }
      }
      for (int j = tx + CACHE * TX; j < nvec; j += TX) {
        float xv[VEC], dv[VEC], wv[VEC], o[VEC];
        load_f<T, VEC>(xr + j * VEC, xv);
        load_f<T, VEC>(gr + j * VEC, dv);
        load_param<W, VEC>(w, j * VEC, wv, 1.f);
#pragma unroll
        for (int v = 0; v < VEC; ++v) o[v] = rs * (dv[v] * wv[v] - c1 - (xv[v] - mu) * rs * c2);
        store_f<T, VEC>(dxr + j * VEC, o);
      }
    }
  }

  // Add the ty row groups' accumulators in a fixed order and write this block's partial row.
  if (!want_w && !want_b) return;
  const int nthreads = blockDim.x * blockDim.y, tid = threadIdx.y * blockDim.x + threadIdx.x;
  float* mine = acc_smem + int64_t(threadIdx.y) * N;
#pragma unroll
  for (int pass = 0; pass < 2; ++pass) {
    float* out = pass == 0 ? dw_part : db_part;
    if (out == nullptr) continue;  // uniform
#pragma unroll
    for (int i = 0; i < CACHE; ++i) {
      const int j = tx + i * TX;
      if (j < nvec) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) mine[j * VEC + v] = pass == 0 ? aw[i][v] : ab[i][v];
      }
    }
    __syncthreads();
    for (int col = tid; col < N; col += nthreads) {
      float s = 0.f;
      for (int yy = 0; yy < int(blockDim.y); ++yy) s += acc_smem[int64_t(yy) * N + col];
      out[int64_t(blockIdx.x) * N + col] = s;
    }
    __syncthreads();
  }
}

template <typename T, typename W, int VEC, int CACHE>
void run_fwd(const LnArgs& a, float eps, void* y, float* mean, float* rstd, cudaStream_t stream) {
  const RowCfg cfg = row_cfg(a.N / VEC, CACHE);
  const int grid = (a.M + cfg.ty - 1) / cfg.ty;
  ln_fwd_kernel<T, W, VEC, CACHE><<<grid, dim3(cfg.tx, cfg.ty), 0, stream>>>(
      static_cast<const T*>(a.x), a.sx, static_cast<const W*>(a.w), static_cast<const W*>(a.b), static_cast<T*>(y),
      mean, rstd, a.M, a.N, eps);
}

template <typename T, typename W>
void fwd_typed(const LnArgs& a, float eps, void* y, float* mean, float* rstd, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = a.N % V == 0 && a.sx % V == 0 && aligned16(a.x) && aligned16(y) && aligned16(a.w) && aligned16(a.b);
  if (vec)
    run_fwd<T, W, V, kElems / V>(a, eps, y, mean, rstd, stream);
  else
    run_fwd<T, W, 1, kScalarCache>(a, eps, y, mean, rstd, stream);
}

template <typename T, typename W, int VEC, int CACHE>
void run_bwd(const LnArgs& a, const LnBwdPlan& p, const float* mean, const float* rstd, void* dx, float* part_w,
             float* part_b, cudaStream_t stream) {
  const bool partials = p.fused && (part_w != nullptr || part_b != nullptr);
  ln_bwd_kernel<T, W, VEC, CACHE><<<p.grid, dim3(p.tx, p.ty), partials ? p.smem : 0, stream>>>(
      static_cast<const T*>(a.dy), a.sdy, static_cast<const T*>(a.x), a.sx, static_cast<const W*>(a.w), mean, rstd,
      static_cast<T*>(dx), partials ? part_w : nullptr, partials ? part_b : nullptr, a.M, a.N);
}

template <typename T, typename W>
void bwd_typed(const LnArgs& a, const LnBwdPlan& p, const float* mean, const float* rstd, void* dx, float* part_w,
               float* part_b, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  if (p.vec)
    run_bwd<T, W, V, kElems / V>(a, p, mean, rstd, dx, part_w, part_b, stream);
  else
    run_bwd<T, W, 1, kScalarCache>(a, p, mean, rstd, dx, part_w, part_b, stream);
}

template <typename F>
void dispatch_affine(const LnArgs& a, F&& f) {
  dispatch(a.t, [&](auto tag) {
    using T = decltype(tag);
    if (a.affine_f32)
      f(T{}, float{});
    else
      f(T{}, T{});
  });
}

}  // namespace

cudaError_t ln_fwd(const LnArgs& a, float eps, void* y, float* mean, float* rstd, cudaStream_t stream) {
  dispatch_affine(a, [&](auto t, auto w) { fwd_typed<decltype(t), decltype(w)>(a, eps, y, mean, rstd, stream); });
  return cudaGetLastError();
}

LnBwdPlan ln_bwd_plan(const LnArgs& a, bool need_partials, int device) {
  LnBwdPlan p;
  const int elem = a.t == DType::F32 ? 4 : 2, V = 16 / elem;
  p.vec = a.N % V == 0 && a.sx % V == 0 && a.sdy % V == 0 && aligned16(a.x) && aligned16(a.dy) && aligned16(a.w);
  const int cache = p.vec ? kElems / V : kScalarCache, nvec = p.vec ? a.N / V : a.N;
  p.fused = !need_partials || nvec <= cache * kMaxThreadsX;
  const RowCfg cfg = row_cfg(nvec, cache);
  p.tx = cfg.tx;
  p.ty = cfg.ty;
  p.grid = (a.M + cfg.ty - 1) / cfg.ty;
  p.smem = 0;
  if (need_partials && p.fused) {
    // <= 32 KiB: N <= cache * VEC * tx = 16 * tx, and tx * ty <= 512
    p.smem = size_t(p.ty) * a.N * sizeof(float);
    int per_sm = 0;
    dispatch_affine(a, [&](auto t, auto w) {
      using T = decltype(t);
      using W = decltype(w);
      constexpr int VV = 16 / sizeof(T);
      if (p.vec)
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, ln_bwd_kernel<T, W, VV, kElems / VV>, p.tx * p.ty,
                                                      p.smem);
      else
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, ln_bwd_kernel<T, W, 1, kScalarCache>, p.tx * p.ty, p.smem);
    });
    p.grid = std::min(p.grid, std::max(per_sm, 1) * num_sms(device));
  }
  return p;
}

cudaError_t ln_bwd(const LnArgs& a, const LnBwdPlan& p, const float* mean, const float* rstd, void* dx, float* part_w,
                   float* part_b, cudaStream_t stream) {
  dispatch_affine(a, [&](auto t, auto w) {
    bwd_typed<decltype(t), decltype(w)>(a, p, mean, rstd, dx, part_w, part_b, stream);
  });
  return cudaGetLastError();
}

}  // namespace leanclip
