// CPU kernels: one row per task, rows split across threads. Each row is
// widened once into an accumulation-dtype scratch buffer that stays in L1/L2,
// so the input is read from memory once per pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "../norm.h"

namespace normpass {
namespace {

using at::Tensor;
using std::optional;

// Rows per task: large enough to amortize scheduling, small enough to balance.
constexpr int64_t kRowGrain = 16;
// dweight/dbias partials are kept per fixed block of rows, then summed in
// block order: the result does not depend on the thread count.
constexpr int64_t kMaxWeightBlocks = 64;

template <typename acc_t>
struct RowStats {
  acc_t mean;
  acc_t rstd;
};

template <typename acc_t>
RowStats<acc_t> row_stats(const acc_t* h, int64_t stat_cols, const NormParams& p) {
  acc_t mean = 0;
  if (p.center) {
    acc_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < stat_cols; ++i) s += h[i];
    mean = s / stat_cols;
  }
  acc_t ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < stat_cols; ++i) {
    const acc_t d = h[i] - mean;
    ss += d * d;
  }
  return {mean, acc_t(1) / std::sqrt(ss / stat_cols + static_cast<acc_t>(p.eps))};
}

// Widens a row (optionally x + residual, rounded to the input dtype as eager
// does, and stored to `sum`) into `h`.
template <typename T, typename acc_t>
void load_row(const T* x, const T* r, T* sum, acc_t* h, int64_t n) {
  if (r == nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) h[i] = static_cast<acc_t>(x[i]);
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T s = static_cast<T>(static_cast<acc_t>(x[i]) + static_cast<acc_t>(r[i]));
    sum[i] = s;
    h[i] = static_cast<acc_t>(s);
  }
}

template <typename T, typename W, typename O>
void forward_typed(const Tensor& x, const optional<Tensor>& residual,
                   const optional<Tensor>& weight, const optional<Tensor>& bias,
                   const NormParams& p, Tensor& out, optional<Tensor>& sum) {
  using acc_t = at::opmath_type<T>;
  const int64_t rows = x.size(0), cols = x.size(1);
  const T* x_data = x.const_data_ptr<T>();
  const T* r_data = residual ? residual->const_data_ptr<T>() : nullptr;
  T* sum_data = sum ? sum->mutable_data_ptr<T>() : nullptr;
  const W* w = weight ? weight->const_data_ptr<W>() : nullptr;
  const W* b = bias ? bias->const_data_ptr<W>() : nullptr;
  O* y_data = out.mutable_data_ptr<O>();
  const int64_t x_stride = x.stride(0);
  const int64_t r_stride = residual ? residual->stride(0) : 0;
  const acc_t offset = static_cast<acc_t>(p.weight_offset);

  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(cols);
    acc_t* h = scratch.data();
    for (int64_t row = begin; row < end; ++row) {
      load_row<T, acc_t>(x_data + row * x_stride, r_data ? r_data + row * r_stride : nullptr,
                         sum_data ? sum_data + row * cols : nullptr, h, cols);
      const auto st = row_stats(h, p.stat_cols, p);
      O* y = y_data + row * cols;
#pragma omp simd
      for (int64_t i = 0; i < cols; ++i) {
        acc_t v = (h[i] - st.mean) * st.rstd;
        if (w) v *= static_cast<acc_t>(w[i]) + offset;
        if (b) v += static_cast<acc_t>(b[i]);
        y[i] = static_cast<O>(v);
      }
    }
  });
}

template <typename T, typename W>
void backward_typed(const Tensor& grad_out, const Tensor& x, const optional<Tensor>& weight,
                    const optional<Tensor>& grad_sum, const NormParams& p, Tensor& grad_input,
                    optional<Tensor>& grad_weight, optional<Tensor>& grad_bias) {
  using acc_t = at::opmath_type<T>;
  const int64_t rows = x.size(0), cols = x.size(1), k = p.stat_cols;
  const T* x_data = x.const_data_ptr<T>();
  const T* dy_data = grad_out.const_data_ptr<T>();
  const T* ds_data = grad_sum ? grad_sum->const_data_ptr<T>() : nullptr;
  const W* w = weight ? weight->const_data_ptr<W>() : nullptr;
  T* dx_data = grad_input.mutable_data_ptr<T>();
  const int64_t x_stride = x.stride(0), dy_stride = grad_out.stride(0);
  const int64_t ds_stride = grad_sum ? grad_sum->stride(0) : 0;
  const acc_t offset = static_cast<acc_t>(p.weight_offset);

  const bool want_dw = grad_weight.has_value(), want_db = grad_bias.has_value();
  const int64_t blocks = std::min(rows, kMaxWeightBlocks);
  const int64_t rows_per_block = (rows + blocks - 1) / blocks;
  std::vector<acc_t> dw_part(want_dw ? blocks * cols : 0, 0);
  std::vector<acc_t> db_part(want_db ? blocks * cols : 0, 0);

  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<acc_t> scratch(2 * cols);
    acc_t* xhat = scratch.data();
    acc_t* g = scratch.data() + cols;
    for (int64_t blk = block_begin; blk < block_end; ++blk) {
      acc_t* dw = want_dw ? dw_part.data() + blk * cols : nullptr;
      acc_t* db = want_db ? db_part.data() + blk * cols : nullptr;
      const int64_t row_end = std::min(rows, (blk + 1) * rows_per_block);
      for (int64_t row = blk * rows_per_block; row < row_end; ++row) {
        load_row<T, acc_t>(x_data + row * x_stride, nullptr, nullptr, xhat, cols);
        const auto st = row_stats(xhat, k, p);
        const T* dy = dy_data + row * dy_stride;
        acc_t sum_g = 0, sum_gx = 0;
#pragma omp simd reduction(+ : sum_g, sum_gx)
        for (int64_t i = 0; i < cols; ++i) {
          xhat[i] = (xhat[i] - st.mean) * st.rstd;
          const acc_t d = static_cast<acc_t>(dy[i]);
          g[i] = w ? d * (static_cast<acc_t>(w[i]) + offset) : d;
          sum_g += g[i];
          sum_gx += g[i] * xhat[i];
          if (dw) dw[i] += d * xhat[i];
          if (db) db[i] += d;
        }
        // d rstd reaches only the first k columns (all of them unless pRMSNorm).
        const acc_t mean_g = p.center ? sum_g / cols : 0;
        const acc_t c = sum_gx / k;
        T* dx = dx_data + row * cols;
        const T* ds = ds_data ? ds_data + row * ds_stride : nullptr;
#pragma omp simd
        for (int64_t i = 0; i < cols; ++i) {
          acc_t v = st.rstd * (g[i] - mean_g - (i < k ? xhat[i] * c : 0));
          if (ds) v += static_cast<acc_t>(ds[i]);
          dx[i] = static_cast<T>(v);
        }
      }
    }
  });

  auto reduce = [&](const std::vector<acc_t>& part, Tensor& result) {
    auto* out = result.mutable_data_ptr<acc_t>();
    for (int64_t blk = 0; blk < blocks; ++blk)
      for (int64_t i = 0; i < cols; ++i) out[i] += part[blk * cols + i];
  };
  if (want_dw) reduce(dw_part, *grad_weight);
  if (want_db) reduce(db_part, *grad_bias);
}

// Parameters arrive as T or as the accumulation dtype (norm.h).
template <typename T, typename F>
void with_param_type(const optional<Tensor>& weight, const optional<Tensor>& bias, F&& f) {
  const auto param = weight ? weight : bias;
  if (param && param->scalar_type() != c10::CppTypeToScalarType<T>::value) {
    f(at::opmath_type<T>{});
  } else {
    f(T{});
  }
}

} // namespace

void norm_forward_cpu(const Tensor& x, const optional<Tensor>& residual,
                      const optional<Tensor>& weight, const optional<Tensor>& bias,
                      const NormParams& p, Tensor& out, optional<Tensor>& sum) {
  TORCH_CHECK(!(weight && bias) || weight->scalar_type() == bias->scalar_type(),
              "normpass: weight and bias must share a dtype, got ", weight->scalar_type(),
              " and ", bias->scalar_type());
  // Output dtypes other than x's or fp32 are computed in fp32 and cast once.
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (out.scalar_type() != x.scalar_type() && out.scalar_type() != acc) {
    Tensor tmp = at::empty(out.sizes(), out.options().dtype(acc));
    norm_forward_cpu(x, residual, weight, bias, p, tmp, sum);
    out.copy_(tmp);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "normpass_fwd", [&] {
    using T = scalar_t;
    with_param_type<T>(weight, bias, [&](auto w_tag) {
      using W = decltype(w_tag);
      if (out.scalar_type() == x.scalar_type()) {
        forward_typed<T, W, T>(x, residual, weight, bias, p, out, sum);
      } else {
        forward_typed<T, W, at::opmath_type<T>>(x, residual, weight, bias, p, out, sum);
      }
    });
  });
}

void norm_backward_cpu(const Tensor& grad_out, const Tensor& x, const optional<Tensor>& weight,
                       const optional<Tensor>& grad_sum, const NormParams& p,
                       Tensor& grad_input, optional<Tensor>& grad_weight,
                       optional<Tensor>& grad_bias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "normpass_bwd", [&] {
    using T = scalar_t;
    with_param_type<T>(weight, std::nullopt, [&](auto w_tag) {
      using W = decltype(w_tag);
      backward_typed<T, W>(grad_out, x, weight, grad_sum, p, grad_input, grad_weight, grad_bias);
    });
  });
}

} // namespace normpass
