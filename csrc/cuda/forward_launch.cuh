// The forward of one input dtype: launch shape, arguments and the dispatch
// onto the kernel's compile-time switches. Included only by the files that
// instantiate ForwardKernels<T, CENTER> (norm_forward_<dtype>_{ln,rms}.cu).
#pragma once

#include "launch.h"

namespace normpass {
namespace cuda {

using at::Tensor;
using std::optional;

template <typename T, typename W, typename O, int VEC, bool CENTER, bool RESIDUAL>
void forward_launch(const Tensor& x, const optional<Tensor>& residual,
                    const optional<Tensor>& weight, const optional<Tensor>& bias,
                    const NormParams& p, Tensor& out, optional<Tensor>& sum,
                    optional<Tensor>& stats) {
  auto kernel = norm_fwd_kernel<T, W, O, VEC, CENTER, RESIDUAL>;
  const int min_threads = fwd_min_threads(device_attribute(cudaDevAttrMaxBlocksPerMultiprocessor));
  const auto shape = choose_layout(x.size(0), x.size(1), p.stat_cols, VEC, fwd_items<VEC>(),
                                   max_cluster(kernel, kFwdMaxThreads), min_threads,
                                   kFwdMaxThreads, kFwdClusterTiles, /*round_to_warps=*/true);
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
  // One row block per CTA, the kernel looping if the grid is capped; rows in
  // clusters on a persistent grid, as many clusters as run at once (measured
  // against a cluster per row: bf16 RMSNorm 262144 2.67 -> 2.90 TB/s, fp32
  // 2.52 -> 2.86, LayerNorm 65536 2.75 -> 2.91; shorter rows lost 2-6% to it).
  const int64_t C = shape.layout.cluster;
  int64_t blocks = std::min<int64_t>(shape.layout.row_blocks, INT32_MAX / C);
  if (C > 1)
    blocks = std::min(blocks, std::max<int64_t>(1, resident_clusters(kernel, shape.threads, 0, C)));
  const int64_t ctas = blocks * C;
  launch(kernel, ctas, shape.threads, 0, C, a);
}

template <typename T, typename W, typename O, bool CENTER>
void forward_typed(const Tensor& x, const optional<Tensor>& residual,
                   const optional<Tensor>& weight, const optional<Tensor>& bias,
                   const NormParams& p, Tensor& out, optional<Tensor>& sum,
                   optional<Tensor>& stats) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = vector_ok(x, kVec) && vector_ok(residual, kVec) && vector_ok(out, kVec) &&
                   vector_ok(sum, kVec) && vector_ok(weight, kVec) && vector_ok(bias, kVec);
  dispatch_flags<kVec>(vec, residual.has_value(), [&](auto v, auto res) {
    forward_launch<T, W, O, decltype(v)::value, CENTER, decltype(res)::value>(
        x, residual, weight, bias, p, out, sum, stats);
  });
}

// The parameters are of x's dtype or fp32; the output is of x's dtype or fp32
// (the entry point casts any other).
template <typename T, bool CENTER>
void ForwardKernels<T, CENTER>::run(const Tensor& x, const optional<Tensor>& residual,
                                    const optional<Tensor>& weight, const optional<Tensor>& bias,
                                    const NormParams& p, Tensor& out, optional<Tensor>& sum,
                                    optional<Tensor>& stats) {
  const auto param = weight ? weight : bias;
  const bool fp32_params = param && param->scalar_type() != x.scalar_type();
  const bool fp32_out = out.scalar_type() != x.scalar_type();
  auto with_out = [&](auto w_tag) {
    using W = typename decltype(w_tag)::type;
    if (fp32_out) forward_typed<T, W, float, CENTER>(x, residual, weight, bias, p, out, sum, stats);
    else forward_typed<T, W, T, CENTER>(x, residual, weight, bias, p, out, sum, stats);
  };
  if (fp32_params) with_out(Tag<float>{});
  else with_out(Tag<T>{});
}

} // namespace cuda
} // namespace normpass
