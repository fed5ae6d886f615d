// The forward of one input dtype: launch shape, arguments and the dispatch
// onto the kernel's compile-time switches. Included only by the files that
// instantiate ForwardKernels<T, CENTER> (norm_forward_<dtype>_{ln,rms}.cu).
#pragma once

#include "launch.h"
#include "norm_forward_kernel.cuh"

namespace normpass {
namespace cuda {

using at::Tensor;
using std::optional;

// DRAM bytes per SM cycle (dram_bytes_per_sm_cycle) between the H100's 12.8
// and the H200's 18.8, the two devices on which the forward's launch shapes
// were measured: the forward's CTA width (fwd_max_threads) and tiles
// (fwd_cluster_tiles) follow it.
constexpr double kFwdFastDramBytesPerSmCycle = 16;

template <typename T, typename W, typename O, typename R, int VEC, bool CENTER, bool RESIDUAL,
          int ITEMS = fwd_items<VEC>()>
void forward_launch(const Tensor& x, const optional<Tensor>& residual,
                    const optional<Tensor>& weight, const optional<Tensor>& bias,
                    const NormParams& p, Tensor& out, optional<Tensor>& sum,
                    optional<Tensor>& stats) {
  const int64_t need = row_threads(x.size(1), VEC, ITEMS);
  const bool fast_dram = dram_bytes_per_sm_cycle() > kFwdFastDramBytesPerSmCycle;
  // The deep kernel is compiled only where fwd_row_deep may take it.
  if constexpr (!RESIDUAL && VEC > 1 && !fwd_deep<VEC, ITEMS>) {
    if (fwd_row_deep(need, fast_dram))
      return forward_launch<T, W, O, R, VEC, CENTER, RESIDUAL, 2 * ITEMS>(x, residual, weight, bias,
                                                                         p, out, sum, stats);
  }
  auto kernel = norm_fwd_kernel<T, W, O, R, VEC, CENTER, RESIDUAL, ITEMS>;
  const int min_threads = fwd_min_threads(device_attribute(cudaDevAttrMaxBlocksPerMultiprocessor));
  const int max_threads = fwd_max_threads(need, CENTER, fast_dram);
  const auto shape = choose_layout(x.size(0), x.size(1), p.stat_cols, VEC, ITEMS,
                                   max_cluster(kernel, max_threads), min_threads, max_threads,
                                   fwd_cluster_tiles(need, max_threads, fast_dram),
                                   /*round_to_warps=*/true);
  FwdArgs<T, W, O, R> a{};
  a.x = ptr<T>(x);
  a.residual = ptr<R>(residual);
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
  // The residual is of x's dtype, or 16 bits beside fp32 x (autocast's fp32 stream plus a bf16
  // projection), loaded as it is and widened exactly. Only the residual kernels take another R.
  auto typed = [&](auto r_tag) {
    using R = typename decltype(r_tag)::type;
    dispatch_flags<kVec>(vec, residual.has_value(), [&](auto v, auto res) {
      if constexpr (std::is_same_v<R, T> || decltype(res)::value)
        forward_launch<T, W, O, R, decltype(v)::value, CENTER, decltype(res)::value>(
            x, residual, weight, bias, p, out, sum, stats);
    });
  };
  if constexpr (std::is_same_v<T, float>) {
    if (residual && residual->scalar_type() != x.scalar_type())
      return dispatch_float(residual->scalar_type(), "residual", typed);
  }
  typed(Tag<T>{});
}

// The parameters are of x's dtype or fp32; the output of x's dtype, fp32, or,
// for fp32 x, 16 bits (an fp32 norm's output cast under autocast, folded into
// the op: normpass/fold_casts.py). The entry point casts any other.
template <typename T, bool CENTER>
void ForwardKernels<T, CENTER>::run(const Tensor& x, const optional<Tensor>& residual,
                                    const optional<Tensor>& weight, const optional<Tensor>& bias,
                                    const NormParams& p, Tensor& out, optional<Tensor>& sum,
                                    optional<Tensor>& stats) {
  const auto param = weight ? weight : bias;
  const bool fp32_params = param && param->scalar_type() != x.scalar_type();
  auto with_out = [&](auto w_tag) {
    using W = typename decltype(w_tag)::type;
    auto typed = [&](auto o_tag) {
      using O = typename decltype(o_tag)::type;
      forward_typed<T, W, O, CENTER>(x, residual, weight, bias, p, out, sum, stats);
    };
    if (out.scalar_type() == x.scalar_type()) typed(Tag<T>{});
    else if constexpr (!std::is_same_v<T, float>) typed(Tag<float>{});
    else dispatch_float(out.scalar_type(), "output", typed);
  };
  if (fp32_params) with_out(Tag<float>{});
  else with_out(Tag<T>{});
}

} // namespace cuda
} // namespace normpass
