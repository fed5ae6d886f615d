"""Pure-PyTorch normalization: the ground truth in tests and the fallback when _C is missing.

Every function here is differentiable with ordinary autograd, which also makes it the double-backward
path of the fused ops.

Example:
    >>> x, w = torch.randn(4, 8), torch.randn(8)
    >>> y = norm(x, w, None, 1e-6, center=False)   # RMSNorm
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch
from torch import Tensor


def stat_cols(p: float, n: int) -> int:
    """Columns the statistics are taken over: ceil(p * n), at least 1 (pRMSNorm; all when p == 1).

    The product is shrunk by a few ulps first: p = 0.07 of n = 100 is 7.000000000000001 in floating
    point, and takes 7 columns, not 8. csrc/ops.cpp computes the same bits.

        >>> stat_cols(0.07, 100), stat_cols(0.0625, 1000)
        (7, 63)
    """
    return max(1, math.ceil(p * n * (1.0 - 4 * sys.float_info.epsilon)))


def is_float_dtype(dtype: torch.dtype) -> bool:
    """Floating point, and not one of the float8 storage types (the kernels do not take those)."""
    return dtype.is_floating_point and dtype.itemsize > 1


def is_16_bit_of_fp32(x: torch.dtype, t: torch.dtype) -> bool:
    """A 16-bit tensor beside fp32 x that the ops take as it is (csrc/norm.h): a residual (fp32 x + a
    bf16 projection under autocast), an output (out_dtype) or a gradient, widened or rounded exactly
    where eager casts would."""
    return x == torch.float32 and t in (torch.bfloat16, torch.float16)


def check_like_input(op: str, name: str, t: Tensor, input: Tensor) -> None:
    """`t` (residual, grad_out, grad_sum) must match input's device and shape, and be floating point."""
    torch._check(
        t.device == input.device, lambda: f"{op}: {name} is on {t.device} but input is on {input.device}"
    )
    torch._check(
        t.shape == input.shape,
        lambda: f"{op}: {name} has shape {list(t.shape)} but input has shape {list(input.shape)}",
    )
    torch._check(
        is_float_dtype(t.dtype), lambda: f"{op}: {name} must be a floating-point tensor, got {t.dtype}"
    )


def check_args(
    op: str,
    input: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    normalized_ndim: int,
    eps: float,
    p: float = 1.0,
) -> None:
    """The checks csrc/ops.cpp makes, with the same messages, for fake and reference impls."""
    torch._check(
        is_float_dtype(input.dtype), lambda: f"{op}: input must be a floating-point tensor, got {input.dtype}"
    )
    torch._check(normalized_ndim >= 1, lambda: f"{op}: normalized_ndim must be >= 1, got {normalized_ndim}")
    torch._check(
        normalized_ndim <= input.dim(),
        lambda: f"{op}: normalized_ndim ({normalized_ndim}) is larger than input.dim() ({input.dim()})",
    )
    torch._check(eps >= 0, lambda: f"{op}: eps must be >= 0, got {eps}")
    torch._check(0 < p <= 1, lambda: f"{op}: p must be in (0, 1], got {p}")
    torch._check(
        input.device.type != "cuda" or input.dtype != torch.float64,
        lambda: f"{op}: float64 input is supported on CPU only, got it on {input.device}",
    )
    if residual is not None:
        check_like_input(op, "residual", residual, input)
        torch._check(
            residual.dtype == input.dtype or is_16_bit_of_fp32(input.dtype, residual.dtype),
            lambda: (
                f"{op}: residual has dtype {residual.dtype} but input has dtype {input.dtype} (a "
                "residual must have input's dtype, or be bfloat16 / float16 beside float32 input; the "
                "add is commutative: pass the wider tensor as input)"
            ),
        )
    expected = tuple(input.shape[input.dim() - normalized_ndim :])
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _check_param(op, name, t, input, normalized_ndim, expected)


def _check_param(op: str, name: str, t: Tensor, input: Tensor, normalized_ndim: int, expected: tuple) -> None:
    torch._check(
        is_float_dtype(t.dtype), lambda: f"{op}: {name} must be a floating-point tensor, got {t.dtype}"
    )
    torch._check(
        t.device == input.device, lambda: f"{op}: {name} is on {t.device} but input is on {input.device}"
    )
    torch._check(
        tuple(t.shape) == expected,
        lambda: (
            f"{op}: {name} has shape {list(t.shape)} but the normalized shape (the last "
            f"{normalized_ndim} dims of input) is {list(expected)}"
        ),
    )


def check_forward(
    op: str,
    input: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    normalized_ndim: int,
    p: float,
    out_dtype: torch.dtype | None,
) -> None:
    """Every check of a forward op (`check_args` and out_dtype), for fake and reference impls."""
    check_args(op, input, residual, weight, bias, normalized_ndim=normalized_ndim, eps=eps, p=p)
    torch._check(
        out_dtype is None or is_float_dtype(out_dtype),
        lambda: f"{op}: out_dtype must be a floating-point dtype, got {out_dtype}",
    )


def check_backward(
    op: str,
    grad_out: Tensor,
    input: Tensor,
    weight: Tensor | None,
    grad_sum: Tensor | None,
    eps: float,
    extra_grad_outs: Sequence[Tensor] | None,
    normalized_ndim: int,
    p: float,
    stats: Tensor | None = None,
) -> None:
    """Every check of a backward op, for fake and reference impls."""
    check_args(op, input, None, weight, None, normalized_ndim=normalized_ndim, eps=eps, p=p)
    check_like_input(op, "grad_out", grad_out, input)
    if grad_sum is not None:
        check_like_input(op, "grad_sum", grad_sum, input)
    for i, term in enumerate(extra_grad_outs or ()):
        check_like_input(op, f"extra_grad_outs[{i}]", term, input)
    if stats is not None:
        rows = row_count(input, normalized_ndim)
        acc = acc_dtype(input)
        torch._check(
            stats.device == input.device,
            lambda: f"{op}: stats is on {stats.device} but input is on {input.device}",
        )
        torch._check(
            stats.shape == (rows, 2),
            lambda: (
                f"{op}: stats has shape {list(stats.shape)} but the forward's statistics of {rows} rows "
                f"have shape [{rows}, 2]"
            ),
        )
        torch._check(stats.dtype == acc, lambda: f"{op}: stats has dtype {stats.dtype} but must be {acc}")


def with_stats_op(center: bool, residual: bool, p: float) -> str:
    """The forward op `norm_with_stats` stands in for under autograd (its errors name that op)."""
    torch._check(
        not center or p == 1.0, lambda: f"normpass.norm_with_stats: p must be 1 for LayerNorm, got {p}"
    )
    return f"normpass.{'add_' if residual else ''}{'layer' if center else 'rms'}_norm"


def row_count(input: Tensor, normalized_ndim: int) -> int:
    """Rows of the normalized shape in input; none without columns, as the kernels count them."""
    n = math.prod(input.shape[input.dim() - normalized_ndim :])
    return input.numel() // n if n else 0


def _mean_rstd(h: Tensor, k: int, center: bool, eps: float) -> tuple[Tensor | float, Tensor]:
    """Mean (0.0 for RMSNorm) and rstd over the first k values of h's last dim, keeping that dim."""
    stats = h[..., :k]
    mean = stats.mean(-1, keepdim=True) if center else 0.0
    return mean, torch.rsqrt((stats - mean).square().mean(-1, keepdim=True) + eps)


def acc_dtype(input: Tensor) -> torch.dtype:
    """The dtype the kernels accumulate in: float64 for float64 input, else float32."""
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def param_grad_dtype(input: Tensor, weight: Tensor | None) -> torch.dtype:
    """dweight's and dbias's dtype in the backward ops: the weight's, else the accumulation dtype
    (autograd casts dbias to the bias's dtype, which the backward ops do not see)."""
    return weight.dtype if weight is not None else acc_dtype(input)


def row_stats(input: Tensor, eps: float, *, center: bool, normalized_ndim: int = 1, p: float = 1.0) -> Tensor:
    """Each row's (mean, rstd) as `norm` uses them (mean 0 for RMSNorm): the forward's saved statistics.

    Example:
        >>> row_stats(torch.randn(4, 8), 1e-6, center=True).shape
        torch.Size([4, 2])
    """
    n = math.prod(input.shape[input.dim() - normalized_ndim :])
    h = input.to(acc_dtype(input)).reshape(row_count(input, normalized_ndim), n)
    mean, rstd = _mean_rstd(h, stat_cols(p, n), center, eps)
    return torch.cat([mean if center else torch.zeros_like(rstd), rstd], -1)


def norm(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    center: bool,
    normalized_ndim: int = 1,
    weight_offset: float = 0.0,
    p: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """LayerNorm (center=True) or (partial) RMSNorm over the last normalized_ndim dims, in fp32 (fp64)."""
    acc = acc_dtype(input)
    h = input.to(acc).flatten(input.dim() - normalized_ndim)
    mean, rstd = _mean_rstd(h, stat_cols(p, h.shape[-1]), center, eps)
    y = ((h - mean) * rstd).view(input.shape)
    if weight is not None:
        y = y * (weight.to(acc) + weight_offset)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(out_dtype or input.dtype)


def norm_backward(
    grad_out: Tensor,
    input: Tensor,
    weight: Tensor | None,
    grad_sum: Tensor | None,
    eps: float,
    extra_grad_outs: Sequence[Tensor] | None = None,
    *,
    center: bool,
    has_bias: bool,
    normalized_ndim: int,
    weight_offset: float,
    p: float = 1.0,
    weight_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias) of `norm`, as the *_backward ops return them.

    grad_bias is computed only with `has_bias`, grad_weight only with a weight and `weight_grad`
    (False for a frozen weight); absent ones come back empty.

    The output's gradient is grad_out plus any `extra_grad_outs`, added in order in grad_out's dtype
    or x's, the wider (as the eager adds the backward ops fold in). Written out in closed form (the
    formula the kernels use) rather than through torch.autograd.grad, so it is itself differentiable
    with no re-entrant autograd call: the fused ops' double backward goes through it.
    """
    # A grad_out wider than x (out_dtype=float32 on bf16 x) keeps its width, as in the kernels.
    wide = torch.promote_types(input.dtype, grad_out.dtype)
    for term in extra_grad_outs or ():
        grad_out = grad_out.to(wide) + term.to(wide)
    acc = torch.float64 if wide == torch.float64 else torch.float32
    param_shape = input.shape[input.dim() - normalized_ndim :]
    param_dtype = param_grad_dtype(input, weight)
    n = math.prod(param_shape)
    rows = row_count(input, normalized_ndim)
    h = input.to(acc).reshape(rows, n)
    dy = grad_out.to(acc).reshape(rows, n)
    k = stat_cols(p, n)
    mean, rstd = _mean_rstd(h, k, center, eps)
    xhat = (h - mean) * rstd
    g = dy * (weight.to(acc).reshape(n) + weight_offset) if weight is not None else dy
    mean_g = g.mean(-1, keepdim=True) if center else 0.0
    # rstd depends on the first k columns only (all of them unless pRMSNorm).
    in_stats = (torch.arange(n, device=input.device) < k).to(acc)
    dx = rstd * (g - mean_g - xhat * in_stats * ((g * xhat).sum(-1, keepdim=True) / k))
    dx = dx.view(input.shape)
    if grad_sum is not None:
        dx = dx + grad_sum.to(acc)
    # Absent gradients are distinct empty tensors (outputs of one op must not alias).
    empty = input.new_empty(0, dtype=param_dtype)
    dw = (dy * xhat).sum(0).view(param_shape).to(param_dtype) if weight is not None and weight_grad else empty
    db = dy.sum(0).view(param_shape).to(param_dtype) if has_bias else empty.clone()
    return dx.to(input.dtype), dw, db
