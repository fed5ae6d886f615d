// Autograd of the four forward ops, in C++: a Python autograd formula (torch.library's
// register_autograd) costs more host time per forward + backward than the kernels themselves
// on small tensors. One Function serves the four ops; `center` and the residual pick the op.
//
// Forward saves the input (the residual ops: the sum they return, which is what they
// normalize), the weight and each row's (mean, rstd), which the backward ops read instead of
// recomputing them. Without gradients to record (inference) the plain forward op runs, and no
// statistics are kept. Under create_graph
// the backward op is called through autograd, where normpass/ops.py gives it a formula (double
// backward); otherwise it is called below autograd, so an ordinary backward runs no Python.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace normpass {

using at::Tensor;
using std::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The scalar arguments of a forward op.
struct NormArgs {
  bool center;
  double eps;
  int64_t normalized_ndim;
  double weight_offset;
  double p;
  optional<at::ScalarType> out_dtype;
  bool save_stats = false; // run as norm_with_stats and keep (mean, rstd) for the backward
};

namespace {

using Grads = std::tuple<Tensor, Tensor, Tensor>;

template <class Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// (out, sum, stats) through norm_with_stats, below autograd; sum is empty without a residual.
variable_list run_forward_with_stats(const NormArgs& a, const Tensor& input,
                                     const optional<Tensor>& residual,
                                     const optional<Tensor>& weight, const optional<Tensor>& bias) {
  static const auto norm_with_stats =
      op<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const optional<Tensor>&,
                                            const optional<Tensor>&, const optional<Tensor>&,
                                            double, bool, int64_t, double, double,
                                            optional<at::ScalarType>)>("normpass::norm_with_stats");
  at::AutoDispatchBelowADInplaceOrView below;
  auto [out, sum, stats] = norm_with_stats.call(input, residual, weight, bias, a.eps, a.center,
                                                a.normalized_ndim, a.weight_offset, a.p,
                                                a.out_dtype);
  return {out, sum, stats};
}

// (out) or (out, sum): the forward op named by `center` and `residual`, below autograd.
variable_list run_forward(const NormArgs& a, const Tensor& input, const optional<Tensor>& residual,
                          const optional<Tensor>& weight, const optional<Tensor>& bias) {
  static const auto rms_norm = op<Tensor(const Tensor&, const optional<Tensor>&, double,
                                         const optional<Tensor>&, int64_t, double, double,
                                         optional<at::ScalarType>)>("normpass::rms_norm");
  static const auto layer_norm = op<Tensor(const Tensor&, const optional<Tensor>&,
                                           const optional<Tensor>&, double, int64_t, double,
                                           optional<at::ScalarType>)>("normpass::layer_norm");
  static const auto add_rms_norm = op<std::tuple<Tensor, Tensor>(
      const Tensor&, const Tensor&, const optional<Tensor>&, double, const optional<Tensor>&,
      int64_t, double, double, optional<at::ScalarType>)>("normpass::add_rms_norm");
  static const auto add_layer_norm = op<std::tuple<Tensor, Tensor>(
      const Tensor&, const Tensor&, const optional<Tensor>&, const optional<Tensor>&, double,
      int64_t, double, optional<at::ScalarType>)>("normpass::add_layer_norm");

  at::AutoDispatchBelowADInplaceOrView below;
  if (!residual.has_value()) {
    return {a.center ? layer_norm.call(input, weight, bias, a.eps, a.normalized_ndim,
                                       a.weight_offset, a.out_dtype)
                     : rms_norm.call(input, weight, a.eps, bias, a.normalized_ndim,
                                     a.weight_offset, a.p, a.out_dtype)};
  }
  auto [out, sum] = a.center ? add_layer_norm.call(input, *residual, weight, bias, a.eps,
                                                   a.normalized_ndim, a.weight_offset, a.out_dtype)
                             : add_rms_norm.call(input, *residual, weight, a.eps, bias,
                                                 a.normalized_ndim, a.weight_offset, a.p,
                                                 a.out_dtype);
  return {out, sum};
}

Grads run_backward(const NormArgs& a, const Tensor& grad_out, const Tensor& x,
                   const optional<Tensor>& weight, const optional<Tensor>& grad_sum,
                   const optional<Tensor>& stats, bool has_bias, bool weight_grad) {
  static const auto rms_norm_backward =
      op<Grads(const Tensor&, const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
               double, optional<at::TensorList>, const optional<Tensor>&, bool, int64_t, double,
               double, bool)>("normpass::rms_norm_backward");
  static const auto layer_norm_backward =
      op<Grads(const Tensor&, const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
               double, optional<at::TensorList>, const optional<Tensor>&, bool, int64_t, double,
               bool)>("normpass::layer_norm_backward");

  std::optional<at::AutoDispatchBelowADInplaceOrView> below;
  if (!at::GradMode::is_enabled()) below.emplace();
  return a.center ? layer_norm_backward.call(grad_out, x, weight, grad_sum, a.eps, std::nullopt,
                                             stats, has_bias, a.normalized_ndim, a.weight_offset,
                                             weight_grad)
                  : rms_norm_backward.call(grad_out, x, weight, grad_sum, a.eps, std::nullopt,
                                           stats, has_bias, a.normalized_ndim, a.weight_offset,
                                           a.p, weight_grad);
}

} // namespace

// Not in the anonymous namespace: its name is the grad_fn's name, "normpass::NormFunction".
struct NormFunction : torch::autograd::Function<NormFunction> {
  static variable_list forward(AutogradContext* ctx, const NormArgs& a, const Tensor& input,
                               const optional<Tensor>& residual, const optional<Tensor>& weight,
                               const optional<Tensor>& bias) {
    variable_list outs = a.save_stats ? run_forward_with_stats(a, input, residual, weight, bias)
                                      : run_forward(a, input, residual, weight, bias);
    // An unused output's gradient stays undefined: no zeros are materialized (and read).
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({residual.has_value() ? outs[1] : input, weight.value_or(Tensor()),
                            a.save_stats ? outs[2] : Tensor()});
    outs.resize(residual.has_value() ? 2 : 1);
    auto& saved = ctx->saved_data;
    saved["center"] = a.center;
    saved["residual"] = residual.has_value();
    saved["residual_dtype"] = residual.has_value() ? c10::IValue(residual->scalar_type()) : c10::IValue();
    saved["eps"] = a.eps;
    saved["normalized_ndim"] = a.normalized_ndim;
    saved["weight_offset"] = a.weight_offset;
    saved["p"] = a.p;
    saved["bias_dtype"] = bias.has_value() ? c10::IValue(bias->scalar_type()) : c10::IValue();
    return outs;
  }

  // An unused output's gradient arrives undefined: an unused `sum` passes no grad_sum; an
  // unused `out` (rare) becomes zeros.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto& saved = ctx->saved_data;
    const NormArgs a{saved.at("center").toBool(), saved.at("eps").toDouble(),
                     saved.at("normalized_ndim").toInt(), saved.at("weight_offset").toDouble(),
                     saved.at("p").toDouble(), std::nullopt};
    const bool residual = saved.at("residual").toBool();
    const c10::IValue& bias_dtype = saved.at("bias_dtype");
    const variable_list tensors = ctx->get_saved_variables();
    const Tensor& weight = tensors[1];
    const Tensor& stats = tensors[2];

    // Frozen parameters (LoRA, BitFit) get no gradient, and the kernels keep no partials for
    // them. Edges are counted over the tensors given: input, residual, weight, bias.
    const size_t weight_edge = residual ? 2 : 1;
    const bool weight_grad = weight.defined() && ctx->needs_input_grad(weight_edge);
    const bool bias_grad =
        !bias_dtype.isNone() && ctx->needs_input_grad(weight_edge + (weight.defined() ? 1 : 0));
    // The backward op returns dbias in the weight's dtype (it does not see the bias): beside a
    // wider bias (fp32 next to a bf16 weight) it reads the weight widened, so that dbias is not
    // rounded on the way.
    Tensor w = weight;
    if (w.defined() && bias_grad) {
      const auto wide = c10::promoteTypes(w.scalar_type(), bias_dtype.toScalarType());
      if (wide != w.scalar_type()) w = w.to(wide);
    }
    const Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(tensors[0]);
    const bool grad_sum = residual && grads[1].defined();
    auto [dx, dw, db] =
        run_backward(a, grad_out, tensors[0], w.defined() ? optional(w) : std::nullopt,
                     grad_sum ? optional(grads[1]) : std::nullopt,
                     stats.defined() ? optional(stats) : std::nullopt, bias_grad, weight_grad);
    // One gradient per forward argument: (args, input, residual, weight, bias); d(sum)/d(input)
    // and d(sum)/d(residual) are both the identity (a 16-bit residual's is rounded to its dtype,
    // as eager's promotion rounds it; only where it is wanted, since that rounding is a pass).
    const bool residual_grad = residual && ctx->needs_input_grad(1);
    const c10::IValue& residual_dtype = saved.at("residual_dtype");
    return {Tensor(), dx, residual_grad ? dx.to(residual_dtype.toScalarType()) : Tensor(),
            weight_grad ? dw.to(weight.scalar_type()) : Tensor(),
            bias_grad ? db.to(bias_dtype.toScalarType()) : Tensor()};
  }
};

namespace {

// NormFunction, keeping the statistics only where a gradient is recorded (not in inference).
variable_list apply_norm(NormArgs a, const Tensor& input, const optional<Tensor>& residual,
                         const optional<Tensor>& weight, const optional<Tensor>& bias) {
  auto requires_grad = [](const optional<Tensor>& t) { return t.has_value() && t->requires_grad(); };
  a.save_stats = at::GradMode::is_enabled() &&
                 (input.requires_grad() || requires_grad(residual) || requires_grad(weight) ||
                  requires_grad(bias));
  return NormFunction::apply(a, input, residual, weight, bias);
}

Tensor rms_norm(const Tensor& input, const optional<Tensor>& weight, double eps,
                const optional<Tensor>& bias, int64_t normalized_ndim, double weight_offset,
                double p, optional<at::ScalarType> out_dtype) {
  const NormArgs a{false, eps, normalized_ndim, weight_offset, p, out_dtype};
  return apply_norm(a, input, std::nullopt, weight, bias)[0];
}

Tensor layer_norm(const Tensor& input, const optional<Tensor>& weight,
                  const optional<Tensor>& bias, double eps, int64_t normalized_ndim,
                  double weight_offset, optional<at::ScalarType> out_dtype) {
  const NormArgs a{true, eps, normalized_ndim, weight_offset, 1.0, out_dtype};
  return apply_norm(a, input, std::nullopt, weight, bias)[0];
}

std::tuple<Tensor, Tensor> add_rms_norm(
    const Tensor& input, const Tensor& residual, const optional<Tensor>& weight, double eps,
    const optional<Tensor>& bias, int64_t normalized_ndim, double weight_offset, double p,
    optional<at::ScalarType> out_dtype) {
  const NormArgs a{false, eps, normalized_ndim, weight_offset, p, out_dtype};
  auto outs = apply_norm(a, input, residual, weight, bias);
  return {outs[0], outs[1]};
}

std::tuple<Tensor, Tensor> add_layer_norm(
    const Tensor& input, const Tensor& residual, const optional<Tensor>& weight,
    const optional<Tensor>& bias, double eps, int64_t normalized_ndim, double weight_offset,
    optional<at::ScalarType> out_dtype) {
  const NormArgs a{true, eps, normalized_ndim, weight_offset, 1.0, out_dtype};
  auto outs = apply_norm(a, input, residual, weight, bias);
  return {outs[0], outs[1]};
}

} // namespace

TORCH_LIBRARY_IMPL(normpass, Autograd, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("layer_norm", &layer_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("add_layer_norm", &add_layer_norm);
}

} // namespace normpass
