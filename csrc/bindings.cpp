// Python bindings: module leanclip.kernels._C (pybind11) and the torch.ops.leanclip_cuda.* operators.
// The ops get CUDA kernels, Meta kernels (shapes only, for torch.compile / fake tensors) and CPU kernels that raise
// the same "needs CUDA tensors" error as the direct calls.
// Deliberately not <torch/extension.h>: it pulls in the whole C++ frontend (torch/all.h) and triples the build time.
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>  // pybind11 with the at::Tensor / std::optional casters
#include <torch/library.h>

#include "ops.h"

namespace leanclip {
namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd_meta(const Tensor& x, const OptT&, const OptT&, double) {
  TORCH_CHECK(x.dim() == 2, "leanclip_cuda.layer_norm_fwd: x2d must be 2-D");
  const auto f32 = x.options().dtype(at::kFloat);
  return {at::empty({x.size(0), x.size(1)}, x.options()), at::empty({x.size(0)}, f32), at::empty({x.size(0)}, f32)};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_meta(const Tensor& dy, const Tensor& x, const OptT& w,
                                                       const Tensor&, const Tensor&, bool need_dx, bool need_dw,
                                                       bool need_db) {
  TORCH_CHECK(x.dim() == 2, "leanclip_cuda.layer_norm_bwd: x2d must be 2-D");
  const int64_t M = x.size(0), N = x.size(1);
  const auto pdt = (w.has_value() && w->defined()) ? w->scalar_type() : at::kFloat;
  return {need_dx ? at::empty({M, N}, x.options()) : at::empty({0}, x.options()),
          at::empty({need_dw ? N : 0}, x.options().dtype(pdt)), at::empty({need_db ? N : 0}, x.options().dtype(pdt))};
}

Tensor bias_grad_meta(const Tensor& dy) {
  TORCH_CHECK(dy.dim() == 2, "leanclip_cuda.bias_grad: dy2d must be 2-D");
  return at::empty({dy.size(1)}, dy.options().dtype(at::kFloat));
}

std::tuple<Tensor, Tensor> frozen_linear_bwd_meta(const Tensor& dy, const Tensor& w, bool need_db) {
  TORCH_CHECK(dy.dim() == 2 && w.dim() == 2, "leanclip_cuda.frozen_linear_bwd: dy2d and weight must be 2-D");
  return {at::empty({dy.size(0), w.size(1)}, dy.options()),
          at::empty({need_db ? dy.size(1) : 0}, dy.options().dtype(at::kFloat))};
}

std::tuple<Tensor, Tensor> max_sim_fwd_meta(const Tensor& x, const Tensor&) {
  TORCH_CHECK(x.dim() == 2, "leanclip_cuda.max_sim_fwd: x must be 2-D");
  return {at::empty({x.size(0)}, x.options().dtype(at::kFloat)), at::empty({x.size(0)}, x.options().dtype(at::kLong))};
}

}  // namespace
}  // namespace leanclip

TORCH_LIBRARY(leanclip_cuda, m) {
  m.def("layer_norm_fwd(Tensor x2d, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_bwd(Tensor dy2d, Tensor x2d, Tensor? weight, Tensor mean, Tensor rstd, bool need_dx, bool need_dw, "
      "bool need_db) -> (Tensor, Tensor, Tensor)");
  m.def("bias_grad(Tensor dy2d) -> Tensor");
  m.def("frozen_linear_bwd(Tensor dy2d, Tensor weight, bool need_db) -> (Tensor, Tensor)");
  m.def("max_sim_fwd(Tensor x, Tensor d) -> (Tensor, Tensor)");
}

#define LEANCLIP_IMPL_ALL(m)                                     \
  m.impl("layer_norm_fwd", TORCH_FN(leanclip::layer_norm_fwd));   \
  m.impl("layer_norm_bwd", TORCH_FN(leanclip::layer_norm_bwd));   \
  m.impl("bias_grad", TORCH_FN(leanclip::bias_grad));             \
  m.impl("frozen_linear_bwd", TORCH_FN(leanclip::frozen_linear_bwd)); \
  m.impl("max_sim_fwd", TORCH_FN(leanclip::max_sim_fwd))

TORCH_LIBRARY_IMPL(leanclip_cuda, CUDA, m) { LEANCLIP_IMPL_ALL(m); }
// CPU tensors reach the same entry points, whose first check raises "the cuda backend needs CUDA tensors".
TORCH_LIBRARY_IMPL(leanclip_cuda, CPU, m) { LEANCLIP_IMPL_ALL(m); }

TORCH_LIBRARY_IMPL(leanclip_cuda, Meta, m) {
  m.impl("layer_norm_fwd", TORCH_FN(leanclip::layer_norm_fwd_meta));
  m.impl("layer_norm_bwd", TORCH_FN(leanclip::layer_norm_bwd_meta));
  m.impl("bias_grad", TORCH_FN(leanclip::bias_grad_meta));
  m.impl("frozen_linear_bwd", TORCH_FN(leanclip::frozen_linear_bwd_meta));
  m.impl("max_sim_fwd", TORCH_FN(leanclip::max_sim_fwd_meta));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "leanclip CUDA kernels (also registered as torch.ops.leanclip_cuda.*)";
  m.def("layer_norm_fwd", &leanclip::layer_norm_fwd, "LayerNorm forward -> (y, mean_f32, rstd_f32)", py::arg("x2d"),
        py::arg("weight") = py::none(), py::arg("bias") = py::none(), py::arg("eps") = 1e-5);
  m.def("layer_norm_bwd", &leanclip::layer_norm_bwd, "LayerNorm backward -> (dx, dw, db); empty when not requested",
        py::arg("dy2d"), py::arg("x2d"), py::arg("weight"), py::arg("mean"), py::arg("rstd"),
        py::arg("need_dx") = true, py::arg("need_dw") = true, py::arg("need_db") = true);
  m.def("bias_grad", &leanclip::bias_grad, "float32 column sums of dy2d (deterministic)", py::arg("dy2d"));
  m.def("frozen_linear_bwd", &leanclip::frozen_linear_bwd, "(dx = dy2d @ weight, db float32 or empty)",
        py::arg("dy2d"), py::arg("weight"), py::arg("need_db") = true);
  m.def("max_sim_fwd", &leanclip::max_sim_fwd, "(vals_f32[N], idx_i64[N]) = row max/argmax of x @ d.T", py::arg("x"),
        py::arg("d"));
}
