// The backward row kernel (dx and the dweight/dbias partials), parametrized
// by centering (LayerNorm vs RMSNorm), whether dbias is wanted and whether
// further terms of the output's gradient come with dy (MORE); and the small
// kernel that finishes dweight/dbias. Pure CUDA: the ATen glue is in
// backward_launch.cuh.
#pragma once

#include <type_traits>

#include "norm_row.cuh"

namespace normpass {
namespace cuda {

// Vectors per thread per tile. The backward holds x and dy (2 x 4 x 16 bytes)
// in registers and its fp32 dweight/dbias partials in shared memory; it takes
// up to 128 registers, two 256-thread CTAs per SM (a cap of 80 for three CTAs
// made it spill).
template <int VEC> __host__ __device__ constexpr int bwd_items() { return VEC == 1 ? 8 : 4; }
constexpr int kBwdThreads = 256; // CTA size of the backward, except:
// a row of 65-128 threads takes a CTA of 128 to itself (four CTAs per SM out
// of phase instead of two: LayerNorm 4096 +4%); shorter rows share CTAs of 256
// (at 128, twice the CTAs and dweight partials: the 8192-row step shape lost
// 2-5%);
// rows of 257-1024 threads take CTAs of 512 (same 128 registers, one CTA per
// SM): one CTA instead of a cluster of two, a cluster of 2 instead of 4
// (fewer CTAs at the row's barrier), unless a cluster of 256-thread CTAs holds
// the row with fewer threads (513-768: 3 x 256; backward_launch.cuh). Longer rows run in clusters of 256-thread
// CTAs, two per SM: at 2048 threads clusters of 8 by 256 beat 4 by 512 at
// bf16 65536 (RMSNorm +3%, LayerNorm +1.3%) and fp32 RMSNorm 32768 (+4%), not
// fp32 LayerNorm 32768 (-3%); 512-thread CTAs for rows of up to 8192 threads
// lost 10% (fp32 65536, LayerNorm 262144; H200, benchmarks/NOTES.md).
constexpr int kBwdRowCtaThreads = 128;
constexpr int kBwdMaxThreads = 512;
constexpr int kBwdWideRowThreads = 2 * kBwdMaxThreads;

// Terms of the output's gradient the backward sums as it loads them (more are
// added up front on the host).
constexpr int kMaxGradTerms = 3;

// Backward. Per row, one reduction of
//   sum (x-s)^2 and sum (x-s) over the stat columns, sum g*(x-s), sum g,
// with g = dy * (w + offset) and s the LayerNorm shift (0 for RMSNorm),
// gives rstd and the two terms of
//   dx = rstd * (g - mean(g) - xhat * sum(g*xhat) / k) (+ grad_sum).
// With the forward's (mean, rstd) (SAVED) the reduction is of sum g*(x-mean)
// and sum g only: LayerNorm backward 4% faster in bf16, 7-10% in fp32
// (benchmarks/NOTES.md).
// dweight/dbias: fp32 partials per thread, in shared memory (registers are
// for x and dy), across all rows a cluster visits (persistent grid); written
// once at the end, one row of `partials` per cluster. Each partial element has
// one owner thread and a fixed summation order: deterministic.
// Rows whose partials would cost a cluster occupancy are split over CTAs that
// are no cluster (layout.split; a "cluster" below is then that group of CTAs).
// If a row's CTAs can all be resident at once (the persistent grid never holds
// more CTAs than run at once), they meet in memory in one cooperative launch
// (phase 0: meet_in_memory); else the kernel runs twice on the same grid: phase 1 stores each CTA's share of the row sums in row_parts, phase 2
// adds the shares in rank order and writes dx, re-reading x and dy.
// The output's gradient is of x's storage type T, fp32 for 16-bit x, or 16
// bits for fp32 x (G): a norm whose output is wider than its input (an fp32
// weight times bf16 rows) gets its gradient read as it is, not rounded, nor
// widened with x; one whose output autocast narrows, before it is widened.
template <typename T, typename W, typename G>
struct BwdArgs {
  const G* dy;
  const G* dy_more[kMaxGradTerms - 1]; // further gradient terms: dy + dy_more[0] + ...
  int64_t dy_more_stride[kMaxGradTerms - 1];
  int n_more;
  const T* x;
  const W* weight;   // not null: ones when the norm has none
  const T* grad_sum; // may be null
  T* dx;             // contiguous
  float* dw_part;    // (clusters, cols) or null
  float* db_part;    // (clusters, cols) or null (BIAS_GRAD only)
  int64_t dy_stride, x_stride, ds_stride;
  float eps;
  const float2* stats; // (mean, rstd) of each row from the forward (SAVED only)
  float4* row_parts;  // (rows, cluster) shares of the row sums (split layouts only)
  int* arrived;       // per row: CTAs past their share (phase 0 of a split layout)
  int phase;          // split layouts: 0 both in one cooperative launch, or two
                      // launches: 1 stores the shares, 2 writes the outputs
  RowLayout layout;
};

// A thread's fp32 partials in shared memory: chunks of Q floats, laid out
// [item][chunk][thread] so that a warp's 16-byte accesses are contiguous.
// Item k of tile t is item t * ITEMS + k.
template <int ITEMS, int VEC>
struct SmemPartial {
  static constexpr int Q = VEC < 4 ? VEC : 4;
  static constexpr int QV = VEC / Q;
  float* base;
  int items; // ITEMS * tiles
  // Floats of one tensor's partials for a CTA (the host sizes shared memory by it).
  __host__ __device__ static constexpr int64_t floats(int64_t threads, int64_t tiles) {
    return ITEMS * tiles * VEC * threads;
  }
  __device__ float* chunk(int k, int q, int tid) const {
    return base + ((k * QV + q) * int(blockDim.x) + tid) * Q;
  }
  // Adds v (VEC values of item k) into this thread's slots, or v * u as one
  // fused multiply-add each (dweight: dy * xhat).
  __device__ __forceinline__ void add(int k, const float (&v)[VEC]) const {
    update(k, [&](int e, float s) { return s + v[e]; });
  }
  __device__ __forceinline__ void add(int k, const float (&v)[VEC], const float (&u)[VEC]) const {
    update(k, [&](int e, float s) { return fmaf(v[e], u[e], s); });
  }
  template <typename F>
  __device__ __forceinline__ void update(int k, F&& f) const {
#pragma unroll
    for (int q = 0; q < QV; ++q) {
      Pack<float, Q> c;
      float* p = chunk(k, q, threadIdx.x);
      load<false>(c, p);
#pragma unroll
      for (int i = 0; i < Q; ++i) c.v[i] = f(q * Q + i, c.v[i]);
      store(p, c);
    }
  }
  __device__ __forceinline__ void zero() const {
    for (int k = 0; k < items; ++k)
      for (int q = 0; q < QV; ++q) {
        Pack<float, Q> c;
#pragma unroll
        for (int i = 0; i < Q; ++i) c.v[i] = 0.f;
        store(chunk(k, q, threadIdx.x), c);
      }
  }
  // Column `col` of row group g (rows_per_cta > 1 implies one CTA per row).
  __device__ float at(int g, int col, const RowLayout& L) const {
    const int j = col / VEC, e = col % VEC;
    return chunk(j / L.tpr, e / Q, g * L.tpr + j % L.tpr)[e % Q];
  }
};

// at(0) + ... + at(n - 1) for n a power of two <= 2^kMaxPairLevels, summed
// pairwise: the rounding error grows with log2(n), not n (up to 256 row
// groups of a CTA share its columns; fp32 dbias summed in a line missed the
// parity bound at N = 1).
constexpr int kMaxPairLevels = 8;
template <typename F>
__device__ float pairwise_sum(int n, F&& at) {
  float level[kMaxPairLevels + 1];
  int top = 0;
  for (int i = 0; i < n; ++i) {
    float v = at(i);
    top = 0;
    for (int m = i; m & 1; m >>= 1) v = level[top++] + v; // close the finished pairs
    level[top] = v;
  }
  return level[top];
}

template <typename T, typename W, typename G, int VEC, bool CENTER, bool BIAS_GRAD, bool MORE,
          bool SAVED>
__global__ void __launch_bounds__(kBwdMaxThreads, 1) norm_bwd_kernel(const BwdArgs<T, W, G> a) {
  constexpr int ITEMS = bwd_items<VEC>();
  using Part = SmemPartial<ITEMS, VEC>;
  // The type dy's terms are summed in: G, or fp32 for several 16-bit terms of fp32 x (autocast's
  // widened casts of the output, summed in fp32: the terms are widened as they are loaded).
  using GS = std::conditional_t<MORE && !std::is_same_v<G, T>, float, G>;
  const RowLayout& L = a.layout;
  const RowThread th(L);
  __shared__ ReduceSmem sh;
  __shared__ float4 meet_lanes[kMeetLanes]; // meet only
  extern __shared__ float4 smem_partials[]; // dw then db partials
  int parity = 0;
  const bool sums_only = L.split && a.phase == 1;
  const bool from_parts = L.split && a.phase == 2;
  const bool meet = L.split && a.phase == 0;
  const bool resident = L.tiles == 1 && (!L.split || meet);
  const int64_t cluster_id = blockIdx.x / L.cluster;
  const int64_t clusters = gridDim.x / L.cluster;
  const float inv_k = 1.f / static_cast<float>(L.stat_cols);
  const float inv_n = 1.f / static_cast<float>(L.cols);
  float* dw_part = a.dw_part && !sums_only ? a.dw_part + cluster_id * L.cols : nullptr;
  float* db_part = BIAS_GRAD && !sums_only ? a.db_part + cluster_id * L.cols : nullptr;
  const Part dw_acc{reinterpret_cast<float*>(smem_partials), ITEMS * L.tiles};
  const Part db_acc{dw_acc.base + Part::floats(blockDim.x, L.tiles), dw_acc.items};
  if (!sums_only) {
    if (dw_part) dw_acc.zero();
    if (BIAS_GRAD) db_acc.zero();
  }

  // The row loop, compiled for full layouts and for the rest, as in the
  // forward (v25: bf16 forward+backward +3-11% at N 1024-16384; NOTES.md).
  with_full_rows(L, [&](auto full) {
    for (int64_t rb = cluster_id; rb < L.row_blocks; rb += clusters) {
      const int64_t row = rb * L.rows_per_cta + th.group;
      const bool valid = row < L.rows;
      const int64_t r0 = valid ? row : 0;
      const T* x = row_base(a.x + r0 * a.x_stride);
      const G* dy = row_base(a.dy + r0 * a.dy_stride);
      const T* ds = a.grad_sum ? row_base(a.grad_sum + r0 * a.ds_stride) : nullptr;
      T* dx = row_base(a.dx + r0 * L.cols);
      Frag<T, VEC, ITEMS> xf, sf; // x and grad_sum of one tile
      Frag<GS, VEC, ITEMS> gf;    // dy (with the further terms added)

      // grad_sum is first needed after the reduction. Its loads go out before
      // it (resident rows) or before the tile's first dx store (which the
      // compiler may not move them past), so their latency is not exposed.
      auto load_grad_sum = [&](int t) {
        if (ds != nullptr && valid)
          for_each_vec<ITEMS, full.value>(th, L, t, [&](int k, int j) { load(sf.v[k], ds + j * VEC); });
      };
      auto load_tile = [&](int t) {
        if (!valid) return;
        for_each_vec<ITEMS, full.value>(th, L, t, [&](int k, int j) {
          load(xf.v[k], x + j * VEC);
          load_as(gf.v[k], dy + j * VEC);
        });
        if constexpr (MORE) {
          // Further terms of dy, each sum rounded to GS as the eager adds it replaces. Their
          // loads go out after the row's and before any add, so all are in flight at once
          // (a kernel of its own: the registers for them cost the usual call 1-3%).
          Frag<G, VEC, ITEMS> terms[kMaxGradTerms - 1];
#pragma unroll
          for (int i = 0; i < kMaxGradTerms - 1; ++i) {
            if (i < a.n_more) {
              const G* more = a.dy_more[i] + r0 * a.dy_more_stride[i];
              for_each_vec<ITEMS, full.value>(th, L, t,
                                              [&](int k, int j) { load(terms[i].v[k], more + j * VEC); });
            }
          }
#pragma unroll
          for (int i = 0; i < kMaxGradTerms - 1; ++i) {
            if (i < a.n_more) {
              for_each_vec<ITEMS, full.value>(th, L, t, [&](int k, int j) {
#pragma unroll
                for (int e = 0; e < VEC; ++e)
                  gf.v[k].v[e] = from_float<GS>(gf(k, e) + terms[i](k, e));
              });
            }
          }
        }
      };
      // The next row block's first tile of x and dy is asked into L2 while this
      // one is written, so its loads wait on L2, not on DRAM (v22, bf16
      // forward+backward +2-4% at N 1024-8192 and LayerNorm 65536); a row that
      // meets in memory asks before its sums, whose wait on the row's slowest
      // CTA would otherwise leave DRAM idle (H100, LayerNorm 262144 +5% in bf16
      // and fp32; bf16 131072 -2.5%). Not for MORE: its step-shape calls lost
      // 2 µs with it. Split rows in two launches were not tried.
      auto prefetch_next = [&] {
        if (MORE || (L.split && !meet) || rb + clusters >= L.row_blocks) return;
        const int64_t next = (rb + clusters) * L.rows_per_cta + th.group;
        if (next < L.rows)
          for_each_vec<ITEMS, full.value>(th, L, 0, [&](int k, int j) {
            prefetch_l2(a.x + next * a.x_stride + j * VEC);
            prefetch_l2(a.dy + next * a.dy_stride + j * VEC);
          });
      };
      // The row's sums, over its threads; for a split row phase 1 stores this
      // CTA's share, and phase 2 adds the shares in rank order (the same bits in
      // every CTA of the row).
      auto reduce = [&](auto& acc) {
        constexpr int K = sizeof(acc) / sizeof(float);
        float4* parts = L.split ? a.row_parts + r0 * L.cluster : nullptr;
        if (from_parts) {
#pragma unroll
          for (int k = 0; k < K; ++k) acc[k] = 0.f;
#pragma unroll 1 // as in meet_in_memory: unrolled, it made the row loop spill
          for (int r = 0; r < L.cluster; ++r) add_sums(acc, parts[r]);
          return;
        }
        // Row barriers in LayerNorm's backward only: RMSNorm's rows drift apart
        // less (barrier stalls 3.5% of samples against 9.6%), and its kernel lost
        // 1.5-5% to the switch's convergence checks at rows of one CTA (N >= 8192).
        if (meet) prefetch_next();
        row_sum<CENTER>(acc, L, th, sh, parity);
        if (meet) meet_in_memory(acc, parts, a.arrived + r0, L, th, meet_lanes);
        if (sums_only && valid && threadIdx.x % L.tpr == 0) parts[th.rank] = pack_sums(acc);
      };
      float mean = 0.f, rstd, sum_gxm, mean_g = 0.f;
      if constexpr (SAVED) {
        // The forward's statistics: pass 1 only sums g*(x - mean) and g.
        const float2 st = a.stats[r0];
        if constexpr (CENTER) mean = st.x;
        rstd = st.y;
        float acc[CENTER ? 2 : 1] = {};
        for (int t = 0; t < L.tiles && !from_parts; ++t) {
          load_tile(t);
          if (!valid) continue;
          float tile[CENTER ? 2 : 1] = {}; // this tile's sums
          for_each_vec<ITEMS, full.value>(th, L, t, [&](int k, int j) {
            float w[VEC];
            load_param(w, a.weight, j * VEC);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              const float g = __fmul_rn(gf(k, e), w[e]);
              tile[0] += g * (xf(k, e) - mean);
              if constexpr (CENTER) tile[1] += g;
            }
          });
          add_sums(acc, tile);
        }
        if (resident) load_grad_sum(0);
        reduce(acc);
        sum_gxm = acc[0];
        if constexpr (CENTER) mean_g = acc[1] * inv_n;
      } else {
        if (!from_parts) load_tile(0); // before the shift's load, as in the forward
        const float shift = CENTER && valid ? row_shift<T, T, VEC, false>(x, nullptr, L.cols) : 0.f;

        // acc: sum (x-s)^2 [stat], sum g*(x-s), and for LayerNorm sum g, sum (x-s) [stat].
        // g is rounded once (no fused multiply-add), the same in both passes.
        float acc[CENTER ? 4 : 2] = {};
        for (int t = 0; t < L.tiles && !from_parts; ++t) {
          if (t > 0) load_tile(t);
          if (!valid) continue;
          float tile[CENTER ? 4 : 2] = {}; // this tile's sums
          // One loop over the tile, so x is unpacked and shifted once per element.
          with_ragged_stats<VEC, !CENTER && !full.value>(L, [&](auto ragged) {
            for_each_vec<ITEMS, full.value>(th, L, t, [&](int k, int j) {
              const int col = j * VEC;
              float w[VEC];
              load_param(w, a.weight, col);
              const bool stat = full.value || col < L.stat_cols;
#pragma unroll
              for (int e = 0; e < VEC; ++e) {
                const float d = xf(k, e) - shift;
                if (stat_column(L, col, e, stat, ragged)) {
                  tile[0] += d * d;
                  if constexpr (CENTER) tile[3] += d;
                }
                const float g = __fmul_rn(gf(k, e), w[e]);
                tile[1] += g * d;
                if constexpr (CENTER) tile[2] += g;
              }
            });
          });
          add_sums(acc, tile);
        }
        if (resident) load_grad_sum(0);
        reduce(acc);
        float var = acc[0] * inv_k;
        sum_gxm = acc[1];
        if constexpr (CENTER) {
          const Moments mo = shifted_moments(shift, acc[3], acc[0], inv_k);
          mean = mo.mean;
          var = mo.var;
          sum_gxm -= (mean - shift) * acc[2]; // sum g*(x - mean)
          mean_g = acc[2] * inv_n;
        }
        rstd = rsqrtf(var + a.eps);
      }
      if (sums_only) continue;
      if (!meet) prefetch_next();
      // sum(g * xhat) / k; 1/k formed here, not held across the row loop
      // (inv_k spilled in the saved-statistics kernels, where this is its only use).
      const float c = sum_gxm * rstd * (1.f / static_cast<float>(L.stat_cols));

      // Output pass, compiled with and without grad_sum and ragged statistics
      // columns: no per-element test in the usual call.
      auto output_pass = [&](auto has_ds, auto ragged) {
        for (int t = 0; t < L.tiles; ++t) {
          if (!resident) {
            load_tile(t);
            if constexpr (has_ds.value) load_grad_sum(t);
          }
          if (!valid) continue;
          for_each_vec<ITEMS, full.value>(th, L, t, [&](int k, int j) {
            const int col = j * VEC;
            float w[VEC], dxv[VEC], xh[VEC], dv[VEC];
            load_param(w, a.weight, col);
            const bool stat = full.value || col < L.stat_cols;
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              // pRMSNorm: c for statistics columns only.
              const float ce = stat_column(L, col, e, stat, ragged) ? c : 0.f;
              const float xhat = (xf(k, e) - mean) * rstd;
              const float d = gf(k, e);
              // Exactly 0 for a constant row (xhat = 0, g = mean_g), as in torch.
              dxv[e] = rstd * fmaf(-xhat, ce, __fmul_rn(d, w[e]) - mean_g);
              if constexpr (has_ds.value) dxv[e] += sf(k, e);
              xh[e] = xhat;
              dv[e] = d;
            }
            store_floats(dx + col, dxv);
            if (dw_part) dw_acc.add(t * ITEMS + k, dv, xh);
            if constexpr (BIAS_GRAD) db_acc.add(t * ITEMS + k, dv);
          });
        }
      };
      with_ragged_stats<VEC, !CENTER && !full.value>(L, [&](auto ragged) {
        if (a.grad_sum != nullptr) output_pass(std::true_type{}, ragged);
        else output_pass(std::false_type{}, ragged);
      });
    }

  });

  // Shared-memory partials out: one row per cluster, the row groups of a CTA
  // summed pairwise.
  if (!sums_only) {
    auto flush = [&](const Part& acc, float* part) {
      if (L.rows_per_cta == 1) {
        for (int t = 0; t < L.tiles; ++t) {
          for_each_vec<ITEMS>(th, L, t, [&](int k, int j) {
#pragma unroll
            for (int q = 0; q < Part::QV; ++q) {
              Pack<float, Part::Q> c;
              load<false>(c, acc.chunk(t * ITEMS + k, q, threadIdx.x));
              store(part + j * VEC + q * Part::Q, c);
            }
          });
        }
        return;
      }
      __syncthreads();
      for (int col = threadIdx.x; col < L.cols; col += blockDim.x)
        part[col] = pairwise_sum(L.rows_per_cta, [&](int g) { return acc.at(g, col, L); });
    };
    if (dw_part) flush(dw_acc, dw_part);
    if constexpr (BIAS_GRAD) flush(db_acc, db_part);
  }
  cluster_exit_barrier(L);
}

// dweight/dbias = sum over the partial rows, cast once to the parameter
// dtype O. A block is blockDim.x lanes of V adjacent columns (16-byte loads
// when V == 4; the host checks the alignment) by blockDim.y slices: slice y
// sums rows y, y + blockDim.y, ... in order, then the slices are added in
// order (the same bits run to run). The host picks fewer lanes, so more
// slices, for narrow rows: 2048 columns make 64 blocks of 8 lanes, not 16 of
// 32, each thread with 4 rows to add instead of 17. blockIdx.y picks dweight
// (0) or dbias (1).
constexpr int kPartThreads = 512;
template <int V, typename O>
__global__ void __launch_bounds__(kPartThreads) sum_partials_kernel(const float* dw_part,
                                                                    const float* db_part,
                                                                    int64_t parts, int64_t cols,
                                                                    O* dw, O* db) {
  const float* part = blockIdx.y == 0 ? dw_part : db_part;
  O* result = blockIdx.y == 0 ? dw : db;
  if (part == nullptr) return;
  __shared__ Pack<float, V> slice[kPartThreads];
  const int lanes = blockDim.x, slices = blockDim.y;
  const int64_t col = (int64_t(blockIdx.x) * lanes + threadIdx.x) * V; // V | cols when V > 1
  Pack<float, V> s{};
  if (col < cols) {
#pragma unroll 4
    for (int64_t p = threadIdx.y; p < parts; p += slices) {
      Pack<float, V> v;
      load<false>(v, part + p * cols + col);
#pragma unroll
      for (int e = 0; e < V; ++e) s.v[e] += v.v[e];
    }
  }
  slice[threadIdx.y * lanes + threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float t[V] = {};
    for (int i = 0; i < slices; ++i) {
#pragma unroll
      for (int e = 0; e < V; ++e) t[e] += slice[i * lanes + threadIdx.x].v[e];
    }
    store_floats(result + col, t);
  }
}

} // namespace cuda
} // namespace normpass
