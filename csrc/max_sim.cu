// max_sim: vals[n] = max_m <x[n], d[m]>, idx[n] = argmax, for x (N, K), d (M, K); the N x M matrix never exists.
//
// A block owns a tile of x rows and walks a contiguous range of d tiles (its "split" of M): per d tile a GEMM tile
// x_tile @ d_tile^T accumulates in fp32 registers, then the epilogue folds it into a running (max, argmax) per row
// that lives in registers across tiles. Splits: when there are too few row tiles to fill the GPU, gridDim.y > 1
// blocks share a row tile, each writes (val, idx) partials [split, N], and a small kernel reduces them in split
// order. Order: NaN beats numbers, larger beats smaller, ties go to the lower index (so the result is deterministic
// and independent of the split count).
//
// bf16 / fp16: tensor cores through nvcuda::wmma (m16n16k16, fp32 accumulate), 128x128x32 block tile, 8 warps of
//   64x32, two shared-memory stages filled by cp.async (16-byte chunks, zero-filled at the edges) when rows are
//   16-byte aligned, plain loads otherwise. Epilogue: each warp stores one 16x16 accumulator fragment at a time to a
//   per-warp scratch (aliasing the stage buffers), two lanes per row scan 8 columns each, a shuffle joins them.
// fp32: CUDA-core FMA (exact fp32 products, no tf32), 64x64x16 block tile, 16x16 threads with 4x4 outputs each;
//   the 16 threads of a row group are half a warp, so the row max/argmax joins with 4 xor shuffles.
#include <mma.h>

#include <algorithm>
#include <climits>

#include "common.h"

namespace leanclip {
namespace {

// ---------------------------------------------------------------- 16-bit tensor-core path
constexpr int TBM = 128, TBN = 128, TBK = 32;
constexpr int TLD = TBK + 8;  // smem row stride in elements (80 bytes: keeps 32-byte fragment alignment)
constexpr int TWARPS_M = 2, TWARPS_N = 4, TTHREADS = 32 * TWARPS_M * TWARPS_N;
constexpr int TFM = TBM / TWARPS_M / 16;  // 4 fragments down a warp tile
constexpr int TFN = TBN / TWARPS_N / 16;  // 2 fragments across
constexpr int SLD = 20;                   // epilogue scratch row stride (floats)
constexpr int kStageElems = (TBM + TBN) * TLD;
static_assert(TTHREADS / 32 * 16 * SLD * 4 <= 2 * kStageElems * 2, "epilogue scratch must fit in the stage buffers");

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Rows [0, ROWS) x columns [k0, k0 + TBK) of g (row stride ld) into s ([ROWS][TLD]); zeros outside
// rows_valid x K. g points at the tile's first row, which always exists.
template <typename T, int ROWS>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t ld, int rows_valid, int k0, int K, bool vec) {
  if (vec) {  // K % 8 == 0 and 16-byte aligned rows: a chunk is all in or all out
    constexpr int CPR = TBK / 8;
#pragma unroll
    for (int c = threadIdx.x; c < ROWS * CPR; c += TTHREADS) {
      const int r = c / CPR, kc = (c % CPR) * 8;
      const bool ok = r < rows_valid && k0 + kc < K;
      cp_async16(s + r * TLD + kc, ok ? g + r * ld + k0 + kc : g, ok ? 16 : 0);
    }
  } else {
    for (int e = threadIdx.x; e < ROWS * TBK; e += TTHREADS) {
      const int r = e / TBK, kk = e % TBK;
      s[r * TLD + kk] = (r < rows_valid && k0 + kk < K) ? g[r * ld + k0 + kk] : from_f<T>(0.f);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(TTHREADS, 2)
    max_sim_wmma_kernel(const T* __restrict__ x, int64_t sx, const T* __restrict__ d, int64_t sd, int N, int M,
                        int K, int tiles_per_split, bool vec, float* __restrict__ out_v,
                        int64_t* __restrict__ out_i) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  __shared__ __align__(128) unsigned char smem_raw[2 * kStageElems * sizeof(T)];
  __shared__ float fin_v[TWARPS_N][TBM];
  __shared__ int fin_i[TWARPS_N][TBM];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wm = warp / TWARPS_N, wn = warp % TWARPS_N;
  const int row0 = blockIdx.x * TBM;
  const int rows_valid = min(TBM, N - row0);
  const T* xb = x + int64_t(row0) * sx;
  const int n_tiles = (M + TBN - 1) / TBN;
  const int t_begin = blockIdx.y * tiles_per_split;
  const int t_end = min(n_tiles, t_begin + tiles_per_split);
  const int nk = (K + TBK - 1) / TBK;
  const int er = lane >> 1, ec = (lane & 1) * 8;  // epilogue: row and first column of this lane in a fragment
  float* scratch = reinterpret_cast<float*>(smem_raw) + warp * 16 * SLD;

  float best_v[TFM];
  int best_i[TFM];
#pragma unroll
  for (int fi = 0; fi < TFM; ++fi) {
    best_v[fi] = -INFINITY;
    best_i[fi] = INT_MAX;
  }

  for (int t = t_begin; t < t_end; ++t) {
    const int col0 = t * TBN;
    const int cols_valid = min(TBN, M - col0);
    const T* dbase = d + int64_t(col0) * sd;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[TFM][TFN];
#pragma unroll
    for (int fi = 0; fi < TFM; ++fi)
#pragma unroll
      for (int fj = 0; fj < TFN; ++fj) wmma::fill_fragment(acc[fi][fj], 0.f);

    load_tile<T, TBM>(smem, xb, sx, rows_valid, 0, K, vec);
    load_tile<T, TBN>(smem + TBM * TLD, dbase, sd, cols_valid, 0, K, vec);
    cp_async_commit();
    for (int kt = 0; kt < nk; ++kt) {
      if (kt + 1 < nk) {  // prefetch the next k slab into the other stage
        T* nxt = smem + ((kt + 1) & 1) * kStageElems;
        load_tile<T, TBM>(nxt, xb, sx, rows_valid, (kt + 1) * TBK, K, vec);
        load_tile<T, TBN>(nxt + TBM * TLD, dbase, sd, cols_valid, (kt + 1) * TBK, K, vec);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const T* As = smem + (kt & 1) * kStageElems;
      const T* Bs = As + TBM * TLD;
#pragma unroll
      for (int kk = 0; kk < TBK; kk += 16) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf[TFN];
#pragma unroll
        for (int fj = 0; fj < TFN; ++fj)  // d tile stored [n][k] = B (k x n) in column-major order
          wmma::load_matrix_sync(bf[fj], Bs + (wn * (TBN / TWARPS_N) + fj * 16) * TLD + kk, TLD);
#pragma unroll
        for (int fi = 0; fi < TFM; ++fi) {  // one A fragment live at a time keeps registers under the 2-block cap
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af;
          wmma::load_matrix_sync(af, As + (wm * (TBM / TWARPS_M) + fi * 16) * TLD + kk, TLD);
#pragma unroll
          for (int fj = 0; fj < TFN; ++fj) wmma::mma_sync(acc[fi][fj], af, bf[fj], acc[fi][fj]);
        }
      }
      __syncthreads();  // everyone is done with this stage before it is refilled
    }

    // Epilogue: fold this tile's columns into the running (max, argmax) of every row.
#pragma unroll
    for (int fi = 0; fi < TFM; ++fi) {
#pragma unroll
      for (int fj = 0; fj < TFN; ++fj) {
        wmma::store_matrix_sync(scratch, acc[fi][fj], SLD, wmma::mem_row_major);
        __syncwarp();
        float v = -INFINITY;
        int vi = INT_MAX;
        const int cbase = col0 + wn * (TBN / TWARPS_N) + fj * 16 + ec;
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          const float s = scratch[er * SLD + ec + c];
          if (cbase + c < M && better(s, cbase + c, v, vi)) {
            v = s;
            vi = cbase + c;
          }
        }
        const float ov = __shfl_xor_sync(0xffffffffu, v, 1);
        const int oi = __shfl_xor_sync(0xffffffffu, vi, 1);
        if (better(ov, oi, v, vi)) {
          v = ov;
          vi = oi;
        }
        if (better(v, vi, best_v[fi], best_i[fi])) {
          best_v[fi] = v;
          best_i[fi] = vi;
        }
        __syncwarp();  // scratch is rewritten by the next fragment
      }
    }
    __syncthreads();  // scratch aliases the stage buffers the next tile loads into
  }

  // Join the TWARPS_N warps that share each row.
  if ((lane & 1) == 0) {
#pragma unroll
    for (int fi = 0; fi < TFM; ++fi) {
      const int r = wm * (TBM / TWARPS_M) + fi * 16 + er;
      fin_v[wn][r] = best_v[fi];
      fin_i[wn][r] = best_i[fi];
    }
  }
  __syncthreads();
  if (tid < rows_valid) {
    float v = fin_v[0][tid];
    int vi = fin_i[0][tid];
#pragma unroll
    for (int w = 1; w < TWARPS_N; ++w) {
      if (better(fin_v[w][tid], fin_i[w][tid], v, vi)) {
        v = fin_v[w][tid];
        vi = fin_i[w][tid];
      }
    }
    const int64_t o = int64_t(blockIdx.y) * N + row0 + tid;
    out_v[o] = v;
    out_i[o] = vi;
  }
#endif
}

// ---------------------------------------------------------------- fp32 FMA path
constexpr int FBM = 64, FBN = 64, FBK = 16, FTHREADS = 256;

__global__ void __launch_bounds__(FTHREADS)
    max_sim_f32_kernel(const float* __restrict__ x, int64_t sx, const float* __restrict__ d, int64_t sd, int N,
                       int M, int K, int tiles_per_split, float* __restrict__ out_v, int64_t* __restrict__ out_i) {
  __shared__ float As[FBK][FBM + 4];
  __shared__ float Bs[FBK][FBN + 4];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int row0 = blockIdx.x * FBM;
  const int rows_valid = min(FBM, N - row0);
  const int n_tiles = (M + FBN - 1) / FBN;
  const int t_begin = blockIdx.y * tiles_per_split;
  const int t_end = min(n_tiles, t_begin + tiles_per_split);
  float best_v[4];
  int best_i[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    best_v[i] = -INFINITY;
    best_i[i] = INT_MAX;
  }
  for (int t = t_begin; t < t_end; ++t) {
    const int col0 = t * FBN;
    const int cols_valid = min(FBN, M - col0);
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    for (int k0 = 0; k0 < K; k0 += FBK) {
#pragma unroll
      for (int l = 0; l < FBM * FBK / FTHREADS; ++l) {  // 16 consecutive k per row: coalesced 64-byte runs
        const int e = tid + l * FTHREADS, r = e >> 4, kk = e & 15;
        const bool kin = k0 + kk < K;
        As[kk][r] = (r < rows_valid && kin) ? x[int64_t(row0 + r) * sx + k0 + kk] : 0.f;
        Bs[kk][r] = (r < cols_valid && kin) ? d[int64_t(col0 + r) * sd + k0 + kk] : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < FBK; ++kk) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float v = -INFINITY;
      int vi = INT_MAX;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int col = col0 + tx + 16 * j;
        if (col < M && better(acc[i][j], col, v, vi)) {
          v = acc[i][j];
          vi = col;
        }
      }
#pragma unroll
      for (int o = 8; o > 0; o >>= 1) {  // stays inside the 16 lanes of this row group
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, vi, o);
        if (better(ov, oi, v, vi)) {
          v = ov;
          vi = oi;
        }
      }
      if (better(v, vi, best_v[i], best_i[i])) {
        best_v[i] = v;
        best_i[i] = vi;
      }
    }
  }
  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = ty + 16 * i;
      if (r < rows_valid) {
        const int64_t o = int64_t(blockIdx.y) * N + row0 + r;
        out_v[o] = best_v[i];
        out_i[o] = best_i[i];
      }
    }
  }
}

// ---------------------------------------------------------------- split reduction
__global__ void max_sim_reduce_kernel(const float* __restrict__ pv, const int64_t* __restrict__ pi, int S, int N,
                                      float* __restrict__ out_v, int64_t* __restrict__ out_i) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  float v = pv[n];
  int64_t vi = pi[n];
  for (int s = 1; s < S; ++s) {
    const float c = pv[int64_t(s) * N + n];
    const int64_t ci = pi[int64_t(s) * N + n];
    if (better(c, ci, v, vi)) {
      v = c;
      vi = ci;
    }
  }
  out_v[n] = v;
  out_i[n] = vi;
}

}  // namespace

MaxSimPlan max_sim_plan(DType t, int N, int M, int device) {
  const bool f32 = t == DType::F32;
  const int bm = f32 ? FBM : TBM, bn = f32 ? FBN : TBN;
  const int row_blocks = (N + bm - 1) / bm, n_tiles = (M + bn - 1) / bn;
  const int target = 2 * num_sms(device);  // blocks wanted in flight
  MaxSimPlan p;
  const int splits = std::max(1, std::min({n_tiles, (target + row_blocks - 1) / row_blocks, 65535}));
  p.tiles_per_split = (n_tiles + splits - 1) / splits;
  p.splits = (n_tiles + p.tiles_per_split - 1) / p.tiles_per_split;
  return p;
}

cudaError_t max_sim(DType t, const MaxSimPlan& p, const void* x, int64_t sx, const void* d, int64_t sd, int N, int M,
                    int K, float* vals, int64_t* idx, float* part_v, int64_t* part_i, cudaStream_t stream) {
  const bool direct = p.splits == 1;
  float* ov = direct ? vals : part_v;
  int64_t* oi = direct ? idx : part_i;
  if (t == DType::F32) {
    const dim3 grid((N + FBM - 1) / FBM, p.splits);
    max_sim_f32_kernel<<<grid, FTHREADS, 0, stream>>>(static_cast<const float*>(x), sx, static_cast<const float*>(d),
                                                      sd, N, M, K, p.tiles_per_split, ov, oi);
  } else {
    const dim3 grid((N + TBM - 1) / TBM, p.splits);
    const bool vec = K % 8 == 0 && sx % 8 == 0 && sd % 8 == 0 && aligned16(x) && aligned16(d);
    dispatch(t, [&](auto tag) {
      using T = decltype(tag);
      if constexpr (sizeof(T) == 2)
        max_sim_wmma_kernel<T><<<grid, TTHREADS, 0, stream>>>(static_cast<const T*>(x), sx, static_cast<const T*>(d),
                                                              sd, N, M, K, p.tiles_per_split, vec, ov, oi);
    });
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || direct) return err;
  max_sim_reduce_kernel<<<(N + 255) / 256, 256, 0, stream>>>(part_v, part_i, p.splits, N, vals, idx);
  return cudaGetLastError();
}

}  // namespace leanclip
