// ATen side of the extension: input checks, output / workspace allocation, stream and device, then the raw
// launchers of the .cu files. Checks run before anything touches the CUDA runtime, device first.
#include "ops.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "launchers.h"

namespace leanclip {
namespace {

using at::Tensor;

void check_cuda(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), op, ": the cuda backend needs CUDA tensors; ", name, " is on ", t.device());
}

void check_float(const Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
              " must be float32, bfloat16 or float16, got ", st);
}

// 2-D with a unit-stride last dim (any row stride), sizes that fit the kernels' int indices.
void check_rows(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name,
              " must have a contiguous last dim (stride 1), got strides ", t.strides());
  TORCH_CHECK(t.size(0) < (int64_t(1) << 31) && t.size(1) < (int64_t(1) << 31), op, ": ", name,
              " is too large: ", t.sizes());
}

void check_vec(const Tensor& t, int64_t n, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape (", n, "), got ", t.sizes());
}

void check_same_device(const Tensor& t, const Tensor& ref, const char* op, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
}

DType dtype_of(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK(false, "leanclip_cuda: unsupported dtype ", st);
  }
  return DType::F32;  // unreachable
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::TensorOptions f32_like(const Tensor& t) { return t.options().dtype(at::kFloat); }

// weight / bias for LayerNorm: shape (N), x's dtype or float32; converted to one common dtype (float32 if either
// is float32 while x is 16-bit) and made contiguous.
struct Affine {
  Tensor w, b;
  bool f32 = false;
};

Affine prepare_affine(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                      const char* op) {
  Affine a;
  const int64_t N = x.size(1);
  auto take = [&](const std::optional<Tensor>& p, const char* name) -> Tensor {
    if (!p.has_value() || !p->defined()) return Tensor();
    check_cuda(*p, op, name);
    check_same_device(*p, x, op, name, "x2d");
    check_float(*p, op, name);
    check_vec(*p, N, op, name);
    TORCH_CHECK(p->scalar_type() == x.scalar_type() || p->scalar_type() == at::kFloat, op, ": ", name,
                " must have x2d's dtype (", x.scalar_type(), ") or float32, got ", p->scalar_type());
    return p->contiguous();
  };
  a.w = take(weight, "weight");
  a.b = take(bias, "bias");
  a.f32 = x.scalar_type() != at::kFloat && ((a.w.defined() && a.w.scalar_type() == at::kFloat) ||
                                            (a.b.defined() && a.b.scalar_type() == at::kFloat));
  if (a.f32) {
    if (a.w.defined()) a.w = a.w.to(at::kFloat);
    if (a.b.defined()) a.b = a.b.to(at::kFloat);
  }
  return a;
}

const void* opt_ptr(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

}  // namespace

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& x, const std::optional<Tensor>& weight,
                                                  const std::optional<Tensor>& bias, double eps) {
  const char* op = "leanclip_cuda.layer_norm_fwd";
  check_cuda(x, op, "x2d");
  check_float(x, op, "x2d");
  check_rows(x, op, "x2d");
  TORCH_CHECK(x.size(1) > 0, op, ": x2d must have at least one column, got shape ", x.sizes());
  TORCH_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
  const Affine af = prepare_affine(x, weight, bias, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), N = x.size(1);
  Tensor y = at::empty({M, N}, x.options());
  Tensor mean = at::empty({M}, f32_like(x));
  Tensor rstd = at::empty({M}, f32_like(x));
  if (M == 0) return {y, mean, rstd};
  LnArgs a{dtype_of(x.scalar_type()), af.f32, x.data_ptr(), x.stride(0), nullptr, 0, opt_ptr(af.w), opt_ptr(af.b),
           int(M), int(N)};
  C10_CUDA_CHECK(ln_fwd(a, float(eps), y.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(), stream()));
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& dy, const Tensor& x, const std::optional<Tensor>& weight,
                                                  const Tensor& mean, const Tensor& rstd, bool need_dx, bool need_dw,
                                                  bool need_db) {
  const char* op = "leanclip_cuda.layer_norm_bwd";
  check_cuda(dy, op, "dy2d");
  check_cuda(x, op, "x2d");
  check_cuda(mean, op, "mean");
  check_cuda(rstd, op, "rstd");
  check_same_device(x, dy, op, "x2d", "dy2d");
  check_same_device(mean, dy, op, "mean", "dy2d");
  check_same_device(rstd, dy, op, "rstd", "dy2d");
  check_float(dy, op, "dy2d");
  check_rows(dy, op, "dy2d");
  check_rows(x, op, "x2d");
  TORCH_CHECK(dy.sizes() == x.sizes(), op, ": dy2d has shape ", dy.sizes(), " but x2d has shape ", x.sizes());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), op, ": dy2d has dtype ", dy.scalar_type(), " but x2d has dtype ",
              x.scalar_type());
  TORCH_CHECK(x.size(1) > 0, op, ": x2d must have at least one column, got shape ", x.sizes());
  const int64_t M = x.size(0), N = x.size(1);
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat, op,
              ": mean and rstd must be float32, got ", mean.scalar_type(), " and ", rstd.scalar_type());
  check_vec(mean, M, op, "mean");
  check_vec(rstd, M, op, "rstd");
  const bool has_w = weight.has_value() && weight->defined();
  TORCH_CHECK(!need_dw || has_w, op, ": need_dw=True needs weight");
  const Affine af = prepare_affine(x, weight, std::nullopt, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  const auto pdt = has_w ? weight->scalar_type() : at::kFloat;  // dw / db dtype
  Tensor dx = need_dx ? at::empty({M, N}, x.options()) : at::empty({0}, x.options());
  Tensor dw = at::empty({need_dw ? N : 0}, x.options().dtype(pdt));
  Tensor db = at::empty({need_db ? N : 0}, x.options().dtype(pdt));
  if (M == 0) {
    dw.zero_();
    db.zero_();
    return {dx, dw, db};
  }
  if (!need_dx && !need_dw && !need_db) return {dx, dw, db};

  const LnArgs a{dtype_of(x.scalar_type()), af.f32, x.data_ptr(), x.stride(0), dy.data_ptr(), dy.stride(0),
                 opt_ptr(af.w), nullptr, int(M), int(N)};
  const DType out_t = dtype_of(pdt);
  const bool partials = need_dw || need_db;
  const LnBwdPlan plan = ln_bwd_plan(a, partials, x.get_device());
  Tensor pw, pb;  // float32 partial sums
  if (partials && plan.fused) {
    if (need_dw) pw = at::empty({plan.grid, N}, f32_like(x));
    if (need_db) pb = at::empty({plan.grid, N}, f32_like(x));
  }
  if (need_dx || (partials && plan.fused)) {
    C10_CUDA_CHECK(ln_bwd(a, plan, mean_c.data_ptr<float>(), rstd_c.data_ptr<float>(),
                          need_dx ? dx.data_ptr() : nullptr, pw.defined() ? pw.data_ptr<float>() : nullptr,
                          pb.defined() ? pb.data_ptr<float>() : nullptr, stream()));
  }
  if (partials && plan.fused) {
    if (need_dw) C10_CUDA_CHECK(sum_partials(out_t, pw.data_ptr<float>(), plan.grid, int(N), dw.data_ptr(), stream()));
    if (need_db) C10_CUDA_CHECK(sum_partials(out_t, pb.data_ptr<float>(), plan.grid, int(N), db.data_ptr(), stream()));
  } else if (partials) {  // rows too wide for register accumulation: column sums re-read x and dy
    const ColSumPlan cp = col_sum_plan(a.t, dy.data_ptr(), dy.stride(0), int(M), int(N), /*ln=*/true, x.get_device());
    Tensor sums = at::empty({2, N}, f32_like(x));  // [db, dw] in float32
    Tensor part = cp.chunks > 1 ? at::empty({2, cp.chunks, N}, f32_like(x)) : Tensor();
    float* ps = sums.data_ptr<float>();
    float* pp = part.defined() ? part.data_ptr<float>() : nullptr;
    C10_CUDA_CHECK(col_sums(a.t, cp, dy.data_ptr(), dy.stride(0), x.data_ptr(), x.stride(0), mean_c.data_ptr<float>(),
                            rstd_c.data_ptr<float>(), int(M), int(N), ps, ps + N, pp,
                            pp ? pp + int64_t(cp.chunks) * N : nullptr, stream()));
    if (need_db) db.copy_(sums[0]);
    if (need_dw) dw.copy_(sums[1]);
  }
  return {dx, dw, db};
}

Tensor bias_grad(const Tensor& dy) {
  const char* op = "leanclip_cuda.bias_grad";
  check_cuda(dy, op, "dy2d");
  check_float(dy, op, "dy2d");
  check_rows(dy, op, "dy2d");
  const c10::cuda::CUDAGuard guard(dy.device());
  const int64_t M = dy.size(0), N = dy.size(1);
  Tensor db = at::empty({N}, f32_like(dy));
  if (N == 0) return db;
  if (M == 0) return db.zero_();
  const DType t = dtype_of(dy.scalar_type());
  const ColSumPlan cp = col_sum_plan(t, dy.data_ptr(), dy.stride(0), int(M), int(N), /*ln=*/false, dy.get_device());
  Tensor part = cp.chunks > 1 ? at::empty({cp.chunks, N}, f32_like(dy)) : Tensor();
  C10_CUDA_CHECK(col_sums(t, cp, dy.data_ptr(), dy.stride(0), nullptr, 0, nullptr, nullptr, int(M), int(N),
                          db.data_ptr<float>(), nullptr, part.defined() ? part.data_ptr<float>() : nullptr, nullptr,
                          stream()));
  return db;
}

std::tuple<Tensor, Tensor> frozen_linear_bwd(const Tensor& dy, const Tensor& weight, bool need_db) {
  const char* op = "leanclip_cuda.frozen_linear_bwd";
  check_cuda(dy, op, "dy2d");
  check_cuda(weight, op, "weight");
  check_same_device(weight, dy, op, "weight", "dy2d");
  check_float(dy, op, "dy2d");
  check_rows(dy, op, "dy2d");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (out_features, in_features), got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == dy.scalar_type(), op, ": weight has dtype ", weight.scalar_type(),
              " but dy2d has dtype ", dy.scalar_type());
  TORCH_CHECK(weight.size(0) == dy.size(1), op, ": dy2d has ", dy.size(1), " columns but weight has ",
              weight.size(0), " rows (out_features)");
  const c10::cuda::CUDAGuard guard(dy.device());
  Tensor dx = at::mm(dy, weight);  // (M, out) @ (out, in) on cuBLAS, fp32 accumulation
  Tensor db = need_db ? bias_grad(dy) : at::empty({0}, f32_like(dy));
  return {dx, db};
}

std::tuple<Tensor, Tensor> max_sim_fwd(const Tensor& x, const Tensor& d) {
  const char* op = "leanclip_cuda.max_sim_fwd";
  check_cuda(x, op, "x");
  check_cuda(d, op, "d");
  check_same_device(d, x, op, "d", "x");
  check_float(x, op, "x");
  check_rows(x, op, "x");
  check_rows(d, op, "d");
  TORCH_CHECK(d.scalar_type() == x.scalar_type(), op, ": d has dtype ", d.scalar_type(), " but x has dtype ",
              x.scalar_type());
  TORCH_CHECK(d.size(1) == x.size(1), op, ": x has K=", x.size(1), " columns but d has ", d.size(1));
  TORCH_CHECK(d.size(0) > 0, op, ": d must have at least one row");
  const c10::cuda::CUDAGuard guard(x.device());
  const int N = int(x.size(0)), M = int(d.size(0)), K = int(x.size(1));
  Tensor vals = at::empty({N}, f32_like(x));
  Tensor idx = at::empty({N}, x.options().dtype(at::kLong));
  if (N == 0) return {vals, idx};
  if (K == 0) {  // every score is 0: the max is 0, first at index 0
    vals.zero_();
    idx.zero_();
    return {vals, idx};
  }
  const DType t = dtype_of(x.scalar_type());
  if (t != DType::F32) {
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device()));
    TORCH_CHECK(major >= 8, op, ": float16/bfloat16 inputs need compute capability >= 8.0 (tensor-core path), got ",
                major, ".x");
  }
  const MaxSimPlan plan = max_sim_plan(t, N, M, x.get_device());
  Tensor pv, pi;
  if (plan.splits > 1) {
    pv = at::empty({plan.splits, N}, vals.options());
    pi = at::empty({plan.splits, N}, idx.options());
  }
  C10_CUDA_CHECK(max_sim(t, plan, x.data_ptr(), x.stride(0), d.data_ptr(), d.stride(0), N, M, K,
                         vals.data_ptr<float>(), idx.data_ptr<int64_t>(), pv.defined() ? pv.data_ptr<float>() : nullptr,
                         pi.defined() ? pi.data_ptr<int64_t>() : nullptr, stream()));
  return {vals, idx};
}

}  // namespace leanclip
