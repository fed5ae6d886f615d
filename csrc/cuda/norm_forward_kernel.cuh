// The forward row kernel: y = norm(x) or norm(x + residual), one template
// parametrized by centering (LayerNorm vs RMSNorm) and the fused residual add.
// Pure CUDA: the ATen glue is in forward_launch.cuh.
#pragma once

#include <type_traits>

#include "norm_row.cuh"

namespace normpass {
namespace cuda {

// Vectors per thread per tile. The forward keeps its share of the row as
// packed input, 4 x 16 bytes = 16 registers, and stays within 64 registers so
// that 1024 threads share an SM (measured: 8 vectors at ~100 registers ran
// 15% slower, 2 vectors at 40 registers 5-10% slower; see benchmarks/NOTES.md),
// but for the rows of fwd_row_deep.
template <int VEC> __host__ __device__ constexpr int fwd_items() { return VEC == 1 ? 8 : 4; }
constexpr int kFwdMaxThreads = kMaxThreads;
constexpr int kFwdMinBlocks = 2; // CTAs of kFwdMaxThreads per SM: the register bound
// A wide CTA: the launch bound (1024, 1) gives the same 64 registers as (512, 2).
constexpr int kFwdWideThreads = 1024;
// The widest CTA a forward row of `need` threads may take, by norm and by
// whether DRAM moves more bytes per SM cycle than the SMs keep up with
// (`fast_dram`: H200, not H100); kFwdMaxThreads but for two rules:
// - fast_dram: a LayerNorm row of one full-size CTA runs in a half-size CTA
//   over two tiles, the first re-read from L2. bf16 LayerNorm 16384: on an
//   H200 3.22 -> 3.43 TB/s, on an H100 2.79 -> 2.65 (-5%); the same for
//   RMSNorm lost 2.5-3% on the H200.
// - not fast_dram: an RMSNorm row of exactly kFwdWideThreads threads runs
//   resident in one wide CTA, not in a full-size CTA over two tiles. H100,
//   TB/s: fp32 RMSNorm 16384 2.75 -> 2.85, bf16 add_rms_norm 32768 2.83 ->
//   2.88; LayerNorm flat or lost (bf16 32768 2.64 -> 2.56), so did rows of
//   513-1023 threads (fp32 12288 -5.5%): one CTA per SM idles DRAM through
//   each row's barrier. Without the residual add, fwd_row_deep takes these
//   rows first.
// See benchmarks/NOTES.md.
__host__ __device__ constexpr int fwd_max_threads(int64_t need, bool center, bool fast_dram) {
  if (center && fast_dram && need > kFwdMaxThreads / 2 && need <= kFwdMaxThreads)
    return kFwdMaxThreads / 2;
  if (!center && !fast_dram && need == kFwdWideThreads) return kFwdWideThreads;
  return kFwdMaxThreads;
}
static_assert(fwd_max_threads(512, true, true) == 256 && fwd_max_threads(512, true, false) == 512 &&
              fwd_max_threads(256, true, true) == 512 && fwd_max_threads(512, false, true) == 512 &&
              fwd_max_threads(1024, false, false) == 1024 && fwd_max_threads(768, false, false) == 512 &&
              fwd_max_threads(1024, true, false) == 512 && fwd_max_threads(1024, false, true) == 512);
// A forward row of exactly two full-size CTAs at fwd_items, where DRAM is not
// fast (H100), runs resident in one full-size CTA at twice the vectors per
// thread (a kernel bounded to 128 registers, one CTA per SM: the row in
// registers, as Liger runs it), not over two tiles with the first re-read from
// L2 (LayerNorm) nor in one 1024-thread CTA (RMSNorm). H100, forward TB/s:
// fp32 LayerNorm 16384 2.78 -> 2.88, bf16 32768 2.63 -> 2.67; fp32 RMSNorm
// 16384 2.85 -> 2.92, bf16 32768 2.68 -> 2.79; rows of 768 threads lost 1%
// (fp32 12288). Not measured on the H200, nor with the residual add (not
// taken there). See benchmarks/NOTES.md.
__host__ __device__ constexpr bool fwd_row_deep(int64_t need, bool fast_dram) {
  return !fast_dram && need == 2 * kFwdMaxThreads;
}
static_assert(fwd_row_deep(1024, false) && !fwd_row_deep(768, false) && !fwd_row_deep(1024, true));
// Whether a kernel of ITEMS vectors per thread is fwd_row_deep's.
template <int VEC, int ITEMS> constexpr bool fwd_deep = ITEMS > fwd_items<VEC>();
// Short forward rows run in the smallest CTAs (from one warp) of which an SM
// still holds the warps its register bound allows (fwd_min_threads): one warp
// where an SM takes 32 CTAs (sm_80, sm_90), as inductor's persistent
// reductions run (ncu: 65536 x 32 threads); against CTAs of 128: bf16 RMSNorm
// 1024-2048 +1.5-2.5%, fp32 256-1024 +2.5% (H200, 2026-12-04).
__host__ __device__ constexpr int fwd_min_threads(int max_ctas_per_sm) {
  int t = 32;
  while (t / 32 * max_ctas_per_sm < kFwdMinBlocks * kFwdMaxThreads / 32) t *= 2;
  return t;
}
static_assert(fwd_min_threads(32) == 32 && fwd_min_threads(16) == 64 && fwd_min_threads(24) == 64);
// Tiles a forward row of `need` threads walks when it needs a cluster of
// `max_threads`-thread CTAs: two over half as many CTAs (fewer at each cluster
// barrier, the second tile re-read from L2), or, where DRAM moves fewer bytes
// per SM cycle (`fast_dram` false: H100, not H200), one where the row fills a
// cluster of 3-8 CTAs exactly. Two tiles -> one, TB/s: H100 bf16 RMSNorm 65536
// 2.15 -> 2.36, add_rms_norm 131072 2.49 -> 2.71, fp32 32768 2.18 -> 2.48,
// LayerNorm 131072 2.16 -> 2.11; H200 bf16 RMSNorm 65536 3.08 -> 2.73, fp32
// LayerNorm 3.04 -> 2.55. Two won on the H100 too at a cluster of 2 (fp32 16384
// 2.78 vs 2.59), a partly idle one of 3 (bf16 40960 2.19 vs 2.11) and one of 16
// (bf16 LayerNorm 262144 2.10 vs 1.73). See benchmarks/NOTES.md.
__host__ __device__ constexpr int fwd_cluster_tiles(int64_t need, int max_threads, bool fast_dram) {
  const int64_t ctas = need / max_threads;
  return !fast_dram && need % max_threads == 0 && ctas >= 3 && ctas <= 8 ? 1 : 2;
}
static_assert(fwd_cluster_tiles(2048, 512, false) == 1 && fwd_cluster_tiles(2048, 512, true) == 2 &&
              fwd_cluster_tiles(1280, 512, false) == 2 && fwd_cluster_tiles(1024, 512, false) == 2 &&
              fwd_cluster_tiles(8192, 512, false) == 2);

// Forward: y = (h - mean) * rstd * (w + offset) + b, h = x or round(x + r).
// R: the residual's storage type, T's, or 16 bits beside fp32 x (widened as loaded).
template <typename T, typename W, typename O, typename R = T>
struct FwdArgs {
  const T* x;
  const R* residual; // RESIDUAL only
  const W* weight;   // may be null
  const W* bias;     // may be null
  O* out;            // contiguous (rows, cols)
  T* sum;            // RESIDUAL only, contiguous
  float2* stats;     // (mean, rstd) per row, or null
  int64_t x_stride, r_stride;
  float eps; // weight offsets are folded into the weight on the host
  RowLayout layout;
};

// ITEMS: fwd_items, or twice that (fwd_row_deep) in full-size CTAs at 128 registers.
template <typename T, typename W, typename O, typename R, int VEC, bool CENTER, bool RESIDUAL,
          int ITEMS>
__global__ void __launch_bounds__(
    fwd_deep<VEC, ITEMS> ? kFwdMaxThreads : kFwdWideThreads,
    fwd_deep<VEC, ITEMS> ? 1 : kFwdMinBlocks * kFwdMaxThreads / kFwdWideThreads)
    norm_fwd_kernel(const FwdArgs<T, W, O, R> a) {
  const RowLayout& L = a.layout;
  const RowThread th(L);
  __shared__ ReduceSmemOf<kFwdWideThreads / 32> sh;
  int parity = 0;
  const bool resident = L.tiles == 1;
  const float inv_k = 1.f / static_cast<float>(L.stat_cols);

  // The row loop, compiled for full layouts and for the rest (v24: LayerNorm
  // and RMSNorm 16384 +2-4%, add_rms_norm from 16384 +9-14%; benchmarks/NOTES.md).
  with_full_rows(L, [&](auto full) {
    for (int64_t rb = blockIdx.x / L.cluster; rb < L.row_blocks; rb += gridDim.x / L.cluster) {
      const int64_t row = rb * L.rows_per_cta + th.group;
      // Threads of a missing row (last row block) still join the reductions.
      const bool valid = row < L.rows;
      const int64_t r0 = valid ? row : 0;
      const T* x = a.x + r0 * a.x_stride;
      const R* r = RESIDUAL ? a.residual + r0 * a.r_stride : nullptr;
      T* sum = RESIDUAL ? a.sum + r0 * L.cols : nullptr;
      O* out = a.out + r0 * L.cols;
      Frag<T, VEC, ITEMS> h;

      // Tile t into h. The statistics pass reads x (+ residual, rounded to T
      // and stored to `sum`, as eager `x + residual` would); the output pass of
      // a non-resident row re-reads that rounded sum.
      auto load_tile = [&](int t, bool first_pass) {
        if (!valid) return;
        for_each_vec<ITEMS, full.value>(th, L, t, [&](int k, int j) {
          if (RESIDUAL && !first_pass) {
            load<false>(h.v[k], sum + j * VEC); // written by this kernel: no read-only path
          } else if (RESIDUAL) {
            Pack<T, VEC> xv;
            Pack<R, VEC> rv;
            load(xv, x + j * VEC);
            load(rv, r + j * VEC);
#pragma unroll
            for (int e = 0; e < VEC; ++e)
              h.v[k].v[e] = from_float<T>(element(xv, e) + element(rv, e));
            store(sum + j * VEC, h.v[k]);
          } else {
            load(h.v[k], x + j * VEC);
          }
        });
      };

      // The first tile's loads go out before the shift's, so that both wait on
      // memory at once (ncu, v25: LayerNorm waited for the shift, then for the row).
      load_tile(0, true);
      const float shift = CENTER && valid ? row_shift<T, R, VEC, RESIDUAL>(x, r, L.cols) : 0.f;

      // One reduction: sum (h - shift)^2 and, for LayerNorm, sum (h - shift),
      // each tile's sums added to the row's (fewer roundings in a chain).
      float s[CENTER ? 2 : 1] = {};
      for (int t = 0; t < L.tiles; ++t) {
        if (t > 0) load_tile(t, true);
        if (!valid) continue;
        float st[CENTER ? 2 : 1] = {};
        auto stat = [&](int k, int e) {
          const float d = h(k, e) - shift;
          st[0] += d * d;
          if constexpr (CENTER) st[1] += d;
        };
        with_ragged_stats<VEC, !CENTER && !full.value>(
            L, [&](auto ragged) { for_each_stat<ITEMS, VEC, full.value>(th, L, t, ragged, stat); });
        add_sums(s, st);
      }
      row_sum<false>(s, L, th, sh, parity);
      float mean = 0.f, var = s[0] * inv_k;
      if constexpr (CENTER) {
        const Moments mo = shifted_moments(shift, s[1], s[0], inv_k);
        mean = mo.mean;
        var = mo.var;
      }
      const float rstd = rsqrtf(var + a.eps);
      if (a.stats != nullptr && valid && th.first == 0) a.stats[r0] = make_float2(mean, rstd);

      // Output pass, compiled once per weight/bias presence: no per-element selects.
      auto write = [&](auto has_w, auto has_b) {
        for (int t = 0; t < L.tiles; ++t) {
          if (!resident) load_tile(t, false);
          if (!valid) continue;
          for_each_vec<ITEMS, full.value>(th, L, t, [&](int k, int j) {
            float w[VEC], b[VEC], y[VEC];
            if constexpr (has_w.value) load_param(w, a.weight, j * VEC);
            if constexpr (has_b.value) load_param(b, a.bias, j * VEC);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              y[e] = (h(k, e) - mean) * rstd;
              if constexpr (has_w.value && has_b.value) y[e] = fmaf(y[e], w[e], b[e]);
              else if constexpr (has_w.value) y[e] *= w[e];
              else if constexpr (has_b.value) y[e] += b[e];
            }
            store_floats(out + j * VEC, y);
          });
        }
      };
      using yes = std::true_type;
      using no = std::false_type;
      if (a.weight != nullptr) {
        if (a.bias != nullptr) write(yes{}, yes{});
        else write(yes{}, no{});
      } else {
        if (a.bias != nullptr) write(no{}, yes{});
        else write(no{}, no{});
      }
    }
  });
  cluster_exit_barrier(L);
}

} // namespace cuda
} // namespace normpass
