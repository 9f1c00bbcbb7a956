// Column sums of an (M, N) matrix: bias gradients, and LayerNorm dgamma/dbeta for rows too wide for layer_norm.cu's
// register path.
//
// Deterministic two-pass reduction, no atomics: pass 1 gives every block a (32*VEC)-column slab and a chunk of rows;
// 8 row lanes per column each sum a strided subset of the rows in fp32, then a fixed-order sum of the 8 lanes
// writes partial[chunk, col]. Pass 2 (sum_partials) adds the chunks in order. With one chunk, pass 1 writes the
// result directly.
#include <algorithm>

#include "common.h"

namespace leanclip {
namespace {

constexpr int kCols = 32;  // threadIdx.x: column lanes (each VEC adjacent columns)
constexpr int kRows = 8;   // threadIdx.y: row lanes

// LN = false: db_part[p, c] = sum_r dy[r, c].
// LN = true : also dw_part[p, c] = sum_r dy[r, c] * (x[r, c] - mean[r]) * rstd[r].
template <typename T, int VEC, bool LN>
__global__ void __launch_bounds__(kCols* kRows)
    col_sum_kernel(const T* __restrict__ dy, int64_t sdy, const T* __restrict__ x, int64_t sx,
                   const float* __restrict__ mean, const float* __restrict__ rstd, float* __restrict__ db_part,
                   float* __restrict__ dw_part, int M, int N, int rows_per_chunk) {
  constexpr int W = kCols * VEC;  // columns per block
  constexpr int NA = LN ? 2 : 1;
  __shared__ float red[NA][kRows][W];
  const int c0 = blockIdx.x * W + threadIdx.x * VEC;
  const int r_begin = blockIdx.y * rows_per_chunk;
  const int r_end = min(M, r_begin + rows_per_chunk);
  float sb[VEC], sw[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) sb[v] = sw[v] = 0.f;
  if (c0 < N) {  // VEC > 1 only when N % VEC == 0, so the whole pack is in range
#pragma unroll 4
    for (int r = r_begin + threadIdx.y; r < r_end; r += kRows) {
      float g[VEC];
      load_f<T, VEC>(dy + r * sdy + c0, g);
#pragma unroll
      for (int v = 0; v < VEC; ++v) sb[v] += g[v];
      if constexpr (LN) {
        float xv[VEC];
        load_f<T, VEC>(x + r * sx + c0, xv);
        const float mu = mean[r], rs = rstd[r];
#pragma unroll
        for (int v = 0; v < VEC; ++v) sw[v] += g[v] * ((xv[v] - mu) * rs);
      }
    }
  }
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    red[0][threadIdx.y][threadIdx.x * VEC + v] = sb[v];
    if constexpr (LN) red[NA - 1][threadIdx.y][threadIdx.x * VEC + v] = sw[v];
  }
  __syncthreads();
  const int tid = threadIdx.y * kCols + threadIdx.x;
  for (int cl = tid; cl < W; cl += kCols * kRows) {
    const int c = blockIdx.x * W + cl;
    if (c >= N) break;
    float s = 0.f, t = 0.f;
#pragma unroll
    for (int y = 0; y < kRows; ++y) {
      s += red[0][y][cl];
      if constexpr (LN) t += red[NA - 1][y][cl];
    }
    db_part[int64_t(blockIdx.y) * N + c] = s;
    if constexpr (LN) dw_part[int64_t(blockIdx.y) * N + c] = t;
  }
}

// out[c] = sum_p part[p, c]: 8 row lanes each sum a strided subset in order, then lane 0 adds the 8 in order.
template <typename O>
__global__ void __launch_bounds__(kCols* kRows)
    sum_partials_kernel(const float* __restrict__ part, int P, int N, O* __restrict__ out) {
  __shared__ float red[kRows][kCols + 1];
  const int c = blockIdx.x * kCols + threadIdx.x;
  float s = 0.f;
  if (c < N) {
#pragma unroll 4
    for (int p = threadIdx.y; p < P; p += kRows) s += part[int64_t(p) * N + c];
  }
  red[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < N) {
    float t = 0.f;
#pragma unroll
    for (int y = 0; y < kRows; ++y) t += red[y][threadIdx.x];
    out[c] = from_f<O>(t);
  }
}

template <typename T, int VEC, bool LN>
void launch(const ColSumPlan& p, const void* dy, int64_t sdy, const void* x, int64_t sx, const float* mean,
            const float* rstd, int M, int N, float* db, float* dw, float* part_b, float* part_w, cudaStream_t stream) {
  const int width = kCols * VEC;
  const dim3 grid((N + width - 1) / width, p.chunks), block(kCols, kRows);
  const bool direct = p.chunks == 1;
  col_sum_kernel<T, VEC, LN><<<grid, block, 0, stream>>>(
      static_cast<const T*>(dy), sdy, static_cast<const T*>(x), sx, mean, rstd, direct ? db : part_b,
      direct ? dw : part_w, M, N, p.rows_per_chunk);
}

}  // namespace

ColSumPlan col_sum_plan(DType t, const void* dy, int64_t sdy, int M, int N, bool ln, int device) {
  const int elem = t == DType::F32 ? 4 : 2;
  const int V = 16 / elem;
  ColSumPlan p;
  p.vec = (!ln && N % V == 0 && sdy % V == 0 && aligned16(dy)) ? V : 1;
  const int width = kCols * p.vec;
  const int col_blocks = (N + width - 1) / width;
  const int target = 4 * num_sms(device);  // about one wave of 256-thread blocks
  int chunks = std::max(1, std::min((target + col_blocks - 1) / col_blocks, (M + 31) / 32));
  chunks = std::min(chunks, 65535);
  p.rows_per_chunk = (M + chunks - 1) / chunks;
  p.chunks = (M + p.rows_per_chunk - 1) / p.rows_per_chunk;
  return p;
}

cudaError_t col_sums(DType t, const ColSumPlan& p, const void* dy, int64_t sdy, const void* x, int64_t sx,
                     const float* mean, const float* rstd, int M, int N, float* db, float* dw, float* part_b,
                     float* part_w, cudaStream_t stream) {
  const bool ln = dw != nullptr;
  dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    if (ln)
      launch<T, 1, true>(p, dy, sdy, x, sx, mean, rstd, M, N, db, dw, part_b, part_w, stream);
    else if (p.vec == V)
      launch<T, V, false>(p, dy, sdy, x, sx, mean, rstd, M, N, db, dw, part_b, part_w, stream);
    else
      launch<T, 1, false>(p, dy, sdy, x, sx, mean, rstd, M, N, db, dw, part_b, part_w, stream);
  });
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.chunks == 1) return err;
  err = sum_partials(DType::F32, part_b, p.chunks, N, db, stream);
  if (err != cudaSuccess || !ln) return err;
  return sum_partials(DType::F32, part_w, p.chunks, N, dw, stream);
}

cudaError_t sum_partials(DType out_t, const float* part, int P, int N, void* out, cudaStream_t stream) {
  const dim3 grid((N + kCols - 1) / kCols), block(kCols, kRows);
  dispatch(out_t, [&](auto tag) {
    using O = decltype(tag);
    sum_partials_kernel<O><<<grid, block, 0, stream>>>(part, P, N, static_cast<O*>(out));
  });
  return cudaGetLastError();
}

}  // namespace leanclip
