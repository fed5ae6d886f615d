"""Bad arguments give the same clear error, naming the argument, from the C++ CPU kernels, the fake
impls (FakeTensorMode) and meta tensors."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import normpass  # noqa: F401  (registers the ops)

ops = torch.ops.normpass
BWD = dict(has_bias=False, normalized_ndim=1, weight_offset=0.0)


def inputs():
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    return x, r, w, b


# (op, lambda x, r, w, b -> (args, kwargs), message regex)
CASES = {
    "weight_shape": (
        "rms_norm",
        lambda x, r, w, b: ((x, w[:7], 1e-5), {}),
        r"normpass\.rms_norm: weight has shape \[7\] but the normalized shape \(the last 1 dims "
        r"of input\) is \[8\]",
    ),
    "bias_shape": (
        "layer_norm",
        lambda x, r, w, b: ((x, w, b.expand(3, 8), 1e-5), {}),
        r"normpass\.layer_norm: bias has shape \[3, 8\] but the normalized shape",
    ),
    "weight_shape_ndim2": (
        "add_rms_norm",
        lambda x, r, w, b: ((x, r, w, 1e-5), dict(normalized_ndim=2)),
        r"weight has shape \[8\] but the normalized shape \(the last 2 dims of input\) is "
        r"\[3, 8\]",
    ),
    "int_input": (
        "rms_norm",
        lambda x, r, w, b: ((x.int(), w, 1e-5), {}),
        r"normpass\.rms_norm: input must be a floating-point tensor, got torch\.int32",
    ),
    "complex_input": (
        "layer_norm",
        lambda x, r, w, b: ((x.to(torch.complex64), None, None, 1e-5), {}),
        r"input must be a floating-point tensor, got torch\.complex64",
    ),
    "float8_input": (
        "rms_norm",
        lambda x, r, w, b: ((x.to(torch.float8_e4m3fn), None, 1e-5), {}),
        r"input must be a floating-point tensor, got torch\.float8_e4m3fn",
    ),
    "int_weight": (
        "layer_norm",
        lambda x, r, w, b: ((x, w.long(), b, 1e-5), {}),
        r"normpass\.layer_norm: weight must be a floating-point tensor, got torch\.int64",
    ),
    "complex_bias": (
        "add_layer_norm",
        lambda x, r, w, b: ((x, r, w, b.to(torch.complex64), 1e-5), {}),
        r"normpass\.add_layer_norm: bias must be a floating-point tensor, got torch\.complex64",
    ),
    "negative_eps": (
        "rms_norm",
        lambda x, r, w, b: ((x, w, -1e-5), {}),
        r"normpass\.rms_norm: eps must be >= 0, got -1e-05",
    ),
    "p_zero": (
        "rms_norm",
        lambda x, r, w, b: ((x, w, 1e-5), dict(p=0.0)),
        r"normpass\.rms_norm: p must be in \(0, 1\], got 0",
    ),
    "p_above_one": (
        "add_rms_norm",
        lambda x, r, w, b: ((x, r, w, 1e-5), dict(p=1.5)),
        r"normpass\.add_rms_norm: p must be in \(0, 1\], got 1\.5",
    ),
    "p_just_above_one": (  # every digit it takes to tell it from 1
        "rms_norm",
        lambda x, r, w, b: ((x, w, 1e-5), dict(p=1.0000001)),
        r"normpass\.rms_norm: p must be in \(0, 1\], got 1\.0000001",
    ),
    "p_negative": (
        "rms_norm",
        lambda x, r, w, b: ((x, None, 1e-5), dict(p=-0.5)),
        r"p must be in \(0, 1\], got -0\.5",
    ),
    "ndim_too_large": (
        "layer_norm",
        lambda x, r, w, b: ((x, None, None, 1e-5), dict(normalized_ndim=4)),
        r"normpass\.layer_norm: normalized_ndim \(4\) is larger than input\.dim\(\) \(3\)",
    ),
    "ndim_zero": (
        "rms_norm",
        lambda x, r, w, b: ((x, None, 1e-5), dict(normalized_ndim=0)),
        r"normpass\.rms_norm: normalized_ndim must be >= 1, got 0",
    ),
    "residual_shape": (
        "add_rms_norm",
        lambda x, r, w, b: ((x, r[:1], w, 1e-5), {}),
        r"normpass\.add_rms_norm: residual has shape \[1, 3, 8\] but input has shape \[2, 3, 8\]",
    ),
    "residual_dtype": (
        "add_layer_norm",
        lambda x, r, w, b: ((x, r.double(), w, b, 1e-5), {}),
        r"normpass\.add_layer_norm: residual has dtype torch\.float64 but input has dtype "
        r"torch\.float32",
    ),
    # A 16-bit residual is taken beside fp32 input only (autocast's fp32 stream), not the reverse.
    "residual_wider": (
        "add_rms_norm",
        lambda x, r, w, b: ((x.bfloat16(), r, w, 1e-5), {}),
        r"normpass\.add_rms_norm: residual has dtype torch\.float32 but input has dtype "
        r"torch\.bfloat16 \(a residual must have input's dtype, or be bfloat16 / float16 beside "
        r"float32 input; the add is commutative: pass the wider tensor as input\)",
    ),
    "residual_other_16_bit": (
        "add_layer_norm",
        lambda x, r, w, b: ((x.half(), r.bfloat16(), w.half(), b.half(), 1e-5), {}),
        r"normpass\.add_layer_norm: residual has dtype torch\.bfloat16 but input has dtype "
        r"torch\.float16",
    ),
    "residual_int": (
        "add_rms_norm",
        lambda x, r, w, b: ((x, r.int(), w, 1e-5), {}),
        r"residual must be a floating-point tensor, got torch\.int32",
    ),
    "out_dtype_int": (
        "rms_norm",
        lambda x, r, w, b: ((x, w, 1e-5), dict(out_dtype=torch.int32)),
        r"normpass\.rms_norm: out_dtype must be a floating-point dtype, got torch\.int32",
    ),
    "out_dtype_float8": (
        "layer_norm",
        lambda x, r, w, b: ((x, w, b, 1e-5), dict(out_dtype=torch.float8_e5m2)),
        r"out_dtype must be a floating-point dtype, got torch\.float8_e5m2",
    ),
    "weight_device": (
        "rms_norm",
        lambda x, r, w, b: ((x, w.to("meta"), 1e-5), {}),
        r"normpass\.rms_norm: weight is on meta but input is on cpu",
    ),
    "bias_device": (
        "layer_norm",
        lambda x, r, w, b: ((x, w, b.to("meta"), 1e-5), {}),
        r"normpass\.layer_norm: bias is on meta but input is on cpu",
    ),
    "residual_device": (
        "add_rms_norm",
        lambda x, r, w, b: ((x, r.to("meta"), w, 1e-5), {}),
        r"normpass\.add_rms_norm: residual is on meta but input is on cpu",
    ),
    "bwd_grad_out_shape": (
        "rms_norm_backward",
        lambda x, r, w, b: ((r[:1], x, w, None, 1e-5), dict(BWD, p=1.0)),
        r"normpass\.rms_norm_backward: grad_out has shape \[1, 3, 8\] but input has shape "
        r"\[2, 3, 8\]",
    ),
    "bwd_grad_sum_dtype": (
        "layer_norm_backward",
        lambda x, r, w, b: ((r, x, w, r.int(), 1e-5), BWD),
        r"normpass\.layer_norm_backward: grad_sum must be a floating-point tensor, got "
        r"torch\.int32",
    ),
    "bwd_weight_shape": (
        "layer_norm_backward",
        lambda x, r, w, b: ((r, x, w[:4], None, 1e-5), BWD),
        r"normpass\.layer_norm_backward: weight has shape \[4\]",
    ),
    "bwd_stats_shape": (
        "layer_norm_backward",
        lambda x, r, w, b: ((r, x, w, None, 1e-5, None, x.new_zeros(6, 3).float()), BWD),
        r"normpass\.layer_norm_backward: stats has shape \[6, 3\] but the forward's statistics of 6 rows "
        r"have shape \[6, 2\]",
    ),
    "bwd_stats_dtype": (
        "rms_norm_backward",
        lambda x, r, w, b: ((r, x, w, None, 1e-5, None, x.new_zeros(6, 2).bfloat16()), dict(BWD, p=1.0)),
        r"normpass\.rms_norm_backward: stats has dtype torch\.bfloat16 but must be torch\.float32",
    ),
    "bwd_negative_eps": (
        "rms_norm_backward",
        lambda x, r, w, b: ((r, x, w, None, -1.0), dict(BWD, p=1.0)),
        r"normpass\.rms_norm_backward: eps must be >= 0, got -1",
    ),
}


def call_cpu_kernel(name, args, kwargs):
    """The C++ CPU kernel itself, even where another argument lives on the meta device."""
    keyset = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    return getattr(ops, name).default.redispatch(keyset, *args, **kwargs)


def call_fake(name, args, kwargs):
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        return getattr(ops, name)(*args, **kwargs)


def call_meta(name, args, kwargs):
    args = [a.to("meta") if isinstance(a, torch.Tensor) and a.device.type == "cpu" else a for a in args]
    return getattr(ops, name)(*args, **kwargs)


@pytest.mark.parametrize("path", [call_cpu_kernel, call_fake, call_meta], ids=["cpu", "fake", "meta"])
@pytest.mark.parametrize("case", CASES)
def test_error(case, path):
    name, make, message = CASES[case]
    if path is call_meta and "device" in case:
        pytest.skip("every tensor is on meta there")
    args, kwargs = make(*inputs())
    with pytest.raises(RuntimeError, match=message):
        path(name, args, kwargs)


@pytest.mark.parametrize("case", CASES)
def test_error_through_dispatcher(case):
    """The public call (autograd, then the device kernel) reports the same error."""
    name, make, message = CASES[case]
    x, r, w, b = (t.requires_grad_() for t in inputs())
    args, kwargs = make(x, r, w, b)
    with pytest.raises(RuntimeError, match=message):
        getattr(ops, name)(*args, **kwargs)


def test_valid_arguments_pass():
    """The same calls without the mistake run, so the cases above fail for the reason they name."""
    x, r, w, b = inputs()
    ops.rms_norm(x, w, 1e-5, p=1.0)
    ops.rms_norm(x, None, 0.0, p=1e-3)
    ops.layer_norm(x, w, b, 1e-5, out_dtype=torch.bfloat16)
    ops.add_rms_norm(x, r, w.expand(3, 8), 1e-5, normalized_ndim=2)
    ops.add_layer_norm(x, r, w.double(), b.double(), 1e-5, normalized_ndim=1)
    ops.layer_norm(x, None, None, 1e-5, normalized_ndim=3)
    ops.rms_norm_backward(r, x, w, None, 1e-5, **BWD, p=1.0)
