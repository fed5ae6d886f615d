// Row machinery shared by the forward and backward CUDA kernels.
//
// One row is handled by `tpr` threads of a CTA (a power of two or whole warps), or, when it
// is too long for one CTA, by a cluster of `cluster` CTAs (Hopper). Each
// thread owns ITEMS vectors of VEC elements, strided by the threads of the row
// so that a warp's accesses are contiguous. When the whole row fits
// (`tiles == 1`) it stays in registers between the statistics and the output
// pass, so every byte is read from memory once; longer rows are walked in
// `tiles` passes, re-reading from L2.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace normpass {
namespace cuda {

constexpr int kMaxThreads = 512; // per CTA, but for the forward's wide CTA (kFwdWideThreads)
constexpr int kMaxWarps = kMaxThreads / 32;

// ---------------------------------------------------------------------------
// Element conversion. Storage types are the CUDA ones (__half,
// __nv_bfloat16); all arithmetic is in fp32.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---------------------------------------------------------------------------
// N elements of T moved as whole machine words: one 16-byte access per 16
// bytes (two for 8 fp32 weights), a plain scalar access when N == 1.
template <int BYTES> struct Word;
template <> struct Word<2> { using type = unsigned short; };
template <> struct Word<4> { using type = unsigned int; };
template <> struct Word<8> { using type = uint2; };
template <> struct Word<16> { using type = uint4; };

template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
  static constexpr int kBytes = sizeof(T) * N;
  static constexpr int kWordBytes = kBytes < 16 ? kBytes : 16;
  using W = typename Word<kWordBytes>::type;
  static constexpr int kWords = kBytes / kWordBytes;
};

// NC: through the read-only path; only for memory this kernel does not write.
template <bool NC = true, typename T, int N>
__device__ __forceinline__ void load(Pack<T, N>& p, const T* src) {
  using P = Pack<T, N>;
  auto* s = reinterpret_cast<const typename P::W*>(src);
  auto* d = reinterpret_cast<typename P::W*>(&p);
#pragma unroll
  for (int i = 0; i < P::kWords; ++i) d[i] = NC ? __ldg(s + i) : s[i];
}

// A load into a pack of another type S: each element converted (the plain load when S is T).
template <typename S, typename T, int N>
__device__ __forceinline__ void load_as(Pack<S, N>& p, const T* src) {
  if constexpr (std::is_same_v<S, T>) {
    load(p, src);
  } else {
    Pack<T, N> raw;
    load(raw, src);
#pragma unroll
    for (int e = 0; e < N; ++e) p.v[e] = from_float<S>(to_float(raw.v[e]));
  }
}

template <typename T, int N>
__device__ __forceinline__ void store(T* dst, const Pack<T, N>& p) {
  using P = Pack<T, N>;
  auto* s = reinterpret_cast<const typename P::W*>(&p);
  auto* d = reinterpret_cast<typename P::W*>(dst);
#pragma unroll
  for (int i = 0; i < P::kWords; ++i) d[i] = s[i];
}

// Asks L2 for the line holding p: no register waits for it.
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// p, hidden from the compiler's arithmetic: an address p + j * VEC is then
// one IMAD.WIDE per vector, where the compiler otherwise re-adds the 64-bit
// row offset to each vector's (four instructions). The backward's rows only:
// LayerNorm backward 37.8 -> 35.8 instructions per element with the changes
// of v28 (benchmarks/NOTES.md); the forward's measured 1-10% slower with it.
template <typename P>
__device__ __forceinline__ P* row_base(P* p) {
  asm("" : "+l"(p));
  return p;
}

// Element e of a pack as fp32. A bf16 is the top half of an fp32, so the
// pair sharing a 32-bit word unpacks with one shift and one mask (the
// intrinsic extracts the odd one first: two instructions).
template <typename T, int N>
__device__ __forceinline__ float element(const Pack<T, N>& p, int e) {
  if constexpr (std::is_same_v<T, __nv_bfloat16> && N % 2 == 0) {
    const uint32_t w = reinterpret_cast<const uint32_t*>(p.v)[e / 2];
    return __uint_as_float(e % 2 == 0 ? w << 16 : w & 0xffff0000u);
  } else {
    return to_float(p.v[e]);
  }
}

// A parameter vector (weight or bias; not null) as fp32.
template <typename W, int N>
__device__ __forceinline__ void load_param(float (&out)[N], const W* p, int col) {
  Pack<W, N> v;
  load(v, p + col);
#pragma unroll
  for (int e = 0; e < N; ++e) out[e] = element(v, e);
}

// Stores N fp32 values as O, two per conversion instruction for 16-bit O.
template <typename O, int N>
__device__ __forceinline__ void store_floats(O* dst, const float (&v)[N]) {
  Pack<O, N> p;
#pragma unroll
  for (int e = 0; e < N; ++e) {
    if constexpr (std::is_same_v<O, __nv_bfloat16> && N % 2 == 0) {
      if (e % 2 == 0) *reinterpret_cast<__nv_bfloat162*>(&p.v[e]) = __floats2bfloat162_rn(v[e], v[e + 1]);
    } else if constexpr (std::is_same_v<O, __half> && N % 2 == 0) {
      if (e % 2 == 0) *reinterpret_cast<__half2*>(&p.v[e]) = __floats2half2_rn(v[e], v[e + 1]);
    } else {
      p.v[e] = from_float<O>(v[e]);
    }
  }
  store(dst, p);
}

// One thread's share of a row tile, packed in the storage type.
template <typename T, int VEC, int ITEMS>
struct Frag {
  Pack<T, VEC> v[ITEMS];
  __device__ __forceinline__ float operator()(int k, int e) const { return element(v[k], e); }
};

// ---------------------------------------------------------------------------
// Where a thread's data lies. Chosen on the host (choose_layout), uniform
// over the grid.
struct RowLayout {
  int64_t rows;       // M
  int64_t row_blocks; // ceil(rows / rows_per_cta): the units the grid loops over
  int cols;           // N (column indices are 32-bit; row offsets are 64-bit)
  int stat_cols;      // columns the statistics cover (pRMSNorm), <= cols
  int nvec;           // vectors per row
  int tpr;            // threads per row inside one CTA (a power of two or whole warps)
  int rows_per_cta;   // blockDim.x / tpr, a power of two
  int cluster;        // CTAs per row (1 unless the row needs more than one CTA)
  int tiles;          // passes per row phase; 1 = the row is register resident
  bool split;         // the row's CTAs are no hardware cluster: their sums meet in
                      // global memory, in one cooperative launch or between two
                      // (backward only)
  bool full;          // every thread has all its vectors in every tile, and
                      // every column is a statistics column
};

// A thread's position: which row of the row block, and which vectors of it.
struct RowThread {
  int group;  // row inside the CTA's row block
  int rank;   // CTA rank in the cluster
  int first;  // first vector index this thread owns in tile 0
  int stride; // threads per row (vector index step between items)

  __device__ explicit RowThread(const RowLayout& L)
      : group(threadIdx.x / L.tpr),
        rank(L.cluster > 1 ? blockIdx.x % L.cluster : 0),
        first(rank * L.tpr + threadIdx.x % L.tpr),
        stride(L.tpr * L.cluster) {}

  // Vector index of item k in tile t (ITEMS items per tile per thread).
  template <int ITEMS>
  __device__ __forceinline__ int vec(int t, int k) const { return (t * ITEMS + k) * stride + first; }
};

// ---------------------------------------------------------------------------
// Sum of K values over the threads of a row (sub-warp, CTA, cluster), in a
// fixed order: every thread of the row gets the same bits, run to run.
// Two alternating buffers make one barrier per reduction enough: a buffer is
// rewritten only two reductions later, after every reader has passed the
// barrier in between.
constexpr int kMaxSums = 4;
template <int WARPS>
struct ReduceSmemOf {
  float4 warp[2][WARPS]; // a warp's K <= 4 sums, read back as one vector
  float cta[2][kMaxSums];
};
using ReduceSmem = ReduceSmemOf<kMaxWarps>;

// K <= 4 sums as one float4 (the rest 0), and added back from one.
template <int K>
__device__ __forceinline__ float4 pack_sums(const float (&v)[K]) {
  float s[4] = {};
#pragma unroll
  for (int k = 0; k < K; ++k) s[k] = v[k];
  return make_float4(s[0], s[1], s[2], s[3]);
}
template <int K>
__device__ __forceinline__ void add_sums(float (&v)[K], const float4 s) {
  const float sk[4] = {s.x, s.y, s.z, s.w};
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] += sk[k];
}
template <int K>
__device__ __forceinline__ void add_sums(float (&v)[K], const float (&s)[K]) {
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] += s[k];
}

// A row's own barrier, for a row of several warps that shares its CTA with
// up to kMaxBarrierRows - 1 others: one row's slow loads then hold up no other
// row (backward: bf16 LayerNorm 2048 138 -> 131 us). The ids are immediates:
// ptxas reserves the barriers a kernel names, and a register id reserves all
// 16, which cost the forward's short rows 14% (fewer CTAs per SM). The switch
// has its own cost: ptxas guards the shuffles after it with convergence
// checks (benchmarks/NOTES.md, fourteenth stop).
constexpr int kMaxBarrierRows = 4;
__device__ __forceinline__ void row_barrier(int group, int threads) {
  switch (group) {
    case 0: asm volatile("bar.sync 1, %0;" ::"r"(threads) : "memory"); break;
    case 1: asm volatile("bar.sync 2, %0;" ::"r"(threads) : "memory"); break;
    case 2: asm volatile("bar.sync 3, %0;" ::"r"(threads) : "memory"); break;
    default: asm volatile("bar.sync 4, %0;" ::"r"(threads) : "memory"); break;
  }
}

// ROW_BARRIERS: rows of several warps sharing a CTA wait at their own barrier
// (the backward; in the forward, whose rows per CTA are at most 2, the switch
// made LayerNorm spill, so it was not measured there). Each row's warps write
// their own slots of sh.warp, so the alternating buffers stay safe.
template <bool ROW_BARRIERS, int K, int WARPS>
__device__ __forceinline__ void row_sum(float (&v)[K], const RowLayout& L, const RowThread& th,
                                        ReduceSmemOf<WARPS>& sh, int& parity) {
  static_assert(K <= kMaxSums, "row_sum: too many values");
  // The butterfly unrolled, each level skipped (uniformly) past the row's
  // width: 6 instructions per level, where a loop over the width took 9.
  const int width = L.tpr < 32 ? L.tpr : 32;
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    if (off < width) {
#pragma unroll
      for (int k = 0; k < K; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
    }
  }
  if (L.tpr > 32) {
    const int warp = threadIdx.x / 32, nwarps = L.tpr / 32;
    const int first = th.group * nwarps; // not threadIdx.x / L.tpr: a division per row
    if (threadIdx.x % 32 == 0) sh.warp[parity][warp] = pack_sums(v);
    if (ROW_BARRIERS && L.rows_per_cta > 1)
      row_barrier(th.group, L.tpr);
    else
      __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = 0.f;
    for (int w = 0; w < nwarps; ++w) add_sums(v, sh.warp[parity][first + w]);
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (L.cluster > 1 && !L.split) {
    // Rows split over a cluster: combine the CTAs' sums through distributed
    // shared memory (rows_per_cta == 1 here, so v is the CTA's total).
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    if (threadIdx.x == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) sh.cta[parity][k] = v[k];
    }
    cluster.sync();
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = 0.f;
    for (int r = 0; r < L.cluster; ++r) {
      const float* remote = cluster.map_shared_rank(&sh.cta[parity][0], r);
#pragma unroll
      for (int k = 0; k < K; ++k) v[k] += remote[k];
    }
  }
#else
  // Code JIT-compiled from pre-sm_90 PTX (an "8.0+PTX" build on Hopper) has no cluster sum, while
  // the host, reading the device's compute capability, may launch clusters: fail, never a wrong sum.
  if (L.cluster > 1 && !L.split) __trap();
#endif
  parity ^= 1;
}

// A CTA must not exit while its cluster peers may still read its shared
// memory (the last row_sum).
__device__ __forceinline__ void cluster_exit_barrier(const RowLayout& L) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (L.cluster > 1 && !L.split) cooperative_groups::this_cluster().sync();
#endif
}

// The sums of a split row whose CTAs are co-resident (a cooperative launch):
// each CTA stores its share v (a CTA total: rows_per_cta == 1) to parts[rank]
// and counts itself in at the row's counter `arrived`; the first warp waits
// for all L.cluster shares, lane i adds shares i, i + 32, ... in order, the
// lanes' sums meet in an xor butterfly (a step adds a + b on one lane and
// b + a on its partner: every lane, and so every CTA, ends with the same
// bits), and the total reaches the CTA through shared memory (H100: LayerNorm
// 262144 forward+backward bf16 1.70 -> 1.80 TB/s, fp32 1.83 -> 1.94; every
// thread adding the 32 lanes' sums in turn held ~9% of the stall samples).
// Every lane stores its copy: with one slot the kernel's static shared memory
// fell by 496 bytes and bf16 RMSNorm 262144 (no meet) lost 6%, likely through
// the driver's carveout (two CTAs of 64 KiB partials then fit in 132 KiB).
__device__ __forceinline__ int load_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
constexpr int kMeetLanes = 32;
template <int K>
__device__ __forceinline__ void meet_in_memory(float (&v)[K], float4* parts, int* arrived,
                                               const RowLayout& L, const RowThread& th,
                                               float4 (&lanes)[kMeetLanes]) {
  if (threadIdx.x == 0) {
    parts[th.rank] = pack_sums(v);
    __threadfence();
    atomicAdd(arrived, 1);
  }
  if (threadIdx.x < 32) {
    while (load_acquire(arrived) < L.cluster) __nanosleep(32);
    float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
    // Not unrolled (a lane rarely has two shares): the unrolled copy's hoisted
    // 64-bit offsets were held across the backward's row loop and spilled.
#pragma unroll 1
    for (int r = threadIdx.x; r < L.cluster; r += 32) {
      const float4 p = __ldcg(parts + r);
      s.x += p.x, s.y += p.y, s.z += p.z, s.w += p.w;
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) {
      s.x += __shfl_xor_sync(0xffffffffu, s.x, o);
      s.y += __shfl_xor_sync(0xffffffffu, s.y, o);
      s.z += __shfl_xor_sync(0xffffffffu, s.z, o);
      s.w += __shfl_xor_sync(0xffffffffu, s.w, o);
    }
    lanes[threadIdx.x] = s; // the same bits in every lane
  }
  // The next writer of `lanes` is the next row's first warp, after that row's
  // row_sum barrier, which every reader below has passed.
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = 0.f;
  add_sums(v, lanes[0]);
}

// Calls f(std::true_type) for full layouts (RowLayout::full), else
// f(std::false_type): the row loop is compiled once without per-vector and
// per-column tests, for the usual N (powers of two, and rows of whole warps),
// and once with them.
template <typename F>
__device__ __forceinline__ void with_full_rows(const RowLayout& L, F&& f) {
  if (L.full) f(std::true_type{});
  else f(std::false_type{});
}

// Calls f(std::true_type) when the statistics columns end inside a vector
// (pRMSNorm with such p), else f(std::false_type): the per-element column
// test is compiled only into the code that needs it, and only for kernels
// that can meet it (PARTIAL: RMSNorm; LayerNorm's extra copy measured 1-3%
// slower, as code size).
template <int VEC, bool PARTIAL, typename F>
__device__ __forceinline__ void with_ragged_stats(const RowLayout& L, F&& f) {
  if constexpr (PARTIAL && VEC > 1) {
    if (L.stat_cols % VEC != 0) {
      f(std::true_type{});
      return;
    }
  }
  f(std::false_type{});
}

// Whether element e of the vector starting at column col is a statistics
// column; `in` is col < stat_cols, the whole answer unless ragged.
template <typename Ragged>
__device__ __forceinline__ bool stat_column(const RowLayout& L, int col, int e, bool in, Ragged) {
  return Ragged::value ? col + e < L.stat_cols : in;
}

// f(k, e) for the elements of tile t inside the statistics columns (all of
// them unless pRMSNorm): vector k, element e. FULL: the layout is full, no
// test is needed.
template <int ITEMS, int VEC, bool FULL = false, typename Ragged, typename F>
__device__ __forceinline__ void for_each_stat(const RowThread& th, const RowLayout& L, int t, Ragged ragged,
                                              F&& f) {
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int col = th.vec<ITEMS>(t, k) * VEC;
    if (!FULL && col >= L.stat_cols) continue;
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      if (stat_column(L, col, e, true, ragged)) f(k, e);
  }
}

// f(k, j) for the vectors of tile t that exist (all, if FULL): item k, vector index j.
template <int ITEMS, bool FULL = false, typename F>
__device__ __forceinline__ void for_each_vec(const RowThread& th, const RowLayout& L, int t, F&& f) {
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int j = th.vec<ITEMS>(t, k);
    if (FULL || j < L.nvec) f(k, j);
  }
}

// Mean and variance from sums of (h - shift) and (h - shift)^2 over k
// columns. The shift is near the row's mean (row_shift), so the difference
// below loses little to cancellation; it lets LayerNorm take both moments in
// one reduction.
struct Moments {
  float mean, var;
};
__device__ __forceinline__ Moments shifted_moments(float shift, float s1, float s2, float inv_k) {
  const float d = s1 * inv_k;
  return {shift + d, fmaxf(s2 * inv_k - d * d, 0.f)};
}

// LayerNorm's shift: the mean of the row's first 8 elements (all, if fewer)
// of h = x, or of round(x + r) as the kernels normalize it; one 16-byte load
// for 16-bit rows. The variance above loses (1 + (mean - shift)^2 / var)
// times the sums' rounding error: with x[0] alone, up to 3 standard
// deviations off, fp32 rows of 2^20 missed the parity bound.
template <typename T, typename R, int VEC, bool RESIDUAL>
__device__ __forceinline__ float row_shift(const T* x, const R* r, int cols) {
  constexpr int kMaxLoads = VEC >= 8 ? 1 : 8 / VEC;
  const int loads = cols / VEC < kMaxLoads ? cols / VEC : kMaxLoads; // VEC > 1: VEC | cols
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxLoads; ++i) {
    if (i >= loads) break;
    Pack<T, VEC> xv;
    Pack<R, VEC> rv;
    load(xv, x + i * VEC);
    if constexpr (RESIDUAL) load(rv, r + i * VEC);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float h = element(xv, e);
      s += RESIDUAL ? to_float(from_float<T>(h + element(rv, e))) : h;
    }
  }
  return s / static_cast<float>(loads * VEC);
}

// ---------------------------------------------------------------------------
// Host side: the layout for a row of `cols` elements.
inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p *= 2;
  return p;
}

// Threads a row of `cols` elements needs at `items` vectors of `vec` per thread.
inline int64_t row_threads(int64_t cols, int vec, int items) {
  return ((cols + vec - 1) / vec + items - 1) / items;
}

struct LaunchShape {
  RowLayout layout;
  int threads; // blockDim.x
};

// A row longer than one CTA of max_threads goes to a cluster of CTAs walking
// it in `cluster_tiles` tiles: fewer, busier CTAs pay the per-row cluster
// barrier less often, and the second tile's re-read hits L2.
inline LaunchShape choose_layout(int64_t rows, int64_t cols, int64_t stat_cols, int vec, int items,
                                 int max_cluster, int min_threads, int max_threads,
                                 int cluster_tiles = 1, bool round_to_warps = false) {
  RowLayout L{};
  L.rows = rows;
  L.cols = static_cast<int>(cols);
  L.stat_cols = static_cast<int>(stat_cols);
  L.nvec = static_cast<int>((cols + vec - 1) / vec);
  const int64_t need = row_threads(cols, vec, items);
  if (need <= max_threads) {
    // A row of whole warps keeps its width, so every thread holds `items`
    // vectors (bf16 N = 5120: 160 threads, where 256 held 2.5 on average;
    // RMSNorm forward 3.10 -> 3.73 TB/s). round_to_warps rounds any row wider
    // than a warp up to whole warps (bf16 N = 4608: 160 threads, not 256;
    // forward +19%); the backward keeps the power of two, which won there at
    // 2304-2560 (benchmarks/NOTES.md, thirteenth and fourteenth stops).
    L.cluster = 1;
    const bool whole = need % 32 == 0 || (round_to_warps && need > 32);
    L.tpr = whole ? static_cast<int>((need + 31) / 32 * 32) : next_pow2(need);
  } else {
    const int64_t per_cta = int64_t(max_threads) * cluster_tiles;
    const int64_t c = (need + per_cta - 1) / per_cta;
    L.cluster = static_cast<int>(c < max_cluster ? c : max_cluster);
    L.tpr = next_pow2((need + L.cluster - 1) / L.cluster);
    if (L.tpr > max_threads) L.tpr = max_threads;
    const int64_t c2 = (need + L.tpr - 1) / L.tpr; // fewest CTAs at this width
    if (c2 < L.cluster) L.cluster = static_cast<int>(c2);
  }
  const int64_t per_tile = int64_t(L.tpr) * L.cluster * items;
  L.tiles = static_cast<int>((L.nvec + per_tile - 1) / per_tile);
  L.full = L.nvec == L.tiles * per_tile && L.stat_cols == L.cols;
  // Short rows: several per CTA, so a CTA still has min_threads threads; a
  // power of two of them (the backward sums its row groups pairwise).
  L.rows_per_cta = next_pow2((min_threads + L.tpr - 1) / L.tpr);
  const int threads = L.rows_per_cta * L.tpr;
  L.row_blocks = (rows + L.rows_per_cta - 1) / L.rows_per_cta;
  return {L, threads};
}

} // namespace cuda
} // namespace normpass
