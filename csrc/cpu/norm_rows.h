// Row kernels of the CPU normalization, written as plain loops the compiler
// vectorizes. norm_kernels.cpp includes this file once per instruction set,
// each time inside its own namespace and with NP_TARGET set to that set's
// target attribute, then picks one at run time. So this file includes
// nothing and every function carries NP_TARGET: code inlined into it is
// compiled for that target, and nothing here is shared between targets.
//
// Expects, from the includer: <cstdint>, <cstring>, <cmath>, <type_traits>, <utility>,
// c10::BFloat16, c10::Half, at::opmath_type, ForwardArgs, BackwardArgs and kBackwardRows.

// ---- element loads and stores, in the accumulation type -------------------

template <typename T>
NP_TARGET inline at::opmath_type<T> load(const T* p, int64_t i) {
  return p[i];
}

template <>
NP_TARGET inline float load(const c10::BFloat16* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Exponent rebias by one multiply (normals and subnormals alike), inf/NaN by
// a mask (not `?:`, which GCC leaves as a branch): so it vectorizes.
template <>
NP_TARGET inline float load(const c10::Half* p, int64_t i) {
  const uint32_t h = reinterpret_cast<const uint16_t*>(p)[i];
  const uint32_t magnitude = (h & UINT32_C(0x7FFF)) << 13;
  float scaled;
  std::memcpy(&scaled, &magnitude, sizeof(scaled));
  scaled *= 0x1p112f;
  uint32_t bits;
  std::memcpy(&bits, &scaled, sizeof(bits));
  const uint32_t inf_nan = 0u - static_cast<uint32_t>(magnitude >= (UINT32_C(0x7C00) << 13));
  bits = (bits & ~inf_nan) | ((magnitude | UINT32_C(0x7F800000)) & inf_nan);
  bits |= (h & UINT32_C(0x8000)) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename T, typename A>
NP_TARGET inline void store(T* p, int64_t i, A v) {
  p[i] = static_cast<T>(v);
}

// Round to nearest even, as c10::BFloat16 does, but branch-free so it vectorizes.
template <>
NP_TARGET inline void store(c10::BFloat16* p, int64_t i, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + UINT32_C(0x7FFF) + ((bits >> 16) & 1)) >> 16;
  const uint32_t is_nan = 0u - static_cast<uint32_t>(v != v);
  reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>((UINT32_C(0x7FC0) & is_nan) | (rounded & ~is_nan));
}

// Round to nearest even with every case computed and one picked by masks, so it
// vectorizes without F16C: overflow to inf (NaN stays NaN), subnormals by
// letting the FPU round an addition, normals by integer rounding.
template <>
NP_TARGET inline void store(c10::Half* p, int64_t i, float v) {
  uint32_t f;
  std::memcpy(&f, &v, sizeof(f));
  const uint32_t sign = f & UINT32_C(0x80000000);
  f ^= sign;
  const uint32_t denorm_magic_bits = UINT32_C(126) << 23;  // 0.5f: aligns 2^-24 to its ulp
  float denorm_magic;
  std::memcpy(&denorm_magic, &denorm_magic_bits, sizeof(denorm_magic));
  float abs_v;
  std::memcpy(&abs_v, &f, sizeof(abs_v));
  const float shifted = abs_v + denorm_magic;
  uint32_t subnormal;
  std::memcpy(&subnormal, &shifted, sizeof(subnormal));
  subnormal -= denorm_magic_bits;
  const uint32_t normal =
      (f + (static_cast<uint32_t>(15 - 127) << 23) + UINT32_C(0xFFF) + ((f >> 13) & 1)) >> 13;
  const uint32_t special = UINT32_C(0x7C00) | (static_cast<uint32_t>(f > (UINT32_C(255) << 23)) << 9);
  const uint32_t is_subnormal = 0u - static_cast<uint32_t>(f < (UINT32_C(113) << 23));
  const uint32_t is_special = 0u - static_cast<uint32_t>(f >= (static_cast<uint32_t>(127 + 16) << 23));
  uint32_t h = (subnormal & is_subnormal) | (normal & ~is_subnormal);
  h = (special & is_special) | (h & ~is_special);
  reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(h | (sign >> 16));
}

// ---- shared pieces ----------------------------------------------------------

// Widens weight + offset and bias once per task, so the row loops see only
// accumulation-type arrays. `wa` is left untouched when there is no weight.
template <typename W, typename acc_t>
NP_TARGET void widen_params(const W* w, const W* b, acc_t offset, int64_t n, acc_t* wa,
                            acc_t* ba) {
  if (w != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) wa[i] = load(w, i) + offset;
  }
  if (b != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) ba[i] = load(b, i);
  }
}

// The row a norm normalizes: x itself, or x + residual rounded to T and
// stored to `sum` (normalized as rounded, like eager `norm(x + residual)`; a
// 16-bit residual of fp32 x widens exactly, as eager's promotion does).
// Its statistics and the output read that row of T (16-bit values widen with
// one shift as they are loaded), so the forward and a backward recomputing
// the statistics from the same row give the same bits.
template <typename T, typename R>
NP_TARGET const T* norm_row(const T* __restrict x, const R* __restrict r, T* __restrict sum,
                            int64_t n) {
  if (r == nullptr) return x;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) store(sum, i, load(x, i) + load(r, i));
  return sum;
}

template <typename acc_t>
struct RowStats {
  acc_t mean;
  acc_t rstd;
};

// Sums over long rows: each block of kSumBlock values is summed by one
// vectorized loop, and the blocks' sums are added pairwise (a binary counter
// of partial sums), so the rounding error grows with kSumBlock / lanes +
// log2(n), not with n / lanes. A plain vectorized reduction of fp32 rows of
// 2^20 values put the outputs 100x further from float64 than torch's.
// Callers write the block loop themselves (row_stats, backward_rows): with its
// body in a lambda GCC no longer vectorized it (3x the instructions).
constexpr int64_t kSumBlock = 4096;

template <typename acc_t, int K>
struct PairwiseSums {
  acc_t level[64][K]; // level[j]: the sum of 2^j blocks, set where bit j of `blocks` is
  int64_t blocks = 0;

  NP_TARGET void add(const acc_t (&v)[K]) {
    acc_t c[K];
    for (int k = 0; k < K; ++k) c[k] = v[k];
    int top = 0;
    for (int64_t m = blocks; m & 1; m >>= 1, ++top)
      for (int k = 0; k < K; ++k) c[k] = level[top][k] + c[k];
    for (int k = 0; k < K; ++k) level[top][k] = c[k];
    ++blocks;
  }
  NP_TARGET void total(acc_t (&out)[K]) const {
    for (int k = 0; k < K; ++k) out[k] = 0;
    for (int j = 0; (blocks >> j) != 0; ++j)
      if ((blocks >> j) & 1)
        for (int k = 0; k < K; ++k) out[k] += level[j][k];
  }
};

// LayerNorm's shift: the mean of the row's first (up to) 8 values. The
// variance below loses (1 + (mean - shift)^2 / var) times its sums' rounding
// error, and a single value can sit several deviations from the mean.
template <typename T, typename acc_t = at::opmath_type<T>>
NP_TARGET acc_t row_shift(const T* __restrict h, int64_t k) {
  const int64_t m = std::min<int64_t>(k, 8);
  acc_t s = 0;
  for (int64_t i = 0; i < m; ++i) s += load(h, i);
  return s / static_cast<acc_t>(m);
}

// Over the first k values of a row: one pass of moments shifted by
// row_shift, so the row is read once for its statistics.
template <typename T, typename acc_t = at::opmath_type<T>>
NP_TARGET RowStats<acc_t> row_stats(const T* __restrict h, int64_t k, bool center, acc_t eps) {
  const acc_t shift = center && k > 0 ? row_shift(h, k) : acc_t(0);
  PairwiseSums<acc_t, 2> sums;
  for (int64_t lo = 0; lo < k; lo += kSumBlock) {
    const int64_t hi = std::min(k, lo + kSumBlock);
    acc_t s = 0, ss = 0;
#pragma omp simd reduction(+ : s, ss)
    for (int64_t i = lo; i < hi; ++i) {
      const acc_t d = load(h, i) - shift;
      s += d;
      ss += d * d;
    }
    sums.add({s, ss});
  }
  acc_t t[2];
  sums.total(t);
  const acc_t mean_d = center ? t[0] / static_cast<acc_t>(k) : acc_t(0);
  const acc_t var = std::max(t[1] / static_cast<acc_t>(k) - mean_d * mean_d, acc_t(0));
  return {shift + mean_d, acc_t(1) / std::sqrt(var + eps)};
}

// ---- forward ----------------------------------------------------------------


// Rows [begin, end). `scratch` holds 2 * cols accumulation values.
template <typename T, typename W, typename O, typename R>
NP_TARGET void forward_rows(const ForwardArgs& a, int64_t begin, int64_t end,
                            at::opmath_type<T>* scratch) {
  using acc_t = at::opmath_type<T>;
  const int64_t n = a.cols, k = a.params.stat_cols;
  const T* x = static_cast<const T*>(a.x);
  const R* r = static_cast<const R*>(a.residual);
  T* sum = static_cast<T*>(a.sum);
  const W* w = static_cast<const W*>(a.weight);
  const W* b = static_cast<const W*>(a.bias);
  O* out = static_cast<O*>(a.out);
  acc_t* stats = static_cast<acc_t*>(a.stats);
  acc_t* __restrict wa = scratch;
  acc_t* __restrict ba = scratch + n;
  widen_params(w, b, static_cast<acc_t>(a.params.weight_offset), n, wa, ba);
  const acc_t eps = static_cast<acc_t>(a.params.eps);

  for (int64_t row = begin; row < end; ++row) {
    const T* __restrict xr = norm_row(x + row * a.x_stride, r ? r + row * a.residual_stride : nullptr,
                                      sum ? sum + row * n : nullptr, n);
    const auto st = row_stats(xr, k, a.params.center, eps);
    const acc_t mean = st.mean, rstd = st.rstd;
    if (stats) {
      stats[2 * row] = mean;
      stats[2 * row + 1] = rstd;
    }
    O* __restrict y = out + row * n;
    // One loop per parameter combination: no branches left in the hot loop.
    if (w && b) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) store(y, i, (load(xr, i) - mean) * rstd * wa[i] + ba[i]);
    } else if (w) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) store(y, i, (load(xr, i) - mean) * rstd * wa[i]);
    } else if (b) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) store(y, i, (load(xr, i) - mean) * rstd + ba[i]);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) store(y, i, (load(xr, i) - mean) * rstd);
    }
  }
}

// ---- backward ---------------------------------------------------------------


// One backward row: its inputs, its dx, and the scalars of its dx formula.
template <typename T, typename acc_t>
struct BackwardRow {
  const T* x;
  const T* dy;
  const T* ds; // gradient of the residual sum, or null
  T* dx;
  acc_t mean, rstd, mean_g, c;
};

// The dx of R rows over columns [lo, hi), and their terms of the dweight /
// dbias partials, from x, dy and each row's statistics. STAT: columns the
// statistics cover (all of them unless pRMSNorm), whose dx has the xhat term.
// x and dy are read again here rather than kept in scratch rows: for long rows
// (fp32 LayerNorm at 16384 columns) two scratch rows written and read back cost
// more than the second read of x and dy from L2. The rows' terms are added to
// the partials in row order: the bits of one row at a time.
template <int R, bool STAT, bool DS, bool DW, bool DB, typename T, typename acc_t>
NP_TARGET void backward_outputs(const BackwardRow<T, acc_t>* rows, const acc_t* __restrict wa,
                                acc_t* __restrict dw, acc_t* __restrict db, int64_t lo,
                                int64_t hi) {
  const T* __restrict x[R];
  const T* __restrict dy[R];
  const T* __restrict ds[R];
  T* __restrict dx[R];
  acc_t mean[R], rstd[R], mean_g[R], c[R];
  for (int r = 0; r < R; ++r) {
    x[r] = rows[r].x, dy[r] = rows[r].dy, ds[r] = rows[r].ds, dx[r] = rows[r].dx;
    mean[r] = rows[r].mean, rstd[r] = rows[r].rstd, mean_g[r] = rows[r].mean_g, c[r] = rows[r].c;
  }
#pragma omp simd
  for (int64_t i = lo; i < hi; ++i) {
    acc_t dw_i = DW ? dw[i] : acc_t(0), db_i = DB ? db[i] : acc_t(0);
    for (int r = 0; r < R; ++r) {
      const acc_t d = load(dy[r], i);
      const acc_t xh = (load(x[r], i) - mean[r]) * rstd[r];
      acc_t v = d * wa[i] - mean_g[r];
      if constexpr (STAT) v -= xh * c[r];
      v *= rstd[r];
      if constexpr (DS) v += load(ds[r], i);
      store(dx[r], i, v);
      if constexpr (DW) dw_i += d * xh;
      if constexpr (DB) db_i += d;
    }
    if constexpr (DW) dw[i] = dw_i;
    if constexpr (DB) db[i] = db_i;
  }
}

template <typename T, typename acc_t>
using BackwardOutputsFn = void (*)(const BackwardRow<T, acc_t>*, const acc_t*, acc_t*, acc_t*,
                                   int64_t, int64_t);

// backward_outputs with its switches as the bits of `index` (R - 1 in bits 4 and up, STAT 8,
// DS 4, DW 2, DB 1).
template <typename T, typename acc_t, int... I>
NP_TARGET BackwardOutputsFn<T, acc_t> backward_outputs_fn(int index,
                                                          std::integer_sequence<int, I...>) {
  static constexpr BackwardOutputsFn<T, acc_t> kFns[] = {
      &backward_outputs<(I >> 4) + 1, (I & 8) != 0, (I & 4) != 0, (I & 2) != 0, (I & 1) != 0,
                        T, acc_t>...};
  return kFns[index];
}

// Row `row` of the output's gradient as T: the row itself, or its terms summed into `buf` as T
// (norm.h: in order, each sum rounded to T, the wider of G and T), so that every loop after it is
// the one of T. A single 16-bit term of fp32 x is widened exactly: the same bits as a gradient
// widened up front, which a reduction over 16-bit loads, vectorized wider, would not give.
template <typename T, typename G>
NP_TARGET const T* grad_row(const BackwardArgs& a, int64_t row, at::opmath_type<T>* __restrict buf) {
  static_assert(std::is_same_v<G, T> || std::is_same_v<T, at::opmath_type<G>>,
                "the gradient is of x's dtype or narrower than fp32 x");
  const int64_t n = a.cols;
  const G* __restrict dy = static_cast<const G*>(a.grad_out) + row * a.grad_out_stride;
  if constexpr (std::is_same_v<G, T>) {
    if (a.n_more == 0) return dy;
  }
  // A 16-bit T's sums are kept as T in the first half of the (accumulation-type) buffer.
  T* __restrict sum = reinterpret_cast<T*>(buf);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) store(sum, i, load(dy, i));
  for (int t = 0; t < a.n_more; ++t) {
    const G* __restrict term = static_cast<const G*>(a.more[t]) + row * a.more_stride[t];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) store(sum, i, load(sum, i) + load(term, i));
  }
  return sum;
}

// Row `row`'s statistics (the forward's, or one pass over x) and, in one more
// pass, its sums for dx. The gradient's terms, or a 16-bit gradient of fp32 x,
// are summed or widened into `dy_buf` (grad_row).
// (A function, not a lambda: a lambda would not carry NP_TARGET, and the
// loads would not be inlined into it.)
template <typename T, typename G>
NP_TARGET BackwardRow<T, at::opmath_type<T>> backward_row(const BackwardArgs& a,
                                                         const at::opmath_type<T>* __restrict wa,
                                                         int64_t row,
                                                         at::opmath_type<T>* __restrict dy_buf) {
  using acc_t = at::opmath_type<T>;
  const int64_t n = a.cols, k = a.params.stat_cols;
  const acc_t* saved = static_cast<const acc_t*>(a.stats);
  const T* __restrict x = static_cast<const T*>(a.x) + row * a.x_stride;
  const T* __restrict dy = grad_row<T, G>(a, row, dy_buf);
  // Without saved statistics, those of the row as the forward takes them (the same bits).
  // RMSNorm's mean is 0 whatever the stats hold, as on CUDA.
  const auto st =
      saved ? RowStats<acc_t>{a.params.center ? saved[2 * row] : acc_t(0), saved[2 * row + 1]}
            : row_stats(x, k, a.params.center, static_cast<acc_t>(a.params.eps));
  const acc_t mean = st.mean, rstd = st.rstd;
  PairwiseSums<acc_t, 2> sums;
  for (int64_t lo = 0; lo < n; lo += kSumBlock) {
    const int64_t hi = std::min(n, lo + kSumBlock);
    acc_t bg = 0, bgx = 0;
#pragma omp simd reduction(+ : bg, bgx)
    for (int64_t i = lo; i < hi; ++i) {
      const acc_t gi = load(dy, i) * wa[i];
      bg += gi;
      bgx += gi * ((load(x, i) - mean) * rstd);
    }
    sums.add({bg, bgx});
  }
  acc_t t[2];
  sums.total(t);
  // rstd depends on the first k columns only (all of them unless pRMSNorm).
  const acc_t mean_g = a.params.center ? t[0] / static_cast<acc_t>(n) : acc_t(0);
  const acc_t c = t[1] / static_cast<acc_t>(k);
  const T* ds = static_cast<const T*>(a.grad_sum);
  return {x, dy, ds ? ds + row * a.grad_sum_stride : nullptr,
          static_cast<T*>(a.grad_input) + row * n, mean, rstd, mean_g, c};
}

// Rows [begin, end); adds this range's dweight / dbias into `dw` / `db`
// (nullable, cols values each). `scratch` holds (1 + kBackwardRows) * cols
// accumulation values.
// Per row: the statistics and the sums (backward_row); then one pass for dx
// and the partials, over kBackwardRows rows at a time.
template <typename T, typename W, typename G>
NP_TARGET void backward_rows(const BackwardArgs& a, int64_t begin, int64_t end,
                             at::opmath_type<T>* __restrict dw, at::opmath_type<T>* __restrict db,
                             at::opmath_type<T>* scratch) {
  using acc_t = at::opmath_type<T>;
  const int64_t n = a.cols, k = a.params.stat_cols;
  const W* w = static_cast<const W*>(a.weight);
  acc_t* __restrict wa = scratch;
  widen_params<W, acc_t>(w, nullptr, static_cast<acc_t>(a.params.weight_offset), n, wa, nullptr);
  if (w == nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) wa[i] = 1;
  }
  const int flags = 4 * (a.grad_sum != nullptr) + 2 * (dw != nullptr) + (db != nullptr);
  const auto all = std::make_integer_sequence<int, 16 * kBackwardRows>{};
  for (int64_t row = begin; row < end; row += kBackwardRows) {
    const int count = static_cast<int>(std::min<int64_t>(kBackwardRows, end - row));
    BackwardRow<T, acc_t> rows[kBackwardRows];
    for (int r = 0; r < count; ++r) rows[r] = backward_row<T, G>(a, wa, row + r, scratch + (1 + r) * n);
    const int group = 16 * (count - 1);
    backward_outputs_fn<T, acc_t>(group + 8 + flags, all)(rows, wa, dw, db, 0, k);
    if (k < n) backward_outputs_fn<T, acc_t>(group + flags, all)(rows, wa, dw, db, k, n);
  }
}
