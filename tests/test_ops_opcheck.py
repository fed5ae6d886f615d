"""torch.library.opcheck over every normpass op: schema, autograd registration, fake tensor and
AOT dispatch (static and dynamic) agree with the real kernels."""

from __future__ import annotations

import pytest
import torch

import normpass  # noqa: F401  (registers the ops)

ops = torch.ops.normpass

# (shape, normalized_ndim); a modest grid: opcheck traces each call several ways.
SHAPES = [((4, 8), 1), ((2, 3, 16), 2)]
DTYPES = [torch.float32, torch.bfloat16]


def forward_args(name, shape, ndim, dtype, requires_grad):
    g = torch.Generator().manual_seed(0)
    param_shape = shape[len(shape) - ndim :]

    def t(s, dt=dtype):
        return torch.randn(s, generator=g).to(dt).requires_grad_(requires_grad)

    x, w, b = t(shape), t(param_shape, torch.float32), t(param_shape, torch.float32)
    kw = dict(normalized_ndim=ndim, weight_offset=0.5)
    if name == "rms_norm":
        return (x, w, 1e-5, b), dict(kw, p=0.5)
    if name == "layer_norm":
        return (x, w, b, 1e-5), dict(kw, out_dtype=torch.float32)
    if name == "add_rms_norm":
        return (x, t(shape), w, 1e-5), dict(kw, p=1.0)
    return (x, t(shape), None, b, 1e-5), kw


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,ndim", SHAPES, ids=str)
@pytest.mark.parametrize("name", ["rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm"])
def test_opcheck_forward(name, shape, ndim, dtype, requires_grad):
    args, kwargs = forward_args(name, shape, ndim, dtype, requires_grad)
    torch.library.opcheck(getattr(ops, name).default, args, kwargs)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("name", ["add_rms_norm", "add_layer_norm"])
def test_opcheck_16_bit_residual_of_fp32_rows(name, requires_grad):
    """autocast's residual add: fp32 input, bf16 residual (its gradient comes back in bf16)."""
    args, kwargs = forward_args(name, (4, 8), 1, torch.float32, requires_grad)
    args = (args[0], args[1].detach().bfloat16().requires_grad_(requires_grad), *args[2:])
    torch.library.opcheck(getattr(ops, name).default, args, kwargs)


def test_opcheck_forward_float64_no_params():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ops.rms_norm.default, (x, None, 1e-6))
    torch.library.opcheck(ops.layer_norm.default, (x, None, None, 1e-6))


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])  # grad: double backward
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["rms_norm_backward", "layer_norm_backward"])
def test_opcheck_backward(name, dtype, requires_grad):
    g = torch.Generator().manual_seed(1)
    x, dy, ds = (torch.randn(2, 3, 8, generator=g).to(dtype).requires_grad_(requires_grad) for _ in range(3))
    w = torch.randn(3, 8, generator=g).requires_grad_(requires_grad)
    kw = dict(has_bias=True, normalized_ndim=2, weight_offset=1.0)
    if name == "rms_norm_backward":
        kw["p"] = 0.5
    torch.library.opcheck(getattr(ops, name).default, (dy, x, w, ds, 1e-5), kw)
    torch.library.opcheck(getattr(ops, name).default, (dy, x, None, None, 1e-5), dict(kw, has_bias=False))


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("name", ["rms_norm_backward", "layer_norm_backward"])
def test_opcheck_backward_extra_grad_outs(name, requires_grad):
    g = torch.Generator().manual_seed(2)
    x, dy, e1, e2 = (torch.randn(4, 8, generator=g).requires_grad_(requires_grad) for _ in range(4))
    w = torch.randn(8, generator=g).requires_grad_(requires_grad)
    kw = dict(has_bias=False, normalized_ndim=1, weight_offset=0.0)
    if name == "rms_norm_backward":
        kw["p"] = 1.0
    torch.library.opcheck(getattr(ops, name).default, (dy, x, w, None, 1e-5, [e1, e2]), kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm"])
def test_opcheck_norm_with_stats(name, dtype):
    """The forward as autograd runs it, for each op it stands in for (no autograd of its own)."""
    (x, *rest), kw = forward_args(name, (2, 3, 16), 2, dtype, requires_grad=False)
    residual = rest.pop(0) if name.startswith("add_") else None
    center = "layer" in name
    if center:
        w, b, eps = rest
    else:
        w, eps, *b = rest
        b = b[0] if b else None
    torch.library.opcheck(ops.norm_with_stats.default, (x, residual, w, b, eps), dict(kw, center=center))


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])  # grad: double backward
@pytest.mark.parametrize("name", ["rms_norm_backward", "layer_norm_backward"])
def test_opcheck_backward_saved_stats(name, requires_grad):
    g = torch.Generator().manual_seed(3)
    x, dy = (torch.randn(4, 8, generator=g).requires_grad_(requires_grad) for _ in range(2))
    w = torch.randn(8, generator=g).requires_grad_(requires_grad)
    center = name == "layer_norm_backward"
    stats = ops.norm_with_stats(x.detach(), None, w.detach(), None, 1e-5, center=center)[2]
    kw = dict(has_bias=center, normalized_ndim=1, weight_offset=0.0, **({} if center else {"p": 1.0}))
    torch.library.opcheck(getattr(ops, name).default, (dy, x, w, None, 1e-5, None, stats), kw)


def test_opcheck_norm_with_stats_no_columns():
    """Rows without columns have no statistics: (0, 2), as the kernels count rows."""
    x = torch.randn(5, 0)
    torch.library.opcheck(ops.norm_with_stats.default, (x, None, None, None, 1e-5), dict(center=False))
    assert ops.norm_with_stats(x, None, None, None, 1e-5, center=True)[2].shape == (0, 2)
