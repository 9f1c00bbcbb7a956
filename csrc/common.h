// Device helpers shared by the leanclip kernels. No ATen here: the .cu files include only CUDA headers, which keeps
// nvcc fast (torch headers are parsed once, by the host-side ops.cpp / bindings.cpp).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"

namespace leanclip {

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

inline int num_sms(int device) {
  int v = 0;
  cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device);
  return v > 0 ? v : 1;
}

// Calls f with a value of the element type for dt (float, __half or __nv_bfloat16).
template <typename F>
inline void dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: f(float{}); break;
    case DType::F16: f(__half{}); break;
    case DType::BF16: f(__nv_bfloat16{}); break;
  }
}

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// VEC elements of T moved as one (or two) 16-byte accesses; VEC == 1 is a plain scalar access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC < 16 ? sizeof(T) * VEC : 16) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_f(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_f(pk.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_f(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pk.v[i] = from_f<T>(in[i]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// Butterfly all-reduce: float addition is commutative, so every lane ends with the bitwise same sum.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sums over the blockDim.x threads of one row group (one threadIdx.y). Every thread of the block must call it
// (it may __syncthreads). red: shared scratch of >= 2 * blockDim.x * blockDim.y / 32 floats.
__device__ __forceinline__ float2 row_sum2(float a, float b, float* red) {
  a = warp_sum(a);
  b = warp_sum(b);
  const int nw = blockDim.x >> 5;
  if (nw == 1) return make_float2(a, b);
  const int base = 2 * threadIdx.y * nw, w = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) {
    red[base + w] = a;
    red[base + nw + w] = b;
  }
  __syncthreads();
  float sa = 0.f, sb = 0.f;
  for (int i = 0; i < nw; ++i) {  // same order in every thread: deterministic and identical across the row
    sa += red[base + i];
    sb += red[base + nw + i];
  }
  __syncthreads();
  return make_float2(sa, sb);
}

// (value, index) order for max/argmax: NaN beats numbers, larger beats smaller, ties go to the lower index.
__device__ __forceinline__ bool better(float v, int64_t i, float cv, int64_t ci) {
  const bool vn = v != v, cn = cv != cv;
  if (vn || cn) return vn && (!cn || i < ci);
  return v > cv || (v == cv && i < ci);
}

}  // namespace leanclip
