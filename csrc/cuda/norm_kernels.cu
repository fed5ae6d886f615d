// CUDA forward: normpass::norm_forward_cuda (contract in ../norm.h).
#include "../norm.h"
#include "launch.h"

namespace normpass {
namespace {

using at::Tensor;
using std::optional;
using namespace normpass::cuda;

template <typename T, typename W, typename O, int VEC, bool CENTER, bool RESIDUAL>
void forward_launch(const Tensor& x, const optional<Tensor>& residual,
                    const optional<Tensor>& weight, const optional<Tensor>& bias,
                    const NormParams& p, Tensor& out, optional<Tensor>& sum,
                    optional<Tensor>& stats) {
  auto kernel = norm_fwd_kernel<T, W, O, VEC, CENTER, RESIDUAL>;
  const auto shape = choose_layout(x.size(0), x.size(1), p.stat_cols, VEC, fwd_items<VEC>(),
                                   max_cluster(kernel, kFwdMaxThreads), kFwdMinThreads,
                                   kFwdMaxThreads, kFwdClusterTiles);
  FwdArgs<T, W, O> a{};
  a.x = ptr<T>(x);
  a.residual = ptr<T>(residual);
  a.weight = ptr<W>(weight);
  a.bias = ptr<W>(bias);
  a.out = mut_ptr<O>(out);
  a.sum = RESIDUAL ? mut_ptr<T>(*sum) : nullptr;
  a.stats = stats ? mut_ptr<float2>(*stats) : nullptr;
  a.x_stride = x.stride(0);
  a.r_stride = residual ? residual->stride(0) : 0;
  a.eps = static_cast<float>(p.eps);
  a.layout = shape.layout;
  // One row block per CTA (cluster); the kernel loops if the grid is capped.
  const int64_t C = shape.layout.cluster;
  const int64_t ctas = std::min<int64_t>(shape.layout.row_blocks, (INT32_MAX / C)) * C;
  launch(kernel, ctas, shape.threads, 0, C, a);
}

template <typename T, typename W, typename O>
void forward_typed(const Tensor& x, const optional<Tensor>& residual,
                   const optional<Tensor>& weight, const optional<Tensor>& bias,
                   const NormParams& p, Tensor& out, optional<Tensor>& sum,
                   optional<Tensor>& stats) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = vector_ok(x, kVec) && vector_ok(residual, kVec) && vector_ok(out, kVec) &&
                   vector_ok(sum, kVec) && vector_ok(weight, kVec) && vector_ok(bias, kVec);
  dispatch_flags<kVec>(vec, p.center, residual.has_value(), [&](auto v, auto center, auto res) {
    forward_launch<T, W, O, decltype(v)::value, decltype(center)::value, decltype(res)::value>(
        x, residual, weight, bias, p, out, sum, stats);
  });
}

} // namespace

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
  // Output dtypes other than x's or fp32 are computed in fp32 and cast once.
  if (out.scalar_type() != x.scalar_type() && out.scalar_type() != at::kFloat) {
    Tensor tmp = at::empty(out.sizes(), out.options().dtype(at::kFloat));
    norm_forward_cuda(x, residual, raw_weight, raw_bias, p, tmp, sum, stats);
    out.copy_(tmp);
    return;
  }
  const auto param = weight ? weight : bias;
  const bool fp32_params = param && param->scalar_type() != x.scalar_type();
  TORCH_CHECK(!param || param->scalar_type() == x.scalar_type() ||
                  param->scalar_type() == at::kFloat,
              "normpass CUDA: parameters must be of x's dtype or fp32, got ", param->scalar_type());
  const bool fp32_out = out.scalar_type() != x.scalar_type();
  dispatch_float(x.scalar_type(), "input", [&](auto t_tag) {
    using T = typename decltype(t_tag)::type;
    auto with_out = [&](auto w_tag) {
      using W = typename decltype(w_tag)::type;
      if (fp32_out) forward_typed<T, W, float>(x, residual, weight, bias, p, out, sum, stats);
      else forward_typed<T, W, T>(x, residual, weight, bias, p, out, sum, stats);
    };
    if (fp32_params) with_out(Tag<float>{});
    else with_out(Tag<T>{});
  });
}

} // namespace normpass
