// ATen-level entry points of the leanclip CUDA extension (module kernels._C, ops torch.ops.leanclip_cuda.*),
// implemented in ops.cpp. Signatures follow docs/CONVENTIONS.md. Every entry checks its inputs (CUDA device first)
// with TORCH_CHECK, so CPU tensors raise a RuntimeError before anything is launched.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace leanclip {

// y = (x - mean) * rstd * weight + bias over the last dim of x2d (M, N). Returns (y in x's dtype, mean f32[M], rstd f32[M]).
// weight / bias: optional, shape (N), x's dtype or float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x2d,
                                                              const std::optional<at::Tensor>& weight,
                                                              const std::optional<at::Tensor>& bias, double eps);

// Returns (dx, dw, db). dx: x's dtype, (M, N). dw, db: weight's dtype when weight is given, else float32, (N).
// An output that is not requested comes back as an empty tensor (numel 0).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& dy2d, const at::Tensor& x2d,
                                                              const std::optional<at::Tensor>& weight,
                                                              const at::Tensor& mean, const at::Tensor& rstd,
                                                              bool need_dx, bool need_dw, bool need_db);

// float32 column sums of dy2d (M, N), deterministic (per-block partials, then a fixed-order reduction).
at::Tensor bias_grad(const at::Tensor& dy2d);

// For y = x @ weight.T + b with weight (out, in) frozen: dx = dy2d @ weight (cuBLAS), db = bias_grad(dy2d) (float32)
// or an empty tensor when need_db is false.
std::tuple<at::Tensor, at::Tensor> frozen_linear_bwd(const at::Tensor& dy2d, const at::Tensor& weight, bool need_db);

// vals[n] = max_m <x[n], d[m]> (float32), idx[n] = its argmax (int64, lowest index on ties, NaN wins).
std::tuple<at::Tensor, at::Tensor> max_sim_fwd(const at::Tensor& x, const at::Tensor& d);

}  // namespace leanclip
