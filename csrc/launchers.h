// Raw-pointer launchers implemented in the .cu files and called by ops.cpp (which owns checks and allocation).
// Plain C++ types only, so that this header is cheap for both nvcc and the host compiler.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace leanclip {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// ------------------------------------------------------------------ layer_norm (layer_norm.cu)
struct LnArgs {
  DType t;          // x, dy, y, dx
  bool affine_f32;  // weight / bias are float32 (else t); both have the same dtype here
  const void* x;
  int64_t sx;
  const void* dy;  // backward only
  int64_t sdy;
  const void* w;  // may be null
  const void* b;  // forward only, may be null
  int M, N;
};

cudaError_t ln_fwd(const LnArgs& a, float eps, void* y, float* mean, float* rstd, cudaStream_t stream);

struct LnBwdPlan {
  bool vec;      // 16-byte packs
  bool fused;    // dw/db accumulated in registers by the dx kernel (else: column_sums after it)
  int tx, ty;    // block shape
  int grid;      // blocks; rows of the partial buffers when fused
  size_t smem;   // dynamic shared memory of the fused kernel
};
// need_partials: dw or db requested. Fused partial buffers are [grid, N] float32 each.
LnBwdPlan ln_bwd_plan(const LnArgs& a, bool need_partials, int device);
// dx may be null; part_w / part_b (fused plan only) may be null; mean / rstd float32 (M).
cudaError_t ln_bwd(const LnArgs& a, const LnBwdPlan& p, const float* mean, const float* rstd, void* dx, float* part_w,
                   float* part_b, cudaStream_t stream);

// ------------------------------------------------------------------ column sums (bias_grad.cu)
struct ColSumPlan {
  int vec;             // elements per thread access (1 or 16 bytes' worth)
  int chunks;          // row chunks; > 1 -> partial buffers [chunks, N] then sum_partials
  int rows_per_chunk;
};
// ln: also dw = sum_r dy * (x - mean[r]) * rstd[r] (scalar loads).
ColSumPlan col_sum_plan(DType t, const void* dy, int64_t sdy, int M, int N, bool ln, int device);
// db (and dw when ln) are float32 (N); with chunks > 1 the kernel writes part_b / part_w ([chunks, N]) and
// sum_partials reduces them into db / dw; with one chunk it writes db / dw directly.
cudaError_t col_sums(DType t, const ColSumPlan& p, const void* dy, int64_t sdy, const void* x, int64_t sx,
                     const float* mean, const float* rstd, int M, int N, float* db, float* dw, float* part_b,
                     float* part_w, cudaStream_t stream);
// out[c] = sum_p part[p, c] (fixed order), out of dtype out_t.
cudaError_t sum_partials(DType out_t, const float* part, int P, int N, void* out, cudaStream_t stream);

// ------------------------------------------------------------------ max_sim (max_sim.cu)
struct MaxSimPlan {
  int splits;           // > 1 -> partials [splits, N] (float32 vals, int64 idx) then a reduction
  int tiles_per_split;  // d tiles per split
};
MaxSimPlan max_sim_plan(DType t, int N, int M, int device);
cudaError_t max_sim(DType t, const MaxSimPlan& p, const void* x, int64_t sx, const void* d, int64_t sd, int N, int M,
                    int K, float* vals, int64_t* idx, float* part_v, int64_t* part_i, cudaStream_t stream);

}  // namespace leanclip
