"""The two backward ops under one calling convention (their schemas differ in RMSNorm's `p`)."""

from __future__ import annotations

import functools

import torch

import normpass  # noqa: F401  (registers torch.ops.normpass)


def backward_op(center: bool, *, has_bias: bool | None = None, weight_offset: float = 0.0):
    """`layer_norm_backward` (center) or `rms_norm_backward` over rows (normalized_ndim=1, p=1),
    with its keyword arguments bound; has_bias defaults to center.

    Example:
        >>> dx, dw, db = backward_op(True)(dy, x, w, None, 1e-5)
    """
    ops = torch.ops.normpass
    op = ops.layer_norm_backward if center else ops.rms_norm_backward
    kw = dict(normalized_ndim=1, weight_offset=weight_offset, **({} if center else {"p": 1.0}))
    return functools.partial(op, has_bias=center if has_bias is None else has_bias, **kw)
