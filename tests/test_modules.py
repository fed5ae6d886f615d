"""The normpass norm layers: numerics against float64, Parameter adoption, autocast, errors."""

from __future__ import annotations

import math

import pytest
import torch
from devices import needs_cuda
from torch import nn

import normpass
from normpass import FusedLayerNorm, FusedRMSNorm, PartialRMSNorm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MARGIN = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}


def handwritten(x, w, b, eps, *, center, ndim=1, p=1.0):
    """Eager PyTorch in x's own dtype, as a model would write it: the 'original' to compare with."""
    h = x.flatten(x.dim() - ndim)
    s = h[..., : max(1, math.ceil(p * h.shape[-1]))]
    mean = s.mean(-1, keepdim=True) if center else 0
    y = ((h - mean) * torch.rsqrt((s - mean).square().mean(-1, keepdim=True) + eps)).view(x.shape)
    if w is not None:
        y = y * w.to(x.dtype)
    return y + b.to(x.dtype) if b is not None else y


def run(fn, x, params):
    """Output and gradients (input first, then params) for a fixed random upstream gradient."""
    x = x.detach().requires_grad_()
    params = [nn.Parameter(p.detach().clone()) for p in params]  # layers take Parameters
    y = fn(x, *params)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(y.dtype)
    grads = torch.autograd.grad(y, [x, *params], g)
    return [y, *grads]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_no_worse(normpass_fn, original_fn, x, params, dtype):
    """normpass in `dtype` is no further from float64 than the original in `dtype` (+ a margin)."""
    ref = run(normpass_fn, x.double(), [p.double() for p in params])
    ours = run(normpass_fn, x.to(dtype), [p.to(dtype) for p in params])
    theirs = run(original_fn, x.to(dtype), [p.to(dtype) for p in params])
    ref_orig = run(original_fn, x.double(), [p.double() for p in params])
    for r, r2 in zip(ref, ref_orig, strict=True):  # the two functions agree in float64: same math
        torch.testing.assert_close(r, r2, rtol=1e-9, atol=1e-9)
    names = ["out", "grad_input", *[f"grad_param{i}" for i in range(len(params))]]
    for name, a, b, r in zip(names, ours, theirs, ref, strict=True):
        assert a.dtype == b.dtype, name
        assert rel_err(a, r) <= rel_err(b, r) + MARGIN[dtype], (name, rel_err(a, r), rel_err(b, r))


def fresh(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 0.5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(32,), (4, 8)])
@pytest.mark.parametrize("affine", ["weight", "weight+bias", "none"])
def test_fused_layer_norm_numerics(dtype, shape, affine):
    x = fresh((3, 5, *shape), seed=1)
    params = [fresh(shape, 2), fresh(shape, 3)][: {"none": 0, "weight": 1, "weight+bias": 2}[affine]]
    ln = FusedLayerNorm(shape, eps=1e-5, elementwise_affine=affine != "none", bias=affine == "weight+bias")

    def ours(x, *p):
        ln.weight, ln.bias = ([*p, None, None])[:2]
        return ln(x)

    def original(x, *p):
        return nn.functional.layer_norm(x, shape, *p, eps=1e-5)

    assert_no_worse(ours, original, x, params, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(32,), (4, 8)])
@pytest.mark.parametrize("p_frac", [1.0, 0.0625, 0.3])
def test_rms_norm_numerics(dtype, shape, p_frac):
    x, w, b = fresh((3, 5, *shape), 4), fresh(shape, 5), fresh(shape, 6)
    layer = (
        PartialRMSNorm(shape, p=p_frac, eps=1e-6, bias=True)
        if p_frac < 1
        else FusedRMSNorm(shape, 1e-6, bias=True)
    )

    def ours(x, w, b):
        layer.weight, layer.bias = w, b
        return layer(x)

    def original(x, w, b):
        return handwritten(x, w, b, 1e-6, center=False, ndim=len(shape), p=p_frac)

    assert_no_worse(ours, original, x, [w, b], dtype)


def test_matches_torch_rms_norm_with_default_eps():
    # eps=None is nn.RMSNorm's machine epsilon: of the accumulation dtype, as F.rms_norm computes it
    # (fp32's for bf16/fp16 inputs, not theirs, which dominates rows this small).
    torch.manual_seed(0)
    ref = nn.RMSNorm(16)
    nn.init.normal_(ref.weight)
    ours = FusedRMSNorm.from_rms_norm(ref)
    assert ours.eps is None and ours.weight is ref.weight
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        x = (torch.randn(4, 16) * 1e-4).to(dtype)
        torch.testing.assert_close(ours.to(dtype)(x), ref.to(dtype)(x))


def test_from_constructors_adopt_the_parameters():
    ln = nn.LayerNorm((4, 8), eps=1e-3)
    for new in (
        FusedRMSNorm.from_layer_norm(ln),
        PartialRMSNorm.from_layer_norm(ln, p=0.5),
        FusedLayerNorm.from_layer_norm(ln, low_precision=True),
    ):
        assert new.weight is ln.weight and new.bias is ln.bias
        assert new.normalized_shape == (4, 8) and new.eps == 1e-3
        assert list(new.state_dict()) == list(ln.state_dict()) == ["weight", "bias"]
        assert list(new.parameters()) == list(ln.parameters())
    assert FusedRMSNorm.from_layer_norm(ln, eps=1e-8).eps == 1e-8

    no_affine = nn.LayerNorm(8, elementwise_affine=False)
    new = FusedRMSNorm.from_layer_norm(no_affine)
    assert new.weight is None and new.bias is None and not new.elementwise_affine
    assert list(new.parameters()) == []

    rms = nn.RMSNorm(8, eps=1e-6)
    prms = PartialRMSNorm.from_rms_norm(rms, p=0.25)
    assert prms.weight is rms.weight and prms.bias is None and prms.p == 0.25 and prms.eps == 1e-6


def test_state_dict_round_trip_with_torch_layers():
    torch.manual_seed(0)
    ln = nn.LayerNorm(8)
    nn.init.normal_(ln.weight), nn.init.normal_(ln.bias)
    fused = FusedLayerNorm(8)
    fused.load_state_dict(ln.state_dict())
    x = torch.randn(3, 8)
    torch.testing.assert_close(fused(x), ln(x))


def test_low_precision_layer_norm_under_autocast():
    torch.manual_seed(0)
    ln = nn.LayerNorm(64)
    nn.init.normal_(ln.weight), nn.init.normal_(ln.bias)
    lp = FusedLayerNorm.from_layer_norm(ln, low_precision=True)
    x = (torch.randn(4, 64) * 2 + 1).requires_grad_()

    # Outside autocast: the same function in the input dtype.
    torch.testing.assert_close(lp(x), ln(x))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lp(x)
    assert y.dtype == torch.bfloat16
    # Same function of the bf16-rounded input; only the IO is rounded (stats stay fp32 in the kernel).
    xb = x.detach().to(torch.bfloat16).double()
    ref = nn.functional.layer_norm(xb, (64,), ln.weight.double(), ln.bias.double(), ln.eps)
    rounding = (ref.to(torch.bfloat16).double() - ref).abs()
    assert ((y.double() - ref).abs() <= rounding + 2**-8 * ref.abs() + 1e-6).all()

    # Gradients flow back to the fp32 input and the fp32 Parameters.
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and ln.weight.grad.dtype == torch.float32
    x64 = x.detach().double().requires_grad_()
    w64, b64 = (t.detach().double().requires_grad_() for t in (ln.weight, ln.bias))
    nn.functional.layer_norm(x64, (64,), w64, b64, ln.eps).square().sum().backward()
    for got, want in ((x.grad, x64.grad), (ln.weight.grad, w64.grad), (ln.bias.grad, b64.grad)):
        assert rel_err(got, want) < 2e-2


def test_layer_norm_follows_cpu_autocast_policy_without_low_precision():
    # CPU autocast leaves layer_norm in the input dtype; FusedLayerNorm(low_precision=False) does too.
    ln = nn.LayerNorm(16)
    fused = FusedLayerNorm.from_layer_norm(ln)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, 16).to(dtype)
            assert fused(x).dtype == ln(x).dtype == dtype


@needs_cuda
def test_layer_norm_autocast_on_cuda():
    ln = nn.LayerNorm(64).cuda()
    fused, lp = FusedLayerNorm.from_layer_norm(ln), FusedLayerNorm.from_layer_norm(ln, low_precision=True)
    x = torch.randn(8, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = x.to(torch.bfloat16)
        assert ln(h).dtype == fused(h).dtype == torch.float32
        assert lp(h).dtype == lp(x).dtype == torch.bfloat16
        torch.testing.assert_close(fused(h), ln(h))
        torch.testing.assert_close(lp(h).float(), ln(h), atol=2e-2, rtol=2e-2)


def test_compiles_in_one_graph():
    layers = nn.Sequential(FusedRMSNorm(8, bias=True), PartialRMSNorm(8, p=0.5), FusedLayerNorm(8))
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(torch.compile(layers, backend="aot_eager", fullgraph=True)(x), layers(x))
    gm = torch.fx.symbolic_trace(layers)
    torch.testing.assert_close(gm(x), layers(x))


def test_repr():
    assert repr(PartialRMSNorm(8, p=0.25)) == (
        "PartialRMSNorm((8,), eps=1e-08, elementwise_affine=True, bias=False, p=0.25)"
    )
    assert repr(FusedLayerNorm([2, 4], low_precision=True)) == (
        "FusedLayerNorm((2, 4), eps=1e-05, elementwise_affine=True, bias=True, low_precision=True)"
    )


def test_errors():
    with pytest.raises(RuntimeError, match=r"expected input with trailing shape \[8\], got \[2, 16\]"):
        FusedRMSNorm(8, elementwise_affine=False)(torch.randn(2, 16))
    with pytest.raises(RuntimeError, match="trailing shape"):
        FusedLayerNorm((4, 8))(torch.randn(8))
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\]"):
        PartialRMSNorm(8, p=0.0)
    for bad in ([], True, [2, 0], 2.0, "8"):  # True is an int to Python, a mistake here
        with pytest.raises(ValueError, match="normalized_shape must be a non-empty sequence"):
            FusedRMSNorm(bad)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        FusedLayerNorm(8, eps=-1.0)
    with pytest.raises(ValueError, match="FusedLayerNorm: eps must be a float >= 0, got None"):
        FusedLayerNorm(8, eps=None)
    ln = nn.LayerNorm(8)
    ln.weight = nn.Parameter(torch.ones(4))
    with pytest.raises(ValueError, match=r"weight has shape \[4\] but normalized_shape is \[8\]"):
        FusedRMSNorm.from_layer_norm(ln)
    with pytest.raises(TypeError, match="must be an nn.Parameter"):
        FusedRMSNorm._adopt(8, torch.ones(8), None)


def test_exported():
    assert {"FusedRMSNorm", "FusedLayerNorm", "PartialRMSNorm"} <= set(normpass.__all__)


@pytest.mark.parametrize("cls", [FusedRMSNorm, FusedLayerNorm, PartialRMSNorm])
def test_reset_parameters_after_to_empty(cls):
    # The meta-device init flow (to_empty, then reset_parameters on every module that has it).
    layer = cls(8, device="meta").to_empty(device="cpu")
    layer.reset_parameters()
    assert torch.equal(layer.weight, torch.ones(8))
    if layer.bias is not None:
        assert torch.equal(layer.bias, torch.zeros(8))


def test_normalized_shape_of_any_integer_type():
    # As nn.LayerNorm takes it, numpy's integers included (a LayerNorm built with one converts too).
    np = pytest.importorskip("numpy")
    assert FusedRMSNorm(np.int64(8)).normalized_shape == (8,)
    assert FusedLayerNorm([np.int32(2), 4]).normalized_shape == (2, 4)
    assert PartialRMSNorm(torch.Size([16])).normalized_shape == (16,)
    ln = nn.LayerNorm(np.int64(8))
    assert FusedRMSNorm.from_layer_norm(ln).normalized_shape == (8,)
