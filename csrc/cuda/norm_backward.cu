// CUDA backward: normpass::norm_backward_cuda (contract in ../norm.h). The
// kernels of each input dtype and norm are in norm_backward_<dtype>[_<dtype>grad]_{ln,rms}.cu.
#include "../norm.h"
#include "launch.h"
#include "norm_backward_kernel.cuh" // kMaxGradTerms

namespace normpass {

using at::Tensor;
using std::optional;
using namespace normpass::cuda;

namespace {

// grad_out + extra_grad_outs[0] + ..., added up front in order in the wider of grad_out's dtype
// and x's (one rounding per add, as eager; norm.h), into one new tensor: for the terms the kernel
// does not sum as it loads them.
Tensor sum_grad_terms(const Tensor& grad_out, at::TensorList extra_grad_outs, at::ScalarType x_dtype) {
  if (extra_grad_outs.empty()) return grad_out;
  const auto wide = c10::promoteTypes(grad_out.scalar_type(), x_dtype);
  Tensor dy = grad_out.scalar_type() == wide ? grad_out.add(extra_grad_outs[0])
                                             : grad_out.to(wide).add_(extra_grad_outs[0]);
  for (const Tensor& g : extra_grad_outs.slice(1)) dy.add_(g);
  return dy;
}

} // namespace

void norm_backward_cuda(const Tensor& grad_out, at::TensorList extra_grad_outs, const Tensor& x,
                        const optional<Tensor>& raw_weight, const optional<Tensor>& grad_sum,
                        const NormParams& p, Tensor& grad_input, optional<Tensor>& grad_weight,
                        optional<Tensor>& grad_bias, const optional<Tensor>& stats) {
  // The kernels test statistics columns only for RMSNorm (pRMSNorm).
  TORCH_INTERNAL_ASSERT(!p.center || p.stat_cols == x.size(1), "LayerNorm takes every column");
  // The kernel always reads a weight (no per-element test); ones stand in for none.
  const Tensor weight = raw_weight ? *fold_offset(raw_weight, p.weight_offset)
                                   : at::ones({x.size(1)}, x.options());
  // The output's gradient terms: x's dtype, fp32 for 16-bit x, or 16-bit for fp32 x (an fp32
  // norm's output cast under autocast: the casts' gradients, read before they widen).
  const auto g_dtype = grad_out.scalar_type();
  TORCH_CHECK(g_dtype == x.scalar_type() || g_dtype == at::kFloat ||
                  is_16_bit_of_fp32(x.scalar_type(), g_dtype),
              "normpass CUDA: grad_out must have x's dtype, fp32, or be 16-bit for fp32 x, got ",
              g_dtype);
  for (const Tensor& g : extra_grad_outs)
    TORCH_CHECK(g.scalar_type() == g_dtype, "normpass CUDA: the gradient terms must share a dtype");
  TORCH_CHECK(!grad_sum || grad_sum->scalar_type() == x.scalar_type(),
              "normpass CUDA: grad_sum must have x's dtype");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat,
              "normpass CUDA: weight must be of x's dtype or fp32, got ", weight.scalar_type());
  for (const auto& g : {grad_weight, grad_bias}) {
    TORCH_CHECK(!g || g->scalar_type() == at::kFloat || g->scalar_type() == x.scalar_type(),
                "normpass CUDA: dweight/dbias must be fp32 or of x's dtype, got ", g->scalar_type());
  }
  TORCH_CHECK(!grad_weight || !grad_bias || grad_weight->scalar_type() == grad_bias->scalar_type(),
              "normpass CUDA: dweight and dbias must share a dtype");
  TORCH_CHECK(x.size(1) <= kMaxCols, "normpass CUDA: rows of ", std::to_string(x.size(1)),
              " elements (at most ", std::to_string(kMaxCols), ")");
  const c10::cuda::CUDAGuard guard(x.device());
  // The kernel sums up to kMaxGradTerms - 1 extra terms as it loads; more are added up front, and
  // so are fp32 terms of 16-bit x (in the kernel they spilled 2.5 KB of registers).
  const bool in_kernel = extra_grad_outs.size() < kMaxGradTerms &&
                         (g_dtype == x.scalar_type() || is_16_bit_of_fp32(x.scalar_type(), g_dtype));
  const Tensor dy = in_kernel ? grad_out : sum_grad_terms(grad_out, extra_grad_outs, x.scalar_type());
  const at::TensorList more = in_kernel ? extra_grad_outs : at::TensorList();
  const auto dy_dtype = dy.scalar_type();
  dispatch_float(x.scalar_type(), "input", [&](auto t_tag) {
    using T = typename decltype(t_tag)::type;
    dispatch_bool(p.center, [&](auto center) {
      constexpr bool C = decltype(center)::value;
      auto run = [&](auto g_tag) {
        using G = typename decltype(g_tag)::type;
        BackwardKernels<T, G, C>::run(dy, more, x, weight, grad_sum, p, grad_input, grad_weight,
                                      grad_bias, stats);
      };
      if (dy_dtype == x.scalar_type()) run(t_tag);
      else if constexpr (std::is_same_v<T, float>) dispatch_float(dy_dtype, "gradient", run);
      else run(Tag<float>{});
    });
  });
}

} // namespace normpass
