// CPU kernels: rows split across threads, each row read from memory once and
// re-read from L1/L2 by the passes after the first. The row loops
// (norm_rows.h) are compiled for AVX-512, AVX2 and baseline x86-64, and the
// best one this CPU supports runs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../norm.h"

namespace normpass {
namespace {

using at::Tensor;
using std::optional;

// Raw views of the tensors, shared by every instruction-set variant.
struct ForwardArgs {
  const void* x;
  int64_t x_stride;
  const void* residual;  // nullable
  int64_t residual_stride;
  void* sum;             // nullable; contiguous rows
  const void* weight;    // nullable
  const void* bias;      // nullable
  void* out;             // contiguous rows
  void* stats;           // nullable; (rows, 2) accumulation values: mean, rstd
  int64_t cols;
  NormParams params;
};

struct BackwardArgs {
  const void* grad_out;
  int64_t grad_out_stride;
  const void* const* more;       // further terms of the output's gradient (n_more, grad_out's dtype)
  const int64_t* more_stride;
  int n_more;
  const void* x;
  int64_t x_stride;
  const void* weight;    // nullable
  const void* grad_sum;  // nullable
  int64_t grad_sum_stride;
  void* grad_input;      // contiguous rows
  const void* stats;     // nullable; the forward's (rows, 2) mean, rstd
  int64_t cols;
  NormParams params;
};

// Rows whose dx pass (norm_rows.h, backward_outputs) runs as one: their dweight / dbias terms
// are added to the partials with one read and write of them for all (256 x 16384 fp32
// LayerNorm backward on 2 AVX-512 cores, one row at a time against four: 2.0 -> 1.4 ms; two: 1.5).
constexpr int kBackwardRows = 4;

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define NORMPASS_X86_VARIANTS 1
#endif

namespace baseline {
#define NP_TARGET
#include "norm_rows.h"
#undef NP_TARGET
}  // namespace baseline

#ifdef NORMPASS_X86_VARIANTS
namespace avx2 {
#define NP_TARGET __attribute__((target("avx2,fma,f16c")))
#include "norm_rows.h"
#undef NP_TARGET
}  // namespace avx2

namespace avx512 {
#define NP_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#include "norm_rows.h"
#undef NP_TARGET
}  // namespace avx512
#endif

enum class Isa { kBaseline, kAvx2, kAvx512 };

// The best variant this CPU runs; NORMPASS_CPU_ISA=baseline|avx2|avx512 caps
// it (tests use that to cover every variant on one machine).
Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kBaseline;
#ifdef NORMPASS_X86_VARIANTS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) {
      best = Isa::kAvx2;
    }
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      best = Isa::kAvx512;
    }
#endif
    const char* env = std::getenv("NORMPASS_CPU_ISA");
    const std::string cap = env ? env : "";
    TORCH_CHECK(cap.empty() || cap == "baseline" || cap == "avx2" || cap == "avx512",
                "normpass: NORMPASS_CPU_ISA must be baseline, avx2 or avx512, got '", cap, "'");
    if (cap == "baseline") return Isa::kBaseline;
    if (cap == "avx2") return std::min(best, Isa::kAvx2);
    return best;
  }();
  return isa;
}

template <typename T>
using ForwardRowsFn = void (*)(const ForwardArgs&, int64_t, int64_t, at::opmath_type<T>*);
template <typename T>
using BackwardRowsFn = void (*)(const BackwardArgs&, int64_t, int64_t, at::opmath_type<T>*,
                                at::opmath_type<T>*, at::opmath_type<T>*);

template <typename T, typename W, typename O, typename R>
ForwardRowsFn<T> forward_rows_fn() {
#ifdef NORMPASS_X86_VARIANTS
  switch (cpu_isa()) {
    case Isa::kAvx512: return avx512::forward_rows<T, W, O, R>;
    case Isa::kAvx2: return avx2::forward_rows<T, W, O, R>;
    case Isa::kBaseline: break;
  }
#endif
  return baseline::forward_rows<T, W, O, R>;
}

template <typename T, typename W, typename G>
BackwardRowsFn<T> backward_rows_fn() {
#ifdef NORMPASS_X86_VARIANTS
  switch (cpu_isa()) {
    case Isa::kAvx512: return avx512::backward_rows<T, W, G>;
    case Isa::kAvx2: return avx2::backward_rows<T, W, G>;
    case Isa::kBaseline: break;
  }
#endif
  return baseline::backward_rows<T, W, G>;
}

// Rows per task: at least ~32K elements of work, to amortize scheduling.
int64_t row_grain(int64_t cols) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(cols, 1));
}

// dweight/dbias partials are kept per fixed block of rows and summed in block
// order, so the result does not depend on the thread count.
constexpr int64_t kWeightBlocks = 32;

template <typename T, typename W, typename O>
void forward_typed(const Tensor& x, const optional<Tensor>& residual,
                   const optional<Tensor>& weight, const optional<Tensor>& bias,
                   const NormParams& p, Tensor& out, optional<Tensor>& sum,
                   optional<Tensor>& stats) {
  using acc_t = at::opmath_type<T>;
  const int64_t rows = x.size(0), cols = x.size(1);
  ForwardArgs a{x.const_data_ptr(),
                x.stride(0),
                residual ? residual->const_data_ptr() : nullptr,
                residual ? residual->stride(0) : 0,
                sum ? sum->mutable_data_ptr() : nullptr,
                weight ? weight->const_data_ptr() : nullptr,
                bias ? bias->const_data_ptr() : nullptr,
                out.mutable_data_ptr(),
                stats ? stats->mutable_data_ptr() : nullptr,
                cols,
                p};
  // The residual is of x's dtype, or 16 bits beside fp32 x, read as it is (norm.h).
  ForwardRowsFn<T> rows_fn = forward_rows_fn<T, W, O, T>();
  if constexpr (std::is_same_v<T, float>) {
    const auto r = residual ? residual->scalar_type() : x.scalar_type();
    if (r == at::kBFloat16) rows_fn = forward_rows_fn<T, W, O, c10::BFloat16>();
    if (r == at::kHalf) rows_fn = forward_rows_fn<T, W, O, c10::Half>();
  }
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(2 * cols);
    rows_fn(a, begin, end, scratch.data());
  });
}

template <typename T, typename W, typename G>
void backward_typed(const Tensor& grad_out, at::TensorList more, const Tensor& x,
                    const optional<Tensor>& weight, const optional<Tensor>& grad_sum,
                    const NormParams& p, Tensor& grad_input, optional<Tensor>& grad_weight,
                    optional<Tensor>& grad_bias, const optional<Tensor>& stats) {
  using acc_t = at::opmath_type<T>;
  const int64_t rows = x.size(0), cols = x.size(1);
  std::vector<const void*> more_ptrs;
  std::vector<int64_t> more_strides;
  for (const Tensor& t : more) {
    more_ptrs.push_back(t.const_data_ptr());
    more_strides.push_back(t.stride(0));
  }
  BackwardArgs a{grad_out.const_data_ptr(),
                 grad_out.stride(0),
                 more_ptrs.data(),
                 more_strides.data(),
                 static_cast<int>(more.size()),
                 x.const_data_ptr(),
                 x.stride(0),
                 weight ? weight->const_data_ptr() : nullptr,
                 grad_sum ? grad_sum->const_data_ptr() : nullptr,
                 grad_sum ? grad_sum->stride(0) : 0,
                 grad_input.mutable_data_ptr(),
                 stats ? stats->const_data_ptr() : nullptr,
                 cols,
                 p};
  const auto rows_fn = backward_rows_fn<T, W, G>();
  const bool want_dw = grad_weight.has_value(), want_db = grad_bias.has_value();
  const int64_t blocks = std::min(rows, kWeightBlocks);
  const int64_t rows_per_block = (rows + blocks - 1) / blocks;
  // Uninitialized: each block zeroes its own partials in its task, in parallel and into the
  // cache the rows then accumulate in (a zeroed vector cost one thread a pass over all of them).
  const int64_t part_size = blocks * cols;
  std::unique_ptr<acc_t[]> dw_part(want_dw ? new acc_t[part_size] : nullptr);
  std::unique_ptr<acc_t[]> db_part(want_db ? new acc_t[part_size] : nullptr);
  auto block_part = [&](const std::unique_ptr<acc_t[]>& part, int64_t blk) -> acc_t* {
    if (!part) return nullptr;
    acc_t* p = part.get() + blk * cols;
    std::fill(p, p + cols, acc_t(0));
    return p;
  };

  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<acc_t> scratch((1 + kBackwardRows) * cols);
    for (int64_t blk = block_begin; blk < block_end; ++blk) {
      const int64_t begin = std::min(rows, blk * rows_per_block);
      const int64_t end = std::min(rows, begin + rows_per_block);
      rows_fn(a, begin, end, block_part(dw_part, blk), block_part(db_part, blk), scratch.data());
    }
  });

  // Column-parallel, block-ordered: deterministic. dweight and dbias in one parallel region.
  if (!want_dw && !want_db) return;
  acc_t* dw = want_dw ? grad_weight->mutable_data_ptr<acc_t>() : nullptr;
  acc_t* db = want_db ? grad_bias->mutable_data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, cols, 4096, [&](int64_t begin, int64_t end) {
    for (auto [res, part] : {std::pair{dw, dw_part.get()}, std::pair{db, db_part.get()}}) {
      if (res == nullptr) continue;
      std::copy(part + begin, part + end, res + begin);
      for (int64_t blk = 1; blk < blocks; ++blk) {
        const acc_t* src = part + blk * cols;
        for (int64_t i = begin; i < end; ++i) res[i] += src[i];
      }
    }
  });
}

// Parameters arrive as T or as the accumulation dtype (norm.h).
template <typename T, typename F>
void with_param_type(const optional<Tensor>& weight, const optional<Tensor>& bias, F&& f) {
  const auto& param = weight ? weight : bias;
  if (param && param->scalar_type() != c10::CppTypeToScalarType<T>::value) {
    f(at::opmath_type<T>{});
  } else {
    f(T{});
  }
}

}  // namespace

void norm_forward_cpu(const Tensor& x, const optional<Tensor>& residual,
                      const optional<Tensor>& weight, const optional<Tensor>& bias,
                      const NormParams& p, Tensor& out, optional<Tensor>& sum,
                      optional<Tensor>& stats) {
  TORCH_CHECK(!(weight && bias) || weight->scalar_type() == bias->scalar_type(),
              "normpass: weight and bias must share a dtype, got ", weight->scalar_type(),
              " and ", bias->scalar_type());
  // The rows write x's dtype, the accumulation dtype, and 16-bit outputs of fp32 x (an fp32 norm
  // under autocast whose output feeds a bf16 matmul); any other is computed in fp32 and cast once.
  const auto acc = acc_dtype(x);
  const auto o = out.scalar_type();
  if (o != x.scalar_type() && o != acc && !is_16_bit_of_fp32(x.scalar_type(), o)) {
    Tensor tmp = at::empty(out.sizes(), out.options().dtype(acc));
    norm_forward_cpu(x, residual, weight, bias, p, tmp, sum, stats);
    out.copy_(tmp);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "normpass_fwd", [&] {
    using T = scalar_t;
    with_param_type<T>(weight, bias, [&](auto w_tag) {
      using W = decltype(w_tag);
      if (o == x.scalar_type()) {
        forward_typed<T, W, T>(x, residual, weight, bias, p, out, sum, stats);
      } else if (o == acc) {
        forward_typed<T, W, at::opmath_type<T>>(x, residual, weight, bias, p, out, sum, stats);
      } else if constexpr (std::is_same_v<T, float>) {
        if (o == at::kBFloat16) forward_typed<T, W, c10::BFloat16>(x, residual, weight, bias, p, out, sum, stats);
        else forward_typed<T, W, c10::Half>(x, residual, weight, bias, p, out, sum, stats);
      }
    });
  });
}

void norm_backward_cpu(const Tensor& grad_out, at::TensorList extra_grad_outs, const Tensor& x,
                       const optional<Tensor>& weight, const optional<Tensor>& grad_sum,
                       const NormParams& p, Tensor& grad_input, optional<Tensor>& grad_weight,
                       optional<Tensor>& grad_bias, const optional<Tensor>& stats) {
  // dweight/dbias in a 16-bit parameter dtype are summed in fp32 and cast once.
  const auto acc = acc_dtype(x);
  auto narrow = [&](const optional<Tensor>& g) { return g && g->scalar_type() != acc; };
  if (narrow(grad_weight) || narrow(grad_bias)) {
    auto wide = [&](const optional<Tensor>& g) -> optional<Tensor> {
      if (!g) return std::nullopt;
      return at::empty(g->sizes(), g->options().dtype(acc));
    };
    optional<Tensor> dw = wide(grad_weight), db = wide(grad_bias);
    norm_backward_cpu(grad_out, extra_grad_outs, x, weight, grad_sum, p, grad_input, dw, db, stats);
    if (grad_weight) grad_weight->copy_(*dw);
    if (grad_bias) grad_bias->copy_(*db);
    return;
  }
  // The gradient's terms are of x's dtype, or 16-bit for fp32 x (norm.h), read as they are and
  // summed row by row (grad_row; three bf16 terms of 1024 x 4096 rows, 2 threads: fp32 rows
  // 5.2-6.9 -> 1.6-2.0 ms, bf16 rows 4.9 -> 1.7-1.8, against the sum up front).
  const auto g = grad_out.scalar_type();
  TORCH_CHECK(g == x.scalar_type() || is_16_bit_of_fp32(x.scalar_type(), g),
              "normpass CPU: grad_out must have x's dtype or be 16-bit for fp32 x, got ", g);
  for (const Tensor& t : extra_grad_outs)
    TORCH_CHECK(t.scalar_type() == g, "normpass CPU: the gradient terms must share a dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "normpass_bwd", [&] {
    using T = scalar_t;
    with_param_type<T>(weight, std::nullopt, [&](auto w_tag) {
      using W = decltype(w_tag);
      auto run = [&](auto g_tag) {
        using G = decltype(g_tag);
        backward_typed<T, W, G>(grad_out, extra_grad_outs, x, weight, grad_sum, p, grad_input,
                                grad_weight, grad_bias, stats);
      };
      if constexpr (std::is_same_v<T, float>) {
        if (g == at::kBFloat16) return run(c10::BFloat16{});
        if (g == at::kHalf) return run(c10::Half{});
      }
      run(T{});
    });
  });
}

}  // namespace normpass
