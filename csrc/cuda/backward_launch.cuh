// The backward of one input dtype: launch plan, dweight/dbias partials and
// the dispatch onto the kernel's compile-time switches. Included only by the
// files that instantiate BackwardKernels<T, G, CENTER> (norm_backward_<dtype>[_<dtype>grad]_{ln,rms}.cu).
#pragma once

#include "launch.h"
#include "norm_backward_kernel.cuh"

namespace normpass {
namespace cuda {

using at::Tensor;
using std::optional;

template <typename T, typename W, typename G, int VEC, bool CENTER, bool BIAS_GRAD, bool MORE,
          bool SAVED>
void backward_launch(const Tensor& grad_out, at::TensorList more, const Tensor& x,
                     const Tensor& weight,
                     const optional<Tensor>& grad_sum, const NormParams& p, Tensor& grad_input,
                     optional<Tensor>& grad_weight, optional<Tensor>& grad_bias,
                     const optional<Tensor>& stats) {
  const int64_t cols = x.size(1);
  auto kernel = norm_bwd_kernel<T, W, G, VEC, CENTER, BIAS_GRAD, MORE, SAVED>;
  const bool partials = grad_weight || BIAS_GRAD;
  struct Plan {
    LaunchShape shape;
    size_t smem; // per-thread dweight/dbias partials of every tile
    int64_t fit; // clusters that run at once; 0: not this plan
  };
  const int64_t need = row_threads(cols, VEC, bwd_items<VEC>());
  const int min_threads = need > kBwdRowCtaThreads / 2 ? kBwdRowCtaThreads : kBwdThreads;
  const int max_threads = need <= kBwdWideRowThreads ? kBwdMaxThreads : kBwdThreads;
  const size_t smem_limit = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin) -
                            sizeof(ReduceSmem) - sizeof(float4) * kMeetLanes -
                            1024; // the driver's reserve
  set_max_dynamic_smem(kernel, smem_limit);
  auto layout = [&](int cmax, int min_cta, int max_cta) {
    LaunchShape s = choose_layout(x.size(0), cols, p.stat_cols, VEC, bwd_items<VEC>(), cmax,
                                  min_cta, max_cta);
    // A cluster row whose CTAs leave item slots empty (fp32 12288: 768 threads' worth of vectors
    // in 2 x 512) takes CTAs half as wide if fewer threads then hold it (3 x 256), so an SM has
    // as many vectors in flight as at 8192 or 16384 (H100, forward+backward: fp32 RMSNorm 12288
    // 2.22 -> 2.75 TB/s, LayerNorm 2.11 -> 2.42; bf16 RMSNorm 24576 2.03 -> 2.47; benchmarks/NOTES.md).
    const RowLayout& L = s.layout;
    if (L.cluster > 1 && L.tiles == 1 && L.tpr / 2 >= kBwdThreads) {
      LaunchShape half = choose_layout(x.size(0), cols, p.stat_cols, VEC, bwd_items<VEC>(), cmax,
                                       min_cta, L.tpr / 2);
      const RowLayout& H = half.layout;
      if (H.tiles == 1 && int64_t(H.tpr) * H.cluster < int64_t(L.tpr) * L.cluster) return half;
    }
    return s;
  };
  // A cluster plan is taken only if its partials cost no occupancy; a split
  // row (CTAs that are no cluster, a tile each) whenever its partials fit.
  auto plan = [&](LaunchShape shape) {
    Plan q{shape, 0, 0};
    const RowLayout& L = shape.layout;
    if (partials)
      q.smem = sizeof(float) * SmemPartial<bwd_items<VEC>(), VEC>::floats(shape.threads, L.tiles) *
               (BIAS_GRAD ? 2 : 1);
    if (q.smem > smem_limit) return q;
    if (L.split) {
      q.fit = std::max<int64_t>(1, resident_clusters(kernel, shape.threads, q.smem, 1) / L.cluster);
    } else {
      q.fit = resident_clusters(kernel, shape.threads, q.smem, L.cluster);
      if (q.fit < resident_clusters(kernel, shape.threads, 0, L.cluster)) q.fit = 0;
    }
    return q;
  };
  // In order of preference (measured, benchmarks/NOTES.md): a cluster of at
  // most 8 CTAs, then of 16 (Hopper's largest); else the split row (v18: bf16
  // LayerNorm 262144 1.2 -> 1.5 TB/s forward+backward, where a cluster of 16
  // held one CTA per SM).
  const int big = max_cluster(kernel, kBwdThreads);
  Plan q = plan(layout(std::min(big, 8), min_threads, max_threads));
  if (q.fit == 0) q = plan(layout(big, min_threads, max_threads));
  if (q.fit == 0) {
    LaunchShape split = layout(INT32_MAX, kBwdThreads, kBwdThreads);
    split.layout.split = true;
    q = plan(split);
  }
  TORCH_CHECK(q.fit > 0, "normpass CUDA: this device's shared memory cannot hold the dweight/dbias "
              "partials of rows of ", std::to_string(cols), "; use NORMPASS_FORCE_REFERENCE=1");
  const RowLayout& L = q.shape.layout;
  TORCH_INTERNAL_ASSERT(L.tpr <= 32 || L.rows_per_cta <= kMaxBarrierRows);
  // Persistent grid: as many clusters as run at once, each accumulating one
  // dweight/dbias partial row over the rows it visits.
  const int64_t clusters = std::min<int64_t>(q.fit, L.row_blocks);

  const auto f32 = x.options().dtype(at::kFloat);
  Tensor dw_part, db_part;
  if (grad_weight) dw_part = at::empty({clusters, cols}, f32);
  if (BIAS_GRAD) db_part = at::empty({clusters, cols}, f32);

  BwdArgs<T, W, G> a{};
  a.dy = ptr<G>(grad_out);
  a.x = ptr<T>(x);
  a.weight = ptr<W>(weight);
  a.grad_sum = ptr<T>(grad_sum);
  a.dx = mut_ptr<T>(grad_input);
  a.dw_part = grad_weight ? mut_ptr<float>(dw_part) : nullptr;
  a.db_part = BIAS_GRAD ? mut_ptr<float>(db_part) : nullptr;
  a.dy_stride = grad_out.stride(0);
  a.n_more = static_cast<int>(more.size());
  for (size_t i = 0; i < more.size(); ++i) {
    a.dy_more[i] = ptr<G>(more[i]);
    a.dy_more_stride[i] = more[i].stride(0);
  }
  a.x_stride = x.stride(0);
  a.ds_stride = grad_sum ? grad_sum->stride(0) : 0;
  a.eps = static_cast<float>(p.eps);
  a.stats = SAVED ? ptr<float2>(*stats) : nullptr;
  a.layout = L;
  Tensor row_parts, arrived; // held until the launches are queued
  // A split row's two phases in one cooperative launch, its CTAs meeting in
  // global memory (meet_in_memory: x and dy read once, not twice; eighteenth
  // stop: fp32 LayerNorm 262144 forward+backward 1.46 -> 1.98 TB/s, bf16 1.91 ->
  // 2.00), if every CTA of a row can be resident with the others and a row has
  // CTAs of its own (meet_in_memory sums one row per CTA). Else two launches.
  const bool meet = L.split && L.cluster > 1 && L.rows_per_cta == 1 &&
                    device_attribute(cudaDevAttrCooperativeLaunch) != 0 &&
                    resident_clusters(kernel, q.shape.threads, q.smem, 1) >= L.cluster;
  if (L.split) {
    row_parts = at::empty({L.rows, L.cluster, 4}, f32);
    a.row_parts = reinterpret_cast<float4*>(row_parts.mutable_data_ptr<float>());
  }
  if (meet) {
    arrived = at::zeros({L.rows}, x.options().dtype(at::kInt));
    a.arrived = arrived.mutable_data_ptr<int>();
    a.phase = 0;
  } else if (L.split) {
    BwdArgs<T, W, G> sums = a;
    sums.phase = 1;
    launch(kernel, clusters * L.cluster, q.shape.threads, 0, 1, sums);
    a.phase = 2;
  }
  launch_ex(kernel, clusters * L.cluster, q.shape.threads, q.smem, L.split ? 1 : L.cluster, meet, a);

  if (partials) {
    // The parameters' dtype: fp32, or x's (the partials are cast once as they are summed).
    auto sum_in = [&](auto o_tag) {
      using O = decltype(o_tag);
      O* dw = grad_weight ? mut_ptr<O>(*grad_weight) : nullptr;
      O* db = BIAS_GRAD ? mut_ptr<O>(*grad_bias) : nullptr;
      auto sum = [&](auto v) {
        constexpr int V = decltype(v)::value;
        // Lanes of a block: the fewest (down to a 128-byte row segment) that still
        // give every SM a block; the rest of the block's threads are slices.
        const int sms = device_attribute(cudaDevAttrMultiProcessorCount);
        int lanes = 32;
        while (lanes > 32 / V && (cols + lanes * V - 1) / (lanes * V) < sms) lanes /= 2;
        const dim3 grid(static_cast<unsigned>((cols + lanes * V - 1) / (lanes * V)), 2);
        sum_partials_kernel<V, O><<<grid, dim3(lanes, kPartThreads / lanes), 0, current_stream()>>>(
            a.dw_part, a.db_part, clusters, cols, dw, db);
      };
      if (cols % 4 == 0 && vector_ok(grad_weight, 4) && vector_ok(grad_bias, 4))
        sum(std::integral_constant<int, 4>{});
      else
        sum(std::integral_constant<int, 1>{});
    };
    const auto& any = grad_weight ? grad_weight : grad_bias;
    if (any->scalar_type() == at::kFloat) sum_in(float{});
    else sum_in(T{});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, typename W, typename G, bool CENTER>
void backward_typed(const Tensor& grad_out, at::TensorList more, const Tensor& x,
                    const Tensor& weight,
                    const optional<Tensor>& grad_sum, const NormParams& p, Tensor& grad_input,
                    optional<Tensor>& grad_weight, optional<Tensor>& grad_bias,
                    const optional<Tensor>& stats) {
  constexpr int kVec = 16 / sizeof(T);
  bool vec = vector_ok(x, kVec) && vector_ok(grad_out, kVec) && vector_ok(grad_sum, kVec) &&
             vector_ok(grad_input, kVec) && vector_ok(weight, kVec);
  for (const Tensor& g : more) vec = vec && vector_ok(g, kVec);
  dispatch_flags<kVec>(vec, grad_bias.has_value(), [&](auto v, auto dbias) {
    auto with_terms = [&](auto more_terms) {
      dispatch_bool(stats.has_value(), [&](auto saved) {
        backward_launch<T, W, G, decltype(v)::value, CENTER, decltype(dbias)::value,
                        decltype(more_terms)::value, decltype(saved)::value>(
            grad_out, more, x, weight, grad_sum, p, grad_input, grad_weight, grad_bias, stats);
      });
    };
    // Terms summed in the kernel in x's dtype, or 16-bit ones of fp32 x (widened as loaded); fp32
    // terms of 16-bit x are summed up front (norm_backward.cu).
    if constexpr (std::is_same_v<G, T> || std::is_same_v<T, float>) {
      dispatch_bool(!more.empty(), with_terms);
    } else {
      TORCH_INTERNAL_ASSERT(more.empty(), "normpass CUDA: fp32 gradient terms of 16-bit x");
      with_terms(std::false_type{});
    }
  });
}

// The entry point passes a weight (ones for none), of x's dtype or fp32, and
// gradients of G.
template <typename T, typename G, bool CENTER>
void BackwardKernels<T, G, CENTER>::run(const Tensor& grad_out, at::TensorList more,
                                        const Tensor& x, const optional<Tensor>& weight,
                                        const optional<Tensor>& grad_sum, const NormParams& p,
                                        Tensor& grad_input, optional<Tensor>& grad_weight,
                                        optional<Tensor>& grad_bias,
                                        const optional<Tensor>& stats) {
  if (weight->scalar_type() != x.scalar_type()) {
    backward_typed<T, float, G, CENTER>(grad_out, more, x, *weight, grad_sum, p, grad_input,
                                        grad_weight, grad_bias, stats);
  } else {
    backward_typed<T, T, G, CENTER>(grad_out, more, x, *weight, grad_sum, p, grad_input,
                                    grad_weight, grad_bias, stats);
  }
}

} // namespace cuda
} // namespace normpass
