// The normpass op library: schemas, argument checks and the device-neutral
// front end. Device kernels live in cpu/ and cuda/ behind norm.h.
#include <ATen/ATen.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "norm.h"

// Importing normpass._C runs the static TORCH_LIBRARY registrations below.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

namespace normpass {
namespace {

using at::Tensor;
using std::optional;

// ceil(p * cols) of the product shrunk by a few ulps (p = 0.07 of 100 columns is 7.000000000000001:
// 7 columns, not 8); the same bits as normpass/reference.py's stat_cols.
int64_t stat_cols_for(double p, int64_t cols) {
  const double k = p * static_cast<double>(cols) * (1.0 - 4 * std::numeric_limits<double>::epsilon());
  return std::max<int64_t>(1, static_cast<int64_t>(std::ceil(k)));
}

bool is_float_dtype(at::ScalarType t) {
  return at::isFloatingType(t) && !at::isFloat8Type(t);
}

// Spelled as Python spells it, so messages match the fake impls' word for word.
std::string dtype_name(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

// Messages format numbers here rather than through std::ostream: a CUDA build against torch
// 2.11 on the GPU machine (GCC 13) segfaulted inside ostream's numeric formatting on the first
// failing check (seen 2026-11-22); strings pass through unharmed.
// The shortest text that reads back as v (Python's repr, but for repr's trailing ".0").
std::string num(double v) {
  char buf[32];
  auto end = std::to_chars(buf, buf + sizeof(buf), v).ptr;
  return std::string(buf, end);
}

std::string num(int64_t v) {
  return std::to_string(v);
}

std::string shape(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + num(sizes[i]);
  return out + "]";
}

void check_param(const char* op, const char* name, const optional<Tensor>& t,
                 const Tensor& input, int64_t ndim) {
  if (!t.has_value()) return;
  TORCH_CHECK(is_float_dtype(t->scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", dtype_name(t->scalar_type()));
  TORCH_CHECK(t->device() == input.device(), op, ": ", name, " is on ", t->device(),
              " but input is on ", input.device());
  auto expected = input.sizes().slice(input.dim() - ndim);
  TORCH_CHECK(t->sizes() == expected, op, ": ", name, " has shape ", shape(t->sizes()),
              " but the normalized shape (the last ", num(ndim), " dims of input) is ",
              shape(expected));
}

// A tensor that must match the input in device and shape (a residual, a gradient).
void check_like_input(const char* op, const char* name, const Tensor& t, const Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " is on ", t.device(),
              " but input is on ", input.device());
  TORCH_CHECK(t.sizes() == input.sizes(), op, ": ", name, " has shape ", shape(t.sizes()),
              " but input has shape ", shape(input.sizes()));
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", dtype_name(t.scalar_type()));
}

// Checks everything a user can get wrong; returns the normalized size.
int64_t check_args(const char* op, const Tensor& input, const optional<Tensor>& residual,
                   const optional<Tensor>& weight, const optional<Tensor>& bias,
                   int64_t ndim, double eps, double p) {
  TORCH_CHECK(is_float_dtype(input.scalar_type()), op,
              ": input must be a floating-point tensor, got ", dtype_name(input.scalar_type()));
  TORCH_CHECK(ndim >= 1, op, ": normalized_ndim must be >= 1, got ", num(ndim));
  TORCH_CHECK(ndim <= input.dim(), op, ": normalized_ndim (", num(ndim),
              ") is larger than input.dim() (", num(input.dim()), ")");
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", num(eps));
  TORCH_CHECK(p > 0 && p <= 1, op, ": p must be in (0, 1], got ", num(p));
  TORCH_CHECK(input.device().is_cpu() || input.scalar_type() != at::kDouble, op,
              ": float64 input is supported on CPU only, got it on ", input.device());
  if (residual.has_value()) {
    check_like_input(op, "residual", *residual, input);
    TORCH_CHECK(residual->scalar_type() == input.scalar_type() ||
                    is_16_bit_of_fp32(input.scalar_type(), residual->scalar_type()),
                op, ": residual has dtype ", dtype_name(residual->scalar_type()),
                " but input has dtype ", dtype_name(input.scalar_type()),
                " (a residual must have input's dtype, or be bfloat16 / float16 beside float32 input; the "
                "add is commutative: pass the wider tensor as input)");
  }
  check_param(op, "weight", weight, input, ndim);
  check_param(op, "bias", bias, input, ndim);
  return c10::multiply_integers(input.sizes().slice(input.dim() - ndim));
}

// Rows of `cols` elements in t; none without columns.
int64_t row_count(const Tensor& t, int64_t cols) {
  return cols == 0 ? 0 : t.numel() / cols;
}

// A (rows, cols) view with unit column stride, copying only when the layout
// has no such view.
Tensor as_rows(const Tensor& t, int64_t cols) {
  Tensor v = t.reshape({row_count(t, cols), cols});
  return (cols <= 1 || v.stride(1) == 1) ? v : v.contiguous();
}

// Weight and bias reach the kernels flat, sharing one dtype: x's when both
// have it, else the accumulation dtype.
std::pair<optional<Tensor>, optional<Tensor>> kernel_params(
    const optional<Tensor>& weight, const optional<Tensor>& bias, const Tensor& input) {
  auto dtype_of = [](const optional<Tensor>& t) {
    return t.has_value() ? std::optional(t->scalar_type()) : std::nullopt;
  };
  auto w = dtype_of(weight), b = dtype_of(bias);
  at::ScalarType dtype = input.scalar_type();
  if ((w && *w != dtype) || (b && *b != dtype)) dtype = acc_dtype(input);
  auto flat = [&](const optional<Tensor>& t) -> optional<Tensor> {
    if (!t.has_value()) return t;
    return t->reshape({-1}).to(dtype).contiguous();
  };
  return {flat(weight), flat(bias)};
}

NormForward* forward_kernel(const Tensor& input) {
#ifdef NORMPASS_WITH_CUDA
  if (input.is_cuda()) return norm_forward_cuda;
#endif
  TORCH_CHECK(input.is_cpu(), "normpass: no kernel for device ", input.device());
  return norm_forward_cpu;
}

NormBackward* backward_kernel(const Tensor& input) {
#ifdef NORMPASS_WITH_CUDA
  if (input.is_cuda()) return norm_backward_cuda;
#endif
  TORCH_CHECK(input.is_cpu(), "normpass: no kernel for device ", input.device());
  return norm_backward_cpu;
}

// (out, sum, stats): sum is undefined without a residual, stats without want_stats.
std::tuple<Tensor, Tensor, Tensor> norm_forward(
    const char* op, const Tensor& input, const optional<Tensor>& residual,
    const optional<Tensor>& weight, const optional<Tensor>& bias, bool center, double eps,
    int64_t ndim, double weight_offset, double p, optional<at::ScalarType> out_dtype,
    bool want_stats = false) {
  const int64_t cols = check_args(op, input, residual, weight, bias, ndim, eps, p);
  if (out_dtype.has_value()) {
    TORCH_CHECK(is_float_dtype(*out_dtype), op,
                ": out_dtype must be a floating-point dtype, got ", dtype_name(*out_dtype));
  }
  Tensor out = at::empty(input.sizes(), input.options().dtype(out_dtype.value_or(input.scalar_type())));
  Tensor sum = residual.has_value() ? at::empty(input.sizes(), input.options()) : Tensor();
  Tensor stats = want_stats ? at::empty({row_count(input, cols), 2}, input.options().dtype(acc_dtype(input)))
                            : Tensor();
  if (input.numel() == 0) return {out, sum, stats};

  NormParams params{center, eps, weight_offset, stat_cols_for(p, cols)};
  Tensor out2d = out.view({-1, cols});
  optional<Tensor> sum2d, residual2d, stats2d;
  if (residual.has_value()) {
    sum2d = sum.view({-1, cols});
    residual2d = as_rows(*residual, cols);
  }
  if (want_stats) stats2d = stats;
  auto [w, b] = kernel_params(weight, bias, input);
  forward_kernel(input)(as_rows(input, cols), residual2d, w, b, params, out2d, sum2d, stats2d);
  return {out, sum, stats};
}

std::tuple<Tensor, Tensor, Tensor> norm_backward(
    const char* op, const Tensor& grad_out, const Tensor& input, const optional<Tensor>& weight,
    bool center, double eps, bool has_bias, int64_t ndim, double weight_offset, double p,
    const optional<Tensor>& grad_sum, at::TensorList extra_grad_outs,
    const optional<Tensor>& stats, bool weight_grad) {
  const int64_t cols = check_args(op, input, std::nullopt, weight, std::nullopt, ndim, eps, p);
  check_like_input(op, "grad_out", grad_out, input);
  if (grad_sum.has_value()) check_like_input(op, "grad_sum", *grad_sum, input);
  for (size_t i = 0; i < extra_grad_outs.size(); ++i) {
    const std::string name = "extra_grad_outs[" + std::to_string(i) + "]";
    check_like_input(op, name.c_str(), extra_grad_outs[i], input);
  }
  const int64_t rows = row_count(input, cols);
  if (stats.has_value()) {
    TORCH_CHECK(stats->device() == input.device(), op, ": stats is on ", stats->device(),
                " but input is on ", input.device());
    TORCH_CHECK(stats->dim() == 2 && stats->size(0) == rows && stats->size(1) == 2, op,
                ": stats has shape ", shape(stats->sizes()), " but the forward's statistics of ",
                num(rows), " rows have shape [", num(rows), ", 2]");
    TORCH_CHECK(stats->scalar_type() == acc_dtype(input), op, ": stats has dtype ",
                dtype_name(stats->scalar_type()), " but must be ", dtype_name(acc_dtype(input)));
  }

  // dweight in the weight's dtype; dbias too, or, without a weight, in the accumulation dtype
  // (autograd casts it to the bias's, which this op does not see).
  const auto param_dtype = weight.has_value() ? weight->scalar_type() : acc_dtype(input);

  // A grad_out wider than x (out_dtype=float32 on bf16 x, autocast's fp32 weight) carries bits
  // that the graph it replaces keeps. The CUDA kernels read an fp32 gradient as it is (norm.h);
  // on CPU the backward runs on x widened to grad_out's dtype, and dx is narrowed back. A wider
  // grad_sum (autograd's is x's dtype; a direct call's may not be) widens it on every device,
  // since the kernels add grad_sum in x's dtype.
  auto wide_dtype = at::promote_types(input.scalar_type(), grad_out.scalar_type());
  const bool wide_sum = grad_sum && at::promote_types(input.scalar_type(), grad_sum->scalar_type()) !=
                                        input.scalar_type();
  if (wide_sum) wide_dtype = at::promote_types(wide_dtype, grad_sum->scalar_type());
  if (wide_dtype == at::kDouble && !input.is_cpu()) wide_dtype = at::kFloat; // CPU-only float64
  if (wide_dtype != input.scalar_type() && (!input.is_cuda() || wide_sum)) {
    const Tensor wide = input.to(wide_dtype);
    // The statistics widen exactly (fp32 to fp64): the gradients follow the ones handed in.
    // Without them (a direct call; autograd always passes them) they are recomputed from the
    // widened row, which may differ in the last bits from the 16-bit row's the forward took.
    const optional<Tensor> wide_stats =
        stats.has_value() ? optional<Tensor>(stats->to(acc_dtype(wide))) : std::nullopt;
    auto [dx, dw, db] = norm_backward(op, grad_out, wide, weight, center, eps, has_bias, ndim,
                                      weight_offset, p, grad_sum, extra_grad_outs, wide_stats,
                                      weight_grad);
    return {dx.to(input.scalar_type()), dw.to(param_dtype), db.to(param_dtype)};
  }

  const auto param_sizes = input.sizes().slice(input.dim() - ndim);
  // The kernels write dweight/dbias in x's dtype or the accumulation dtype; a
  // parameter of a third dtype gets its gradient cast from the latter.
  const auto grad_dtype = param_dtype == input.scalar_type() ? param_dtype : acc_dtype(input);
  const auto grad_options = input.options().dtype(grad_dtype);
  Tensor grad_input = at::empty(input.sizes(), input.options());
  optional<Tensor> grad_weight, grad_bias;
  // Not for a frozen weight (weight_grad=False): the kernels then keep no dweight partials.
  if (weight.has_value() && weight_grad) grad_weight = at::empty({cols}, grad_options);
  if (has_bias) grad_bias = at::empty({cols}, grad_options);
  if (input.numel() == 0) {
    // No rows: no kernel runs, and dweight/dbias are empty sums.
    for (auto* g : {&grad_weight, &grad_bias})
      if (g->has_value()) (*g)->zero_();
  } else {
    NormParams params{center, eps, weight_offset, stat_cols_for(p, cols)};
    Tensor grad_input2d = grad_input.view({-1, cols});
    // Gradients reach the kernels as (rows, cols) views: the sum's (grad_sum) in x's dtype, the
    // output's in the wider of x's and theirs on CUDA (norm.h), and 16-bit terms of fp32 x
    // (autocast's casts of the output, folded by normpass.fold_casts) as they are on every device,
    // which sum several in fp32, as the widened terms they replace were; terms of mixed dtypes
    // are widened here.
    const auto g_dtype = grad_out.scalar_type();
    const bool narrow =
        is_16_bit_of_fp32(input.scalar_type(), g_dtype) &&
        std::all_of(extra_grad_outs.begin(), extra_grad_outs.end(),
                    [&](const Tensor& g) { return g.scalar_type() == g_dtype; });
    const auto dy_dtype = narrow ? g_dtype : input.is_cuda() ? wide_dtype : input.scalar_type();
    auto rows_of = [&](const Tensor& g, at::ScalarType dtype) { return as_rows(g.to(dtype), cols); };
    optional<Tensor> grad_sum2d;
    if (grad_sum.has_value()) grad_sum2d = rows_of(*grad_sum, input.scalar_type());
    auto w = kernel_params(weight, std::nullopt, input).first;
    std::vector<Tensor> extra2d;
    for (const Tensor& g : extra_grad_outs) extra2d.push_back(rows_of(g, dy_dtype));
    // The CUDA kernels read a row's pair as one 8-byte load: contiguous and aligned.
    optional<Tensor> stats2d;
    if (stats.has_value()) {
      stats2d = stats->contiguous();
      if (reinterpret_cast<uintptr_t>(stats2d->const_data_ptr()) % (2 * stats2d->element_size()))
        stats2d = stats2d->clone();
    }
    backward_kernel(input)(rows_of(grad_out, dy_dtype), extra2d, as_rows(input, cols), w,
                           grad_sum2d, params, grad_input2d, grad_weight, grad_bias, stats2d);
  }
  auto finish = [&](const optional<Tensor>& g) {
    return g.has_value() ? g->view(param_sizes).to(param_dtype)
                         : at::empty({0}, input.options().dtype(param_dtype));
  };
  return {grad_input, finish(grad_weight), finish(grad_bias)};
}

Tensor rms_norm(const Tensor& input, const optional<Tensor>& weight, double eps,
                const optional<Tensor>& bias, int64_t normalized_ndim, double weight_offset,
                double p, optional<at::ScalarType> out_dtype) {
  return std::get<0>(norm_forward("normpass.rms_norm", input, std::nullopt, weight, bias, false,
                                  eps, normalized_ndim, weight_offset, p, out_dtype));
}

Tensor layer_norm(const Tensor& input, const optional<Tensor>& weight,
                  const optional<Tensor>& bias, double eps, int64_t normalized_ndim,
                  double weight_offset, optional<at::ScalarType> out_dtype) {
  return std::get<0>(norm_forward("normpass.layer_norm", input, std::nullopt, weight, bias, true,
                                  eps, normalized_ndim, weight_offset, 1.0, out_dtype));
}

std::tuple<Tensor, Tensor> add_rms_norm(
    const Tensor& input, const Tensor& residual, const optional<Tensor>& weight, double eps,
    const optional<Tensor>& bias, int64_t normalized_ndim, double weight_offset, double p,
    optional<at::ScalarType> out_dtype) {
  auto [out, sum, stats] = norm_forward("normpass.add_rms_norm", input, residual, weight, bias,
                                        false, eps, normalized_ndim, weight_offset, p, out_dtype);
  return {out, sum};
}

std::tuple<Tensor, Tensor> add_layer_norm(
    const Tensor& input, const Tensor& residual, const optional<Tensor>& weight,
    const optional<Tensor>& bias, double eps, int64_t normalized_ndim, double weight_offset,
    optional<at::ScalarType> out_dtype) {
  auto [out, sum, stats] = norm_forward("normpass.add_layer_norm", input, residual, weight, bias,
                                        true, eps, normalized_ndim, weight_offset, 1.0, out_dtype);
  return {out, sum};
}

// The forward as autograd runs it (csrc/autograd.cpp): any of the four ops, also returning each
// row's (mean, rstd) for the backward; sum is empty without a residual.
std::tuple<Tensor, Tensor, Tensor> norm_with_stats(
    const Tensor& input, const optional<Tensor>& residual, const optional<Tensor>& weight,
    const optional<Tensor>& bias, double eps, bool center, int64_t normalized_ndim,
    double weight_offset, double p, optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(!center || p == 1.0, "normpass.norm_with_stats: p must be 1 for LayerNorm, got ", num(p));
  // Errors name the op the user called, which autograd runs as this one.
  const char* op = residual ? (center ? "normpass.add_layer_norm" : "normpass.add_rms_norm")
                            : (center ? "normpass.layer_norm" : "normpass.rms_norm");
  auto [out, sum, stats] = norm_forward(op, input, residual, weight, bias, center, eps,
                                        normalized_ndim, weight_offset, p, out_dtype,
                                        /*want_stats=*/true);
  return {out, sum.defined() ? sum : at::empty({0}, input.options()), stats};
}

std::tuple<Tensor, Tensor, Tensor> rms_norm_backward(
    const Tensor& grad_out, const Tensor& input, const optional<Tensor>& weight,
    const optional<Tensor>& grad_sum, double eps, optional<at::TensorList> extra_grad_outs,
    const optional<Tensor>& stats, bool has_bias, int64_t normalized_ndim, double weight_offset,
    double p, bool weight_grad) {
  return norm_backward("normpass.rms_norm_backward", grad_out, input, weight, false, eps,
                       has_bias, normalized_ndim, weight_offset, p, grad_sum,
                       extra_grad_outs.value_or(at::TensorList()), stats, weight_grad);
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward(
    const Tensor& grad_out, const Tensor& input, const optional<Tensor>& weight,
    const optional<Tensor>& grad_sum, double eps, optional<at::TensorList> extra_grad_outs,
    const optional<Tensor>& stats, bool has_bias, int64_t normalized_ndim, double weight_offset,
    bool weight_grad) {
  return norm_backward("normpass.layer_norm_backward", grad_out, input, weight, true, eps,
                       has_bias, normalized_ndim, weight_offset, 1.0, grad_sum,
                       extra_grad_outs.value_or(at::TensorList()), stats, weight_grad);
}

} // namespace

// Keep in sync with normpass/_schemas.py (a test compares them).
TORCH_LIBRARY(normpass, m) {
  m.def("rms_norm(Tensor input, Tensor? weight, float eps, Tensor? bias=None, *, "
        "int normalized_ndim=1, float weight_offset=0., float p=1., "
        "ScalarType? out_dtype=None) -> Tensor");
  m.def("layer_norm(Tensor input, Tensor? weight, Tensor? bias, float eps, *, "
        "int normalized_ndim=1, float weight_offset=0., ScalarType? out_dtype=None) -> Tensor");
  m.def("add_rms_norm(Tensor input, Tensor residual, Tensor? weight, float eps, "
        "Tensor? bias=None, *, int normalized_ndim=1, float weight_offset=0., float p=1., "
        "ScalarType? out_dtype=None) -> (Tensor, Tensor)");
  m.def("add_layer_norm(Tensor input, Tensor residual, Tensor? weight, Tensor? bias, float eps, "
        "*, int normalized_ndim=1, float weight_offset=0., ScalarType? out_dtype=None) "
        "-> (Tensor, Tensor)");
  m.def("norm_with_stats(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, float eps, "
        "*, bool center, int normalized_ndim=1, float weight_offset=0., float p=1., "
        "ScalarType? out_dtype=None) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor? grad_sum, "
        "float eps, Tensor[]? extra_grad_outs=None, Tensor? stats=None, *, bool has_bias, "
        "int normalized_ndim, float weight_offset, float p, bool weight_grad=True) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor? grad_sum, "
        "float eps, Tensor[]? extra_grad_outs=None, Tensor? stats=None, *, bool has_bias, "
        "int normalized_ndim, float weight_offset, bool weight_grad=True) "
        "-> (Tensor, Tensor, Tensor)");
}

#define NORMPASS_IMPL(dispatch_key)                              \
  TORCH_LIBRARY_IMPL(normpass, dispatch_key, m) {                \
    m.impl("rms_norm", &rms_norm);                               \
    m.impl("layer_norm", &layer_norm);                           \
    m.impl("add_rms_norm", &add_rms_norm);                       \
    m.impl("add_layer_norm", &add_layer_norm);                   \
    m.impl("norm_with_stats", &norm_with_stats);                 \
    m.impl("rms_norm_backward", &rms_norm_backward);             \
    m.impl("layer_norm_backward", &layer_norm_backward);         \
  }

NORMPASS_IMPL(CPU)
#ifdef NORMPASS_WITH_CUDA
NORMPASS_IMPL(CUDA)
#endif

} // namespace normpass
