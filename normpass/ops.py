"""Fake (meta) impls and autograd for the normpass ops.

The ops themselves are defined in C++ (csrc/ops.cpp) or, without the extension, by
normpass._extension; the forward ops' autograd is C++ too (csrc/autograd.cpp), or registered here
without the extension. Under autograd a forward op runs as `norm_with_stats`, which also returns each
row's (mean, rstd); it saves those, its input (or the residual sum it returns) and the weight, and the
backward kernels read the statistics instead of recomputing them (the pure-PyTorch fallback
recomputes them).

Example:
    >>> x, w = torch.randn(4, 8, requires_grad=True), torch.randn(8)
    >>> y = torch.ops.normpass.rms_norm(x, w, 1e-6)
    >>> y.sum().backward()                        # runs normpass::rms_norm_backward
"""

from __future__ import annotations

import torch
from torch import Tensor

from normpass import _extension, reference

ops = torch.ops.normpass


# ---- fake impls: same checks as the kernels, contiguous outputs like the kernels ----------------------


def _fake_forward(op, input, residual, weight, bias, eps, normalized_ndim, p, out_dtype):
    reference.check_forward(op, input, residual, weight, bias, eps, normalized_ndim, p, out_dtype)
    out = input.new_empty(input.shape, dtype=out_dtype or input.dtype)
    return out if residual is None else (out, input.new_empty(input.shape))


@torch.library.register_fake("normpass::rms_norm")
def _(input, weight, eps, bias=None, *, normalized_ndim=1, weight_offset=0.0, p=1.0, out_dtype=None):
    return _fake_forward("normpass.rms_norm", input, None, weight, bias, eps, normalized_ndim, p, out_dtype)


@torch.library.register_fake("normpass::layer_norm")
def _(input, weight, bias, eps, *, normalized_ndim=1, weight_offset=0.0, out_dtype=None):
    return _fake_forward(
        "normpass.layer_norm", input, None, weight, bias, eps, normalized_ndim, 1.0, out_dtype
    )


@torch.library.register_fake("normpass::add_rms_norm")
def _(
    input, residual, weight, eps, bias=None, *, normalized_ndim=1, weight_offset=0.0, p=1.0, out_dtype=None
):
    return _fake_forward(
        "normpass.add_rms_norm", input, residual, weight, bias, eps, normalized_ndim, p, out_dtype
    )


@torch.library.register_fake("normpass::add_layer_norm")
def _(input, residual, weight, bias, eps, *, normalized_ndim=1, weight_offset=0.0, out_dtype=None):
    return _fake_forward(
        "normpass.add_layer_norm", input, residual, weight, bias, eps, normalized_ndim, 1.0, out_dtype
    )


@torch.library.register_fake("normpass::norm_with_stats")
def _(
    input, residual, weight, bias, eps, *, center, normalized_ndim=1, weight_offset=0.0, p=1.0, out_dtype=None
):
    op = reference.with_stats_op(center, residual is not None, p)
    outs = _fake_forward(op, input, residual, weight, bias, eps, normalized_ndim, p, out_dtype)
    out, total = outs if residual is not None else (outs, input.new_empty(0))
    rows = reference.row_count(input, normalized_ndim)
    return out, total, input.new_empty(rows, 2, dtype=reference.acc_dtype(input))


def _backward_fake(name: str):
    """The fake impl of a backward op; `p` is RMSNorm's only (LayerNorm's schema has none)."""

    def fake(
        grad_out,
        input,
        weight,
        grad_sum,
        eps,
        extra_grad_outs=None,
        stats=None,
        *,
        has_bias,
        normalized_ndim,
        weight_offset,
        p=1.0,
        weight_grad=True,
    ):
        reference.check_backward(
            f"normpass.{name}",
            grad_out,
            input,
            weight,
            grad_sum,
            eps,
            extra_grad_outs,
            normalized_ndim,
            p,
            stats,
        )
        param_shape = input.shape[input.dim() - normalized_ndim :]
        param_dtype = reference.param_grad_dtype(input, weight)
        # Absent gradients are distinct empty tensors, as the kernels return them (never aliases).
        has_dw = weight is not None and weight_grad
        grad_weight = input.new_empty(param_shape if has_dw else (0,), dtype=param_dtype)
        grad_bias = input.new_empty(param_shape if has_bias else (0,), dtype=param_dtype)
        return input.new_empty(input.shape), grad_weight, grad_bias

    return fake


for _name in ("rms_norm_backward", "layer_norm_backward"):
    torch.library.register_fake(f"normpass::{_name}")(_backward_fake(_name))


# ---- autograd -----------------------------------------------------------------------------------------
#
# The forward ops' autograd lives in C++ (csrc/autograd.cpp), so that forward + backward runs no Python;
# without the extension it is registered here, with the same formula. Either way the gradients come from
# the backward ops, and double backward goes through the backward ops' own formula below.


def _backward_op_setup(center: bool):
    def setup_context(ctx, inputs, keyword_only_inputs, output):
        grad_out, input, weight, grad_sum, ctx.eps, extra = (*inputs, None)[:6]
        ctx.kw = dict(keyword_only_inputs, center=center)
        ctx.n_extra = None if extra is None else len(extra)
        ctx.save_for_backward(grad_out, input, weight, grad_sum, *(extra or ()))

    return setup_context


def _backward_op_grads(ctx, *grads):
    """Gradients of a backward op (double backward), by differentiating `reference.norm_backward`."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        # Under create_graph, inputs already in a graph are used as they are, so that the result stays
        # differentiable with respect to them (third and higher orders); the rest are fresh leaves.
        ins = [
            t if t is None or (create_graph and t.requires_grad) else t.detach().requires_grad_()
            for t in ctx.saved_tensors
        ]
        extra = None if ctx.n_extra is None else ins[4:]
        outs = reference.norm_backward(*ins[:4], ctx.eps, extra, **ctx.kw)
    # Absent dweight/dbias are empty tensors that depend on nothing.
    used = [(o, g) for o, g in zip(outs, grads, strict=True) if o.requires_grad]
    wrt = [t for t in ins if t is not None]
    found = iter(
        torch.autograd.grad(
            [o for o, _ in used], wrt, [g for _, g in used], allow_unused=True, create_graph=create_graph
        )
    )
    grads_in = [None if t is None else next(found) for t in ins]
    # One per argument the caller passed (defaults are not among them): grad_out, input, weight,
    # grad_sum, eps (none), extra_grad_outs (a list), stats (none: the formula recomputes them from
    # input, so their dependence on it is already counted).
    grads_all = (*grads_in[:4], None, None if extra is None else grads_in[4:], None)
    return grads_all[: len(ctx.needs_input_grad)]


torch.library.register_autograd(
    "normpass::rms_norm_backward", _backward_op_grads, setup_context=_backward_op_setup(center=False)
)
torch.library.register_autograd(
    "normpass::layer_norm_backward", _backward_op_grads, setup_context=_backward_op_setup(center=True)
)


def _norm_grads(ctx, grad_out: Tensor, grad_sum: Tensor | None):
    """(grad_input, grad_weight, grad_bias) through the fused backward op (as csrc/autograd.cpp does)."""
    x, weight = ctx.saved_tensors
    # Frozen parameters get no gradient (and the kernels keep no partials for them).
    weight_grad = weight is not None and ctx.needs_input_grad[ctx.weight_index]
    bias_grad = ctx.has_bias and ctx.needs_input_grad[ctx.bias_index]
    kw = dict(
        has_bias=bias_grad,
        normalized_ndim=ctx.normalized_ndim,
        weight_offset=ctx.weight_offset,
        weight_grad=weight_grad,
    )
    if ctx.center:
        backward_op = ops.layer_norm_backward
    else:
        backward_op, kw["p"] = ops.rms_norm_backward, ctx.p
    w = weight  # widened beside a wider bias, whose gradient comes back in w's dtype
    if weight is not None and bias_grad:
        w = weight.to(torch.promote_types(weight.dtype, ctx.bias_dtype))
    dx, dw, db = backward_op(grad_out, x, w, grad_sum, ctx.eps, **kw)
    dw = dw.to(weight.dtype) if weight_grad else None
    db = db.to(ctx.bias_dtype) if bias_grad else None
    return dx, dw, db


def _setup(center: bool, residual: bool):
    def setup_context(ctx, inputs, keyword_only_inputs, output):
        args = list(inputs)
        input = args.pop(0)
        if residual:
            args.pop(0)
        if center:
            weight, bias, eps = args
        else:
            weight, eps, bias = args
        # Positions in the op's arguments, for needs_input_grad: (input, [residual,] weight, ...).
        ctx.weight_index = 2 if residual else 1
        ctx.bias_index = ctx.weight_index + (1 if center else 2)
        ctx.center, ctx.eps = center, eps
        ctx.normalized_ndim = keyword_only_inputs.get("normalized_ndim", 1)
        ctx.weight_offset = keyword_only_inputs.get("weight_offset", 0.0)
        ctx.p = keyword_only_inputs.get("p", 1.0)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.residual_dtype = inputs[1].dtype if residual else None
        # The residual ops normalize the sum they return: save that instead of recomputing it.
        ctx.save_for_backward(output[1] if residual else input, weight)

    return setup_context


def _reorder(center: bool, grads):
    dx, dw, db = grads
    return (dx, dw, db, None) if center else (dx, dw, None, db)


def _register_forward_autograd() -> None:
    torch.library.register_autograd(
        "normpass::rms_norm",
        lambda ctx, g: _reorder(False, _norm_grads(ctx, g, None)),
        setup_context=_setup(center=False, residual=False),
    )
    torch.library.register_autograd(
        "normpass::layer_norm",
        lambda ctx, g: _reorder(True, _norm_grads(ctx, g, None)),
        setup_context=_setup(center=True, residual=False),
    )

    # d(sum)/d(input) and d(sum)/d(residual) are the identity; a 16-bit residual's is rounded to it
    # (only where it is wanted, since that rounding is a pass).
    def with_residual(ctx, grads):
        dx, *rest = grads
        return (dx, dx.to(ctx.residual_dtype) if ctx.needs_input_grad[1] else None, *rest)

    torch.library.register_autograd(
        "normpass::add_rms_norm",
        lambda ctx, g, gs: with_residual(ctx, _reorder(False, _norm_grads(ctx, g, gs))),
        setup_context=_setup(center=False, residual=True),
    )
    torch.library.register_autograd(
        "normpass::add_layer_norm",
        lambda ctx, g, gs: with_residual(ctx, _reorder(True, _norm_grads(ctx, g, gs))),
        setup_context=_setup(center=True, residual=True),
    )


if _extension.FALLBACK_REASON is not None:
    _register_forward_autograd()
