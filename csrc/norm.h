// Shared contract between the op front end (ops.cpp) and the device kernels.
//
// One normalization covers every normpass op: LayerNorm is `center = true`,
// RMSNorm is `center = false`, pRMSNorm takes its statistics over the first
// `stat_cols` columns only. The residual-add variants also write
// `sum = x + residual` and normalize that sum.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <optional>

namespace normpass {

// The kernels' accumulation dtype for rows of x: of their arithmetic, of the
// row statistics, and of dweight/dbias in a dtype other than x's.
inline at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A 16-bit residual, output or gradient of fp32 rows. Under autocast the residual stream is fp32
// and each projection bf16: a norm's residual add is fp32 + bf16 (the kernels widen the residual
// as they load it, as eager's promotion does), and normpass/fold_casts.py folds the casts of its
// output and of its gradients into the op (the kernels write such an output and read such
// gradients as they are, summing several in fp32).
inline bool is_16_bit_of_fp32(at::ScalarType x, at::ScalarType t) {
  return x == at::kFloat && (t == at::kBFloat16 || t == at::kHalf);
}

struct NormParams {
  bool center = false;        // subtract the mean (LayerNorm) or not (RMSNorm)
  double eps = 0.0;           // added to the variance / mean square, inside the root
  double weight_offset = 0.0; // y = xhat * (weight + weight_offset) + bias (Gemma: 1)
  int64_t stat_cols = 0;      // columns the statistics are taken over (pRMSNorm); <= cols, == cols if center
};

// Every tensor below is a 2-D (rows, cols) view with unit column stride; the
// row stride is free (the front end makes anything else contiguous first).
// weight and bias are 1-D, contiguous, of length cols, and either of x's dtype
// or fp32 (fp64 for fp64 input); the front end casts any other dtype.
// Statistics and arithmetic are in fp32 (fp64 for fp64 input).

// out: (rows, cols), out dtype. sum (only with residual): input dtype; the
// kernel normalizes the rounded sum, exactly as `norm(x + residual)` would.
// stats (only when given): (rows, 2), fp32 (fp64 for fp64 input): each row's
// (mean, rstd) as the forward used them (mean 0 for RMSNorm), for autograd to
// hand to the backward.
using NormForward = void(
    const at::Tensor& x,
    const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const NormParams& params,
    at::Tensor& out,
    std::optional<at::Tensor>& sum,
    std::optional<at::Tensor>& stats);

// Takes the row statistics from `stats` (the forward's, as above) or, without
// them, recomputes them from x, then writes
// grad_input = d(out)/dx . grad_out (+ grad_sum when given, the gradient that
// flows into `sum` directly), and, when defined, grad_weight / grad_bias
// (length cols, in x's dtype or the accumulation dtype; written, not
// accumulated: the front end allocates them uninitialized). Reductions over
// rows must be deterministic.
// grad_out is of x's dtype, or 16-bit for fp32 x; the CUDA kernels also take
// fp32 for 16-bit x.
// extra_grad_outs (grad_out's dtype, x's shape) are further terms of the
// output's gradient: grad_out + extra[0] + ..., each sum rounded to the wider
// of grad_out's and x's dtypes, as the eager adds are (16-bit terms of fp32 x
// are autocast casts' gradients, widened before they are summed; a grad_sum
// wider than x widens everything first, ops.cpp). An output
// read by several ops (q, k and v projections) gets one term per reader, so
// the backward sums them as it loads them instead of after a separate add
// kernel.
using NormBackward = void(
    const at::Tensor& grad_out,
    at::TensorList extra_grad_outs,
    const at::Tensor& x,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& grad_sum,
    const NormParams& params,
    at::Tensor& grad_input,
    std::optional<at::Tensor>& grad_weight,
    std::optional<at::Tensor>& grad_bias,
    const std::optional<at::Tensor>& stats);

// The kernels, declared through the two signatures above.
NormForward norm_forward_cpu;
NormBackward norm_backward_cpu;
#ifdef NORMPASS_WITH_CUDA
NormForward norm_forward_cuda;
NormBackward norm_backward_cuda;
#endif

} // namespace normpass
