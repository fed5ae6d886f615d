// CUDA forward: normpass::norm_forward_cuda (contract in ../norm.h). The
// kernels of each input dtype and norm are in norm_forward_<dtype>_{ln,rms}.cu.
#include "../norm.h"
#include "launch.h"

namespace normpass {

using at::Tensor;
using std::optional;
using namespace normpass::cuda;

void norm_forward_cuda(const Tensor& x, const optional<Tensor>& residual,
                       const optional<Tensor>& raw_weight, const optional<Tensor>& raw_bias,
                       const NormParams& p, Tensor& out, optional<Tensor>& sum,
                       optional<Tensor>& stats) {
  // The kernels test statistics columns only for RMSNorm (pRMSNorm).
  TORCH_INTERNAL_ASSERT(!p.center || p.stat_cols == x.size(1), "LayerNorm takes every column");
  const optional<Tensor> weight = fold_offset(raw_weight, p.weight_offset);
  const optional<Tensor> bias = weight && raw_bias && raw_bias->scalar_type() != weight->scalar_type()
                                    ? optional<Tensor>(raw_bias->to(weight->scalar_type()))
                                    : raw_bias;
  TORCH_CHECK(!(weight && bias) || weight->scalar_type() == bias->scalar_type(),
              "normpass: weight and bias must share a dtype, got ", weight->scalar_type(),
              " and ", bias->scalar_type());
  TORCH_CHECK(x.size(1) <= kMaxCols, "normpass CUDA: rows of ", std::to_string(x.size(1)),
              " elements (at most ", std::to_string(kMaxCols), ")");
  const c10::cuda::CUDAGuard guard(x.device());
  // The kernels write x's dtype, fp32, and 16 bits of fp32 x (ForwardKernels); any other output
  // dtype is computed in fp32 and cast once.
  const auto o = out.scalar_type();
  if (o != x.scalar_type() && o != at::kFloat && !is_16_bit_of_fp32(x.scalar_type(), o)) {
    Tensor tmp = at::empty(out.sizes(), out.options().dtype(at::kFloat));
    norm_forward_cuda(x, residual, raw_weight, raw_bias, p, tmp, sum, stats);
    out.copy_(tmp);
    return;
  }
  const auto param = weight ? weight : bias;
  TORCH_CHECK(!param || param->scalar_type() == x.scalar_type() ||
                  param->scalar_type() == at::kFloat,
              "normpass CUDA: parameters must be of x's dtype or fp32, got ", param->scalar_type());
  dispatch_float(x.scalar_type(), "input", [&](auto t_tag) {
    using T = typename decltype(t_tag)::type;
    dispatch_bool(p.center, [&](auto center) {
      ForwardKernels<T, decltype(center)::value>::run(x, residual, weight, bias, p, out, sum, stats);
    });
  });
}

} // namespace normpass
