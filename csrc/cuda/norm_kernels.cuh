// The normpass CUDA kernels: one templated forward row kernel, one backward
// row kernel, and the small kernel that finishes dweight/dbias. Both row
// kernels are parametrized by centering (LayerNorm vs RMSNorm); the forward
// also by the fused residual add, the backward by whether dbias is wanted.
// Pure CUDA: the ATen glue is in norm_kernels.cu / norm_backward.cu.
#pragma once

#include "norm_row.cuh"

namespace normpass {
namespace cuda {

// Vectors per thread per tile. The forward keeps the row as packed input
// (8 x 16 bytes = 32 registers). The backward also holds dy and the fp32
// dweight (and dbias) partials, 8 more registers per fp32 column; 2 x 16-bit
// vectors with dbias keep it under the 128 registers that let 512 threads
// share an SM without spilling.
template <int VEC> __host__ __device__ constexpr int fwd_items() { return VEC == 1 ? 16 : 8; }
template <int VEC, bool BIAS_GRAD> __host__ __device__ constexpr int bwd_items() {
  return VEC == 1 ? 8 : (BIAS_GRAD && VEC == 8 ? 2 : 4);
}

// One thread's share of a row tile, packed in the storage type.
template <typename T, int VEC, int ITEMS>
struct Frag {
  Pack<T, VEC> v[ITEMS];
  __device__ __forceinline__ float operator()(int k, int e) const { return to_float(v[k].v[e]); }
};

// ---------------------------------------------------------------------------
// Forward: y = (h - mean) * rstd * (w + offset) + b, h = x or round(x + r).
template <typename T, typename W, typename O>
struct FwdArgs {
  const T* x;
  const T* residual; // RESIDUAL only
  const W* weight;   // may be null
  const W* bias;     // may be null
  O* out;            // contiguous (rows, cols)
  T* sum;            // RESIDUAL only, contiguous
  int64_t x_stride, r_stride;
  float eps, weight_offset;
  RowLayout layout;
};

template <typename T, typename W, typename O, int VEC, bool CENTER, bool RESIDUAL>
__global__ void __launch_bounds__(kMaxThreads) norm_fwd_kernel(const FwdArgs<T, W, O> a) {
  constexpr int ITEMS = fwd_items<VEC>();
  const RowLayout& L = a.layout;
  const RowThread th(L);
  __shared__ ReduceSmem sh;
  int parity = 0;
  const bool resident = L.tiles == 1;

  for (int64_t rb = blockIdx.x / L.cluster; rb < L.row_blocks; rb += gridDim.x / L.cluster) {
    const int64_t row = rb * L.rows_per_cta + th.group;
    // Threads of a missing row (last row block) still join the reductions.
    const bool valid = row < L.rows;
    const int64_t r0 = valid ? row : 0;
    const T* x = a.x + r0 * a.x_stride;
    const T* r = RESIDUAL ? a.residual + r0 * a.r_stride : nullptr;
    T* sum = RESIDUAL ? a.sum + r0 * L.cols : nullptr;
    O* out = a.out + r0 * L.cols;
    Frag<T, VEC, ITEMS> h;

    // Tile t into h. The first pass reads x (+ residual, rounded to T and
    // stored to `sum`, as eager `x + residual` would); later passes over a
    // non-resident row re-read that rounded sum.
    auto load_tile = [&](int t, bool first_pass) {
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
        const int64_t j = th.vec<ITEMS>(t, k);
        if (!valid || j >= L.nvec) continue;
        if (RESIDUAL && !first_pass) {
          load<false>(h.v[k], sum + j * VEC); // written by this kernel: no read-only path
        } else if (RESIDUAL) {
          Pack<T, VEC> xv, rv;
          load(xv, x + j * VEC);
          load(rv, r + j * VEC);
#pragma unroll
          for (int e = 0; e < VEC; ++e)
            h.v[k].v[e] = from_float<T>(to_float(xv.v[e]) + to_float(rv.v[e]));
          store(sum + j * VEC, h.v[k]);
        } else {
          load(h.v[k], x + j * VEC);
        }
      }
    };
    // Statistics of tile t; nothing for a missing row.
    auto stat = [&](int t, auto f) { return valid ? stat_sum<ITEMS, VEC>(th, L, t, f) : 0.f; };

    if (resident) load_tile(0, true);
    bool first_pass = true;
    const float inv_k = 1.f / static_cast<float>(L.stat_cols);

    float mean = 0.f;
    if constexpr (CENTER) {
      float s[1] = {0.f};
      for (int t = 0; t < L.tiles; ++t) {
        if (!resident) load_tile(t, first_pass);
        s[0] += stat(t, [&](int k, int e) { return h(k, e); });
      }
      first_pass = false;
      row_sum(s, L, sh, parity);
      mean = s[0] * inv_k;
    }

    // Centered second moment (not E[x^2] - mean^2: no cancellation).
    float ss[1] = {0.f};
    for (int t = 0; t < L.tiles; ++t) {
      if (!resident) load_tile(t, first_pass);
      ss[0] += stat(t, [&](int k, int e) {
        const float d = h(k, e) - mean;
        return d * d;
      });
    }
    row_sum(ss, L, sh, parity);
    const float rstd = rsqrtf(ss[0] * inv_k + a.eps);

    for (int t = 0; t < L.tiles; ++t) {
      if (!resident) load_tile(t, false);
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
        const int64_t j = th.vec<ITEMS>(t, k);
        if (!valid || j >= L.nvec) continue;
        float w[VEC], b[VEC];
        load_scale(w, a.weight, j * VEC, a.weight_offset);
        load_bias(b, a.bias, j * VEC);
        Pack<O, VEC> y;
#pragma unroll
        for (int e = 0; e < VEC; ++e) y.v[e] = from_float<O>((h(k, e) - mean) * rstd * w[e] + b[e]);
        store(out + j * VEC, y);
      }
    }
  }
  cluster_exit_barrier(L);
}

// ---------------------------------------------------------------------------
// Backward. Per row: the mean (LayerNorm), then one reduction of
//   (sum over stat columns of (x-mean)^2, sum g*(x-mean), sum g),
// g = dy * (w + offset), which gives rstd and the two terms of
//   dx = rstd * (g - mean(g) - xhat * sum(g*xhat) / k) (+ grad_sum).
// dweight/dbias: fp32 partials that stay in registers across all rows a
// cluster visits (persistent grid) and are written once, one row of
// `partials` per cluster; a row too long for registers adds into its
// cluster's partial row in memory instead. Either way each partial element
// has one owner thread and a fixed summation order: deterministic.
template <typename T, typename W>
struct BwdArgs {
  const T* dy;
  const T* x;
  const W* weight;   // may be null
  const T* grad_sum; // may be null
  T* dx;             // contiguous
  float* dw_part;    // (clusters, cols) or null
  float* db_part;    // (clusters, cols) or null (BIAS_GRAD only)
  int64_t dy_stride, x_stride, ds_stride;
  float eps, weight_offset;
  RowLayout layout;
};

template <typename T, typename W, int VEC, bool CENTER, bool BIAS_GRAD>
__global__ void __launch_bounds__(kMaxThreads) norm_bwd_kernel(const BwdArgs<T, W> a) {
  constexpr int ITEMS = bwd_items<VEC, BIAS_GRAD>();
  constexpr int DB_ITEMS = BIAS_GRAD ? ITEMS : 1;
  const RowLayout& L = a.layout;
  const RowThread th(L);
  __shared__ ReduceSmem sh;
  extern __shared__ float merge[]; // (rows_per_cta, cols), only when rows_per_cta > 1
  int parity = 0;
  const bool resident = L.tiles == 1;
  const int64_t cluster_id = blockIdx.x / L.cluster;
  const int64_t clusters = gridDim.x / L.cluster;
  const float inv_k = 1.f / static_cast<float>(L.stat_cols);
  const float inv_n = 1.f / static_cast<float>(L.cols);

  float dw[ITEMS][VEC], db[DB_ITEMS][VEC];
#pragma unroll
  for (int k = 0; k < ITEMS; ++k)
#pragma unroll
    for (int e = 0; e < VEC; ++e) dw[k][e] = 0.f;
#pragma unroll
  for (int k = 0; k < DB_ITEMS; ++k)
#pragma unroll
    for (int e = 0; e < VEC; ++e) db[k][e] = 0.f;

  bool first_row = true; // non-resident rows: the first one stores its partials
  for (int64_t rb = cluster_id; rb < L.row_blocks; rb += clusters) {
    const int64_t row = rb * L.rows_per_cta + th.group;
    const bool valid = row < L.rows;
    const int64_t r0 = valid ? row : 0;
    const T* x = a.x + r0 * a.x_stride;
    const T* dy = a.dy + r0 * a.dy_stride;
    const T* ds = a.grad_sum ? a.grad_sum + r0 * a.ds_stride : nullptr;
    T* dx = a.dx + r0 * L.cols;
    Frag<T, VEC, ITEMS> xf, gf;

    auto load_tile = [&](int t) {
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
        const int64_t j = th.vec<ITEMS>(t, k);
        if (!valid || j >= L.nvec) continue;
        load(xf.v[k], x + j * VEC);
        load(gf.v[k], dy + j * VEC);
      }
    };
    auto stat = [&](int t, auto f) { return valid ? stat_sum<ITEMS, VEC>(th, L, t, f) : 0.f; };
    if (resident) load_tile(0);

    float mean = 0.f;
    if constexpr (CENTER) {
      float s[1] = {0.f};
      for (int t = 0; t < L.tiles; ++t) {
        if (!resident) load_tile(t);
        s[0] += stat(t, [&](int k, int e) { return xf(k, e); });
      }
      row_sum(s, L, sh, parity);
      mean = s[0] * inv_k;
    }

    // acc: sum (x-mean)^2 [stat columns], sum g*(x-mean), sum g [LayerNorm].
    float acc[CENTER ? 3 : 2] = {};
    for (int t = 0; t < L.tiles; ++t) {
      if (!resident) load_tile(t);
      acc[0] += stat(t, [&](int k, int e) {
        const float d = xf(k, e) - mean;
        return d * d;
      });
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
        const int64_t j = th.vec<ITEMS>(t, k);
        if (!valid || j >= L.nvec) continue;
        float w[VEC];
        load_scale(w, a.weight, j * VEC, a.weight_offset);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float g = gf(k, e) * w[e];
          acc[1] += g * (xf(k, e) - mean);
          if constexpr (CENTER) acc[2] += g;
        }
      }
    }
    row_sum(acc, L, sh, parity);
    const float rstd = rsqrtf(acc[0] * inv_k + a.eps);
    const float c = acc[1] * rstd * inv_k; // sum(g * xhat) / k
    float mean_g = 0.f;
    if constexpr (CENTER) mean_g = acc[2] * inv_n;

    for (int t = 0; t < L.tiles; ++t) {
      if (!resident) load_tile(t);
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
        const int64_t j = th.vec<ITEMS>(t, k);
        if (!valid || j >= L.nvec) continue;
        const int64_t col = j * VEC;
        float w[VEC], gs[VEC];
        load_scale(w, a.weight, col, a.weight_offset);
        Pack<T, VEC> out;
        if (ds != nullptr) {
          Pack<T, VEC> p;
          load(p, ds + col);
#pragma unroll
          for (int e = 0; e < VEC; ++e) gs[e] = to_float(p.v[e]);
        }
        float* dwp = a.dw_part ? a.dw_part + cluster_id * L.cols + col : nullptr;
        float* dbp = BIAS_GRAD ? a.db_part + cluster_id * L.cols + col : nullptr;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float xhat = (xf(k, e) - mean) * rstd;
          const float d = gf(k, e);
          const float g = d * w[e];
          float v = rstd * (g - mean_g - (col + e < L.stat_cols ? xhat * c : 0.f));
          if (ds != nullptr) v += gs[e];
          out.v[e] = from_float<T>(v);
          if (resident) {
            dw[k][e] += d * xhat;
            if (BIAS_GRAD) db[BIAS_GRAD ? k : 0][e] += d;
          } else {
            // This cluster's own partial row: no other thread touches it.
            if (dwp) dwp[e] = (first_row ? 0.f : dwp[e]) + d * xhat;
            if (BIAS_GRAD) dbp[e] = (first_row ? 0.f : dbp[e]) + d;
          }
        }
        store(dx + col, out);
      }
    }
    first_row = false;
  }

  // Register partials out: one row per cluster. Several rows per CTA first
  // merge through shared memory, in row order.
  if (resident) {
    auto flush = [&](float* part, auto&& value) {
      if (L.rows_per_cta == 1) {
#pragma unroll
        for (int k = 0; k < ITEMS; ++k) {
          const int64_t j = th.vec<ITEMS>(0, k);
          if (j >= L.nvec) continue;
#pragma unroll
          for (int e = 0; e < VEC; ++e)
            if (j * VEC + e < L.cols) part[cluster_id * L.cols + j * VEC + e] = value(k, e);
        }
        return;
      }
      float* mine = merge + int64_t(th.group) * L.cols;
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
        const int64_t j = th.vec<ITEMS>(0, k);
        if (j >= L.nvec) continue;
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          if (j * VEC + e < L.cols) mine[j * VEC + e] = value(k, e);
      }
      __syncthreads();
      for (int64_t col = threadIdx.x; col < L.cols; col += blockDim.x) {
        float s = 0.f;
        for (int g = 0; g < L.rows_per_cta; ++g) s += merge[g * L.cols + col];
        part[cluster_id * L.cols + col] = s;
      }
      __syncthreads(); // merge[] is reused by the next flush
    };
    if (a.dw_part) flush(a.dw_part, [&](int k, int e) { return dw[k][e]; });
    if constexpr (BIAS_GRAD) flush(a.db_part, [&](int k, int e) { return db[k][e]; });
  }
  cluster_exit_barrier(L);
}

// dweight/dbias = sum over the partial rows, in row order. blockIdx.y picks
// dweight (0) or dbias (1); each block sums 32 columns with 16 row slices.
__global__ void __launch_bounds__(512) sum_partials_kernel(const float* dw_part, const float* db_part,
                                                           int64_t parts, int64_t cols, float* dw,
                                                           float* db) {
  const float* part = blockIdx.y == 0 ? dw_part : db_part;
  float* result = blockIdx.y == 0 ? dw : db;
  if (part == nullptr) return;
  __shared__ float slice[16][33];
  const int64_t col = int64_t(blockIdx.x) * 32 + threadIdx.x;
  float s = 0.f;
  if (col < cols)
    for (int64_t p = threadIdx.y; p < parts; p += 16) s += part[p * cols + col];
  slice[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float t = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) t += slice[i][threadIdx.x];
    result[col] = t;
  }
}

} // namespace cuda
} // namespace normpass
