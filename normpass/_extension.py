"""Loads the C++ op library, or registers the pure-PyTorch reference ops in its place.

Either way `torch.ops.normpass.*` exists after import, with the same schemas.
"""

from __future__ import annotations

import os
import warnings

import torch

from normpass import reference
from normpass._schemas import SCHEMAS

# Why the compiled kernels are not in use, or None when they are.
FALLBACK_REASON: str | None = None


def _load() -> str | None:
    if os.environ.get("NORMPASS_FORCE_REFERENCE") == "1":
        return "NORMPASS_FORCE_REFERENCE=1 is set"
    try:
        from normpass import _C  # noqa: F401  (registers the ops)
    except (ImportError, OSError) as e:
        return f"the C++ extension normpass._C failed to load: {e}"
    return None


def _register_reference_ops() -> None:
    lib = torch.library.Library("normpass", "DEF")  # noqa: TOR901
    for name, schema in SCHEMAS.items():
        lib.define(name + schema)

    def forward(
        op,
        input,
        residual,
        weight,
        bias,
        eps,
        *,
        center,
        normalized_ndim=1,
        weight_offset=0.0,
        p=1.0,
        out_dtype=None,
    ):
        reference.check_forward(op, input, residual, weight, bias, eps, normalized_ndim, p, out_dtype)
        x = input if residual is None else input + residual
        y = reference.norm(
            x,
            weight,
            bias,
            eps,
            center=center,
            normalized_ndim=normalized_ndim,
            weight_offset=weight_offset,
            p=p,
            out_dtype=out_dtype,
        )
        # The ops' contract (as the kernels keep it): outputs are contiguous, whatever the input's layout.
        return y.contiguous() if residual is None else (y.contiguous(), x.contiguous())

    def rms_norm(input, weight, eps, bias=None, **kw):
        return forward("normpass.rms_norm", input, None, weight, bias, eps, center=False, **kw)

    def layer_norm(input, weight, bias, eps, **kw):
        return forward("normpass.layer_norm", input, None, weight, bias, eps, center=True, **kw)

    def add_rms_norm(input, residual, weight, eps, bias=None, **kw):
        return forward("normpass.add_rms_norm", input, residual, weight, bias, eps, center=False, **kw)

    def add_layer_norm(input, residual, weight, bias, eps, **kw):
        return forward("normpass.add_layer_norm", input, residual, weight, bias, eps, center=True, **kw)

    def norm_with_stats(input, residual, weight, bias, eps, *, center, normalized_ndim=1, p=1.0, **kw):
        op = reference.with_stats_op(center, residual is not None, p)
        kw.update(center=center, normalized_ndim=normalized_ndim, p=p)
        outs = forward(op, input, residual, weight, bias, eps, **kw)
        out, total = outs if residual is not None else (outs, input.new_empty(0))
        x = input if residual is None else total
        stats = reference.row_stats(x, eps, center=center, normalized_ndim=normalized_ndim, p=p)
        return out, total, stats

    # The statistics are checked, then recomputed (as the CPU kernels do).
    def backward(op, grad_out, input, weight, grad_sum, eps, more, stats, *, normalized_ndim, p=1.0, **kw):
        args = (grad_out, input, weight, grad_sum, eps, more)
        reference.check_backward(op, *args, normalized_ndim, p, stats)
        dx, dw, db = reference.norm_backward(*args, normalized_ndim=normalized_ndim, p=p, **kw)
        return dx.contiguous(), dw, db

    def rms_norm_backward(grad_out, input, weight, grad_sum, eps, extra_grad_outs=None, stats=None, **kw):
        op = "normpass.rms_norm_backward"
        args = (grad_out, input, weight, grad_sum, eps, extra_grad_outs, stats)
        return backward(op, *args, center=False, **kw)

    def layer_norm_backward(grad_out, input, weight, grad_sum, eps, extra_grad_outs=None, stats=None, **kw):
        op = "normpass.layer_norm_backward"
        args = (grad_out, input, weight, grad_sum, eps, extra_grad_outs, stats)
        return backward(op, *args, center=True, **kw)

    for fn in (
        rms_norm,
        layer_norm,
        add_rms_norm,
        add_layer_norm,
        norm_with_stats,
        rms_norm_backward,
        layer_norm_backward,
    ):
        lib.impl(fn.__name__, fn, "CompositeExplicitAutograd")
    _register_reference_ops.lib = lib  # keep the registrations alive


FALLBACK_REASON = _load()
if FALLBACK_REASON is not None:
    warnings.warn(
        f"normpass: using the pure-PyTorch reference ops, not the fused kernels, because {FALLBACK_REASON}. "
        "Rebuild with `pip install --no-build-isolation -e .` to get them.",
        stacklevel=2,
    )
    _register_reference_ops()
