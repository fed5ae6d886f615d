"""Numerics of the normpass ops against a float64 reference.

The rule (context.md): normpass's error against float64 (computed from fp64 copies of the same inputs)
is no larger than the error of the torch computation it replaces, in the same dtype, plus a small
margin. The torch computation is F.layer_norm for LayerNorm and the hand-written Llama form for
RMSNorm (fp32 statistics, cast back, times weight), with `x + residual` done eagerly in the input
dtype for the residual ops. Gradients (dx, dresidual, dweight, dbias) follow the same rule.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch
import torch.nn.functional as F
from backward_op import backward_op
from devices import DEVICES
from torch.autograd import gradcheck, gradgradcheck
from torch.utils._python_dispatch import TorchDispatchMode

import normpass
from normpass import reference

ops = torch.ops.normpass
OPS = ("rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
EPS = 1e-5


def is_center(name: str) -> bool:
    return name.endswith("layer_norm")


def has_residual(name: str) -> bool:
    return name.startswith("add_")


def call(name, x, residual, w, b, eps=EPS, **kw):
    """The op's output (and the residual sum, or None) with one calling convention for all four."""
    op = getattr(ops, name)
    if name == "rms_norm":
        return op(x, w, eps, b, **kw), None
    if name == "layer_norm":
        return op(x, w, b, eps, **kw), None
    if name == "add_rms_norm":
        return op(x, residual, w, eps, b, **kw)
    return op(x, residual, w, b, eps, **kw)


def torch_form(
    name, x, residual, w, b, eps=EPS, *, normalized_ndim=1, weight_offset=0.0, p=1.0, out_dtype=None
):
    """What a model writes without normpass, in the input dtype; for a wider out_dtype, the norm of
    the upcast input (T5's and BERT's float32 norms of 16-bit activations)."""
    s = x + residual if residual is not None else x
    if (
        out_dtype is not None
        and out_dtype != s.dtype
        and torch.promote_types(s.dtype, out_dtype) == out_dtype
    ):
        kw = dict(normalized_ndim=normalized_ndim, weight_offset=weight_offset, p=p)
        return torch_form(name, s.to(out_dtype), None, w, b, eps, **kw)[0], (
            s if residual is not None else None
        )
    shape = s.shape[s.dim() - normalized_ndim :]
    if w is not None and weight_offset:
        w = w + weight_offset
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    if is_center(name):
        native = all(t is None or t.dtype in (s.dtype, acc) for t in (w, b))
        if native:
            y = F.layer_norm(s, shape, w, b, eps)
        else:  # F.layer_norm refuses this mix: the graph would upcast
            up = [t.to(acc) if t is not None else None for t in (w, b)]
            y = F.layer_norm(s.to(acc), shape, *up, eps).to(s.dtype)
    else:  # Llama's RMSNorm, reading the first ceil(p * n) columns for pRMSNorm
        h = s.to(acc).flatten(s.dim() - normalized_ndim)
        k = reference.stat_cols(p, h.shape[-1])
        var = h[..., :k].pow(2).mean(-1, keepdim=True)
        y = (h * torch.rsqrt(var + eps)).view(s.shape).to(s.dtype)
        if w is not None:
            y = w * y
        if b is not None:
            y = y + b
    return y.to(out_dtype or x.dtype), (s if residual is not None else None)


def reference64(
    name, x, residual, w, b, eps=EPS, *, normalized_ndim=1, weight_offset=0.0, p=1.0, out_dtype=None
):
    """float64 ground truth from fp64 copies of the inputs (autograd-connected to them)."""
    s = x + residual if residual is not None else x
    y = reference.norm(
        s,
        w,
        b,
        eps,
        center=is_center(name),
        normalized_ndim=normalized_ndim,
        weight_offset=weight_offset,
        p=p,
    )
    return y, (s if residual is not None else None)


def make_inputs(
    name, shape, dtype, *, normalized_ndim=1, weight=True, bias=True, param_dtype=None, layout="contiguous"
):
    g = torch.Generator().manual_seed(zlib.crc32(repr((name, shape, dtype, layout)).encode()))
    param_shape = shape[len(shape) - normalized_ndim :]

    def activation():
        full = (*shape[:-2], shape[-1], shape[-2]) if layout == "transposed" else shape
        if layout == "sliced":
            full = (*shape[:-1], shape[-1] + 3)
        t = (torch.randn(full, generator=g) * 2 + 0.5).to(dtype)  # an offset mean: LayerNorm must remove it
        if layout == "transposed":  # last dim not unit-stride: the front end must copy
            return t.transpose(-1, -2)
        if layout == "sliced":  # rows with a gap: the kernels' row stride
            return t[..., 1 : shape[-1] + 1]
        return t

    x = activation()
    r = activation() if has_residual(name) else None
    pdt = param_dtype or dtype
    w = (torch.randn(param_shape, generator=g) + 1).to(pdt) if weight else None
    b = torch.randn(param_shape, generator=g).to(pdt) if bias else None
    if layout != "contiguous":
        assert not x.is_contiguous()
    return x, r, w, b


def max_err(t, ref):
    return (t.double() - ref).abs().max().item() if t.numel() else 0.0


def assert_no_worse(label, ours, theirs, ref, input_dtype):
    """ours is no further from ref than theirs, plus a margin of two units in the last place of the
    coarser of the input and result dtypes (both computations see the same rounded inputs, and either
    may land on the other side of a rounding) and 32 of the accumulation dtype (summation order),
    scaled by max(|ref|, 1): inputs and dy are O(1) here, so gradients that cancel to tiny values (N=1)
    carry rounding error of that scale, not of their own."""
    assert ours.dtype == theirs.dtype, label
    assert ours.shape == ref.shape, label
    coarse = max(torch.finfo(ours.dtype).eps, torch.finfo(input_dtype).eps)
    acc = torch.finfo(torch.float64 if input_dtype == torch.float64 else torch.float32).eps
    scale = max(ref.abs().max().item() if ref.numel() else 0.0, 1.0)
    margin = (2 * coarse + 32 * acc) * scale
    e_ours, e_theirs = max_err(ours, ref), max_err(theirs, ref)
    assert e_ours <= e_theirs + margin, (
        f"{label}: normpass err {e_ours:.3g} > torch err {e_theirs:.3g} + {margin:.3g}"
    )


def check_parity(name, x, r, w, b, **kw):
    """Forward and every gradient of the op vs the torch form, both measured against float64."""
    leaves = [t for t in (x, r, w, b) if t is not None]
    ours_in = [t.detach().clone().requires_grad_() for t in leaves]
    theirs_in = [t.detach().clone().requires_grad_() for t in leaves]
    ref_in = [t.detach().double().requires_grad_() for t in leaves]

    def unpack(ts):
        it = iter(ts)
        return [next(it) if t is not None else None for t in (x, r, w, b)]

    out, s = call(name, *unpack(ours_in), **kw)
    t_out, t_s = torch_form(name, *unpack(theirs_in), **kw)
    r_out, r_s = reference64(name, *unpack(ref_in), **kw)

    assert out.is_contiguous() and out.dtype == (kw.get("out_dtype") or x.dtype)
    assert_no_worse("out", out, t_out, r_out, x.dtype)
    if s is not None:
        assert s.dtype == x.dtype
        assert_no_worse("sum", s, t_s, r_s, x.dtype)

    if out.numel() == 0:
        return
    dy = torch.randn(out.shape, dtype=torch.float64)
    gs = torch.randn(out.shape, dtype=torch.float64) if s is not None else None

    def grads(o, sm, inputs):
        outs, gos = [o], [dy.to(o.dtype)]
        if sm is not None:
            outs.append(sm)
            gos.append(gs.to(sm.dtype))
        return torch.autograd.grad(outs, inputs, gos)

    names = ("dx", "dresidual", "dweight", "dbias")
    labels = [n for n, t in zip(names, (x, r, w, b), strict=True) if t is not None]
    ours_g, theirs_g, ref_g = grads(out, s, ours_in), grads(t_out, t_s, theirs_in), grads(r_out, r_s, ref_in)
    for label, g, tg, rg, leaf in zip(labels, ours_g, theirs_g, ref_g, leaves, strict=True):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, label
        assert_no_worse(label, g, tg, rg, x.dtype)


# ---- shapes ----------------------------------------------------------------------------------------

SHAPES = [
    ((7,), 1),
    ((3, 1), 1),
    ((2, 5, 7), 1),
    ((4, 64), 1),
    ((3, 1000), 1),
    # Rows enough that the CPU backward takes them in groups: of 2 (64 rows), of 4 and 1 (135).
    ((64, 3, 5), 2),
    ((135, 12), 1),
    ((2, 3, 4, 64), 1),
    ((3, 7), 2),
    ((2, 3, 64), 2),
    ((2, 2, 1000), 2),
    ((4, 1, 1), 2),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,ndim", SHAPES, ids=str)
@pytest.mark.parametrize("name", OPS)
def test_parity_shapes(name, shape, ndim, dtype):
    x, r, w, b = make_inputs(name, shape, dtype, normalized_ndim=ndim)
    check_parity(name, x, r, w, b, normalized_ndim=ndim)


# ---- flags: parameters, dtypes, layouts -------------------------------------------------------------

FLAG_CASES = {
    "no_weight": (dict(weight=False), {}),
    "no_bias": (dict(bias=False), {}),
    "no_params": (dict(weight=False, bias=False), {}),
    "fp32_params": (dict(param_dtype=torch.float32), {}),
    "bf16_params": (dict(param_dtype=torch.bfloat16), {}),
    "weight_offset": (dict(), dict(weight_offset=1.0)),
    "p_quarter": (dict(), dict(p=0.25)),
    "p_one_col": (dict(bias=False), dict(p=1e-3)),
    "out_fp32": (dict(), dict(out_dtype=torch.float32)),
    "out_fp16": (dict(), dict(out_dtype=torch.float16)),
    "out_bf16": (dict(), dict(out_dtype=torch.bfloat16)),
    "transposed": (dict(layout="transposed"), {}),
    "sliced": (dict(layout="sliced"), {}),
    "eps_zero": (dict(), dict(eps=0.0)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FLAG_CASES)
@pytest.mark.parametrize("name", OPS)
def test_parity_flags(name, case, dtype):
    make_kw, op_kw = FLAG_CASES[case]
    if "p" in op_kw and is_center(name):
        pytest.skip("p is an RMSNorm argument")
    # 70 rows: the CPU backward takes them in groups of 3 (and 1).
    x, r, w, b = make_inputs(name, (70, 37), dtype, **make_kw)
    check_parity(name, x, r, w, b, **op_kw)


# The front end's rules (shared by the CPU and CUDA kernels), checked on both where a GPU is present.


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("name", OPS)
def test_wider_out_dtype_keeps_the_gradient_width(name, dtype, device):
    """out_dtype=float32 on 16-bit x: the float32 output gradient reaches dx, dweight and dbias at full
    width, as in the float32 graph the op replaces (rounding it to x's dtype first cost 10^4x in dweight)."""
    x, r, w, b = make_inputs(name, (2048, 64), dtype, param_dtype=torch.float32)
    dy = torch.randn(x.shape)
    ins = [t.detach().to(device).requires_grad_() if t is not None else None for t in (x, r, w, b)]
    out, _ = call(name, *ins, out_dtype=torch.float32)
    ours = [g.cpu() for g in torch.autograd.grad(out, [t for t in ins if t is not None], dy.to(device))]
    # float64 truth from the op's own sum, which the residual ops round to x's dtype
    ref_in = [
        t.double().requires_grad_() if t is not None else None for t in ((x if r is None else x + r), w, b)
    ]
    ref_out, _ = reference64(name, ref_in[0], None, *ref_in[1:])
    ref = torch.autograd.grad(ref_out, [t for t in ref_in if t is not None], dy.double())
    ref = (ref[0], *ref) if r is not None else ref  # dresidual = dx
    for g, rg in zip(ours, ref, strict=True):
        scale = rg.abs().max().item()
        # a float32 sum of float32 terms, then dx's one rounding to x's dtype
        tolerance = (torch.finfo(g.dtype).eps / 2 + 64 * torch.finfo(torch.float32).eps) * scale
        assert max_err(g, rg) <= tolerance


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight", ["none", "bf16"])
@pytest.mark.parametrize("name", OPS)
def test_float32_dbias_is_not_rounded_to_bf16(name, weight, device):
    """A float32 bias beside bf16 x, with no weight or a bf16 one: its gradient, the float32 sum of the
    output gradient over rows, is not rounded to bf16 on the way."""
    inputs = make_inputs(name, (2048, 64), torch.bfloat16, param_dtype=torch.float32)
    x, r, w, b = (t.to(device) if t is not None else None for t in inputs)
    w = None if weight == "none" else w.to(torch.bfloat16).requires_grad_()
    b.requires_grad_()
    out, _ = call(name, x, r, w, b)
    if w is not None:
        (dw,) = torch.autograd.grad(out, w, torch.ones_like(out), retain_graph=True)
        assert dw.dtype == torch.bfloat16
    dy = torch.randn(out.shape).to(out.dtype)
    (db,) = torch.autograd.grad(out, b, dy.to(device))
    db, ref = db.cpu(), dy.double().sum(0)
    assert db.dtype == torch.float32
    assert max_err(db, ref) <= 64 * torch.finfo(torch.float32).eps * ref.abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_out_dtype", (torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("center", (False, True), ids=("rms", "ln"))
def test_float32_grad_sum_is_not_rounded_to_bf16(center, grad_out_dtype, device):
    """A direct backward call with bf16 x and an fp32 grad_sum: dx is rounded once, not grad_sum first."""
    g = torch.Generator().manual_seed(int(center) + 2 * (grad_out_dtype == torch.float32))
    x = torch.randn(512, 64, generator=g).to(torch.bfloat16)
    w, dy = torch.randn(64, generator=g), torch.randn(512, 64, generator=g).to(grad_out_dtype)
    ds = torch.randn(512, 64, generator=g) * 64
    op = ops.layer_norm_backward if center else ops.rms_norm_backward
    kw = dict(has_bias=False, normalized_ndim=1, weight_offset=0.0, **({} if center else {"p": 1.0}))
    dx = op(*(t.to(device) for t in (dy, x, w, ds)), EPS, **kw)[0].cpu()
    wide = (t.double() for t in (dy, x, w, ds))
    dx_ref = reference.norm_backward(*wide, EPS, center=center, **kw)[0]
    # dx's one rounding to bf16, plus float32 sums (on the row's scale); rounding grad_sum first is off
    # by up to half a bf16 ulp of grad_sum more
    bf16_eps, f32_eps = torch.finfo(torch.bfloat16).eps, torch.finfo(torch.float32).eps
    tolerance = bf16_eps / 2 * dx_ref.abs() + 64 * f32_eps * dx_ref.abs().max()
    assert ((dx.double() - dx_ref).abs() <= tolerance).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("name", OPS)
def test_16_bit_output_of_fp32_rows_is_the_rounded_fp32_output(name, out_dtype, device):
    """An fp32 norm's output cast to 16 bits (autocast; normpass.fold_casts folds the cast into
    out_dtype): the op writes the same bits as the cast of its fp32 output."""
    inputs = make_inputs(name, (33, 260), torch.float32)
    x, r, w, b = (t.to(device) if t is not None else None for t in inputs)
    narrow, _ = call(name, x, r, w, b, out_dtype=out_dtype)
    wide, _ = call(name, x, r, w, b)
    assert narrow.dtype == out_dtype
    assert torch.equal(narrow, wide.to(out_dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cols", (1000, 1001), ids=("vectors", "scalars"))
@pytest.mark.parametrize("r_dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("name", ("add_rms_norm", "add_layer_norm"))
def test_16_bit_residual_of_fp32_rows_is_widened_exactly(name, r_dtype, cols, device):
    """autocast's residual add, the fp32 stream plus a 16-bit projection: the op's sum is eager's
    promoted `x + r`, its output and x's gradient are those of the widened residual, and the
    residual's gradient is that one rounded to its dtype, as the promotion's backward rounds it."""
    inputs = make_inputs(name, (70, cols), torch.float32)
    x, r, w, b = (t.to(device) if t is not None else None for t in inputs)
    r = r.to(r_dtype)
    leaves = [t.requires_grad_() for t in (x, r, w, b) if t is not None]
    wide_r = r.detach().float().requires_grad_()
    y, s = call(name, x, r, w, b)
    y_wide, s_wide = call(name, x, wide_r, w, b)
    assert s.dtype == y.dtype == torch.float32
    assert torch.equal(s, x + r) and torch.equal(s, s_wide) and torch.equal(y, y_wide)
    dy, ds = torch.randn_like(y), torch.randn_like(s)
    grads = torch.autograd.grad((y, s), leaves, (dy, ds))
    grads_wide = torch.autograd.grad((y_wide, s_wide), [wide_r if t is r else t for t in leaves], (dy, ds))
    for leaf, g, e in zip(leaves, grads, grads_wide, strict=True):
        assert g.dtype == leaf.dtype and torch.equal(g, e.to(leaf.dtype))
    # A residual that wants no gradient gets none (and no rounding pass).
    y, s = call(name, x, r.detach(), w, b)
    (dx,) = torch.autograd.grad((y, s), (x,), (dy, ds))
    assert torch.equal(dx, grads[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("saved", (False, True), ids=("recomputed", "saved"))
@pytest.mark.parametrize("terms", (1, 2, 3, 4))  # 4: more than the CUDA kernels sum as they load
@pytest.mark.parametrize("cols", (1000, 1001), ids=("vectors", "scalars"))
@pytest.mark.parametrize("grad_dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("center", (False, True), ids=("rms", "ln"))
def test_16_bit_gradients_of_fp32_rows_are_widened_exactly(center, grad_dtype, cols, terms, saved, device):
    """That output's gradient terms, which normpass.fold_casts passes before their widening cast: the
    same bits as the backward of the widened terms (one is read as it is, several summed in fp32,
    not rounded to 16 bits after each add)."""
    g = torch.Generator().manual_seed(cols + 2 * terms + int(center))
    x, ds = (torch.randn(67, cols, generator=g).to(device) for _ in range(2))
    w = torch.randn(cols, generator=g).to(device)
    dys = [torch.randn(67, cols, generator=g).to(device, grad_dtype) for _ in range(terms)]
    stats = ops.norm_with_stats(x, None, w, None, EPS, center=center)[2] if saved else None
    op = backward_op(center)
    got = op(dys[0], x, w, ds, EPS, dys[1:], stats)
    widened = [d.float() for d in dys]
    summed = widened[0]
    for term in widened[1:]:
        summed = summed + term  # eager's adds of the widened terms, in order
    want = op(summed, x, w, ds, EPS, None, stats)
    for name, e, o in zip(("dx", "dweight", "dbias"), want, got, strict=True):
        assert o.dtype == e.dtype and torch.equal(e, o), name
    # A term of another dtype among them (after the first, or the first): each is widened to fp32
    # before the sum.
    if terms > 1:
        for mixed in ([dys[0], widened[1], *dys[2:]], [widened[0], *dys[1:]]):
            got = op(mixed[0], x, w, ds, EPS, mixed[1:], stats)
            for name, e, o in zip(("dx", "dweight", "dbias"), want, got, strict=True):
                assert torch.equal(e, o), f"{name} (mixed: {[t.dtype for t in mixed]})"


class BackwardCalls(TorchDispatchMode):
    """Records which gradients each normpass backward op call was asked for."""

    def __init__(self):
        super().__init__()
        self.asked = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (ops.rms_norm_backward.default, ops.layer_norm_backward.default):
            self.asked.append((kwargs.get("weight_grad", True), kwargs["has_bias"]))
        return func(*args, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("frozen", ["weight", "bias", "both"])
@pytest.mark.parametrize("name", OPS)
def test_frozen_parameters_are_not_differentiated(name, frozen, device):
    """LoRA freezes a norm's weight and bias, BitFit its weight: the backward op is asked only for the
    gradients autograd wants, and those it returns are the same bits as with nothing frozen."""
    x, r, w, b = (
        t.to(device).requires_grad_() if t is not None else None
        for t in make_inputs(name, (64, 32), torch.bfloat16)
    )
    out, _ = call(name, x, r, w, b)
    dy = torch.randn(out.shape).to(out)
    leaves = [t for t in (x, r, w, b) if t is not None]
    everything = torch.autograd.grad(out, leaves, dy)
    w_frozen, b_frozen = frozen in ("weight", "both"), frozen in ("bias", "both")
    w.requires_grad_(not w_frozen)
    b.requires_grad_(not b_frozen)
    with BackwardCalls() as calls:
        out, _ = call(name, x, r, w, b)
        got = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], dy)
    assert calls.asked == [(not w_frozen, not b_frozen)]
    expected = [g for t, g in zip(leaves, everything, strict=True) if t.requires_grad]
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)


def test_parity_many_rows_threads():
    """Enough rows that the kernels split them over threads and dweight over row blocks."""
    for name in OPS:
        x, r, w, b = make_inputs(name, (3, 300, 96), torch.bfloat16, param_dtype=torch.float32)
        check_parity(name, x, r, w, b)


@pytest.mark.parametrize("name", OPS)
def test_parity_long_rows(name):
    """Rows of 2^20 fp32 values: summed in blocks whose sums are added pairwise (one vectorized sum
    over the whole row was 100x further from float64 than torch)."""
    x, r, w, b = make_inputs(name, (3, 1 << 20), torch.float32)
    check_parity(name, x, r, w, b)


@pytest.mark.parametrize("name", ["layer_norm", "add_layer_norm"])
def test_parity_rows_starting_far_from_their_mean(name):
    """The first value 6 standard deviations out: LayerNorm's one-pass moments are shifted by the mean
    of the row's first values, not by the first value alone."""
    x, r, w, b = make_inputs(name, (3, 1 << 16), torch.float32)
    x[:, 0] += 12.0
    check_parity(name, x, r, w, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p, n, k", [(0.07, 100, 7), (0.29, 100, 29), (0.0625, 1000, 63), (0.001, 100, 1)])
def test_partial_rms_norm_takes_ceil_p_n_columns(p, n, k, device):
    """k = ceil(p * n) of the decimal p: 0.07 * 100 is 7.000000000000001 in floating point, which
    took 8 columns before."""
    assert reference.stat_cols(p, n) == k
    dtype, rtol = (torch.float64, 1e-12) if device == "cpu" else (torch.float32, 1e-5)  # CUDA: no fp64
    x = torch.randn(4, n, dtype=dtype, device=device)
    y = torch.ops.normpass.rms_norm(x, None, EPS, None, normalized_ndim=1, p=p).double()
    x = x.double()
    for cols, close in ((k, True), (k + 1, False)):
        rms = x[:, :cols].pow(2).mean(-1, keepdim=True).add(EPS).sqrt()
        assert torch.allclose(y, x / rms, rtol=rtol, atol=0) == close


def test_dweight_is_deterministic():
    x, _, w, _ = make_inputs("rms_norm", (517, 33), torch.float32)
    dy = torch.randn(x.shape)
    kw = dict(has_bias=True, normalized_ndim=1, weight_offset=0.0, p=1.0)
    first = ops.rms_norm_backward(dy, x, w, None, EPS, **kw)
    for threads in (1, 2, 3):
        with _num_threads(threads):
            again = ops.rms_norm_backward(dy, x, w, None, EPS, **kw)
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("name", OPS)
def test_backward_reads_the_saved_statistics(name, dtype, device):
    """The backward takes the forward's (mean, rstd) rather than recomputing them: the forward's give
    the gradients of the recomputation (the same bits on CPU, where both read the same row), and
    the statistics it is handed are the ones its gradients follow (RMSNorm's mean is 0 whatever)."""
    inputs = make_inputs(name, (67, 1000), dtype)
    x, r, w, b = (t.to(device) if t is not None else None for t in inputs)
    center = is_center(name)
    _, total, stats = ops.norm_with_stats(x, r, w, b, EPS, center=center)
    h = total if r is not None else x
    dy = torch.randn(h.shape).to(device, dtype)
    op = backward_op(center, has_bias=b is not None)
    saved = op(dy, h, w, None, EPS, None, stats)
    recomputed = op(dy, h, w, None, EPS)
    for s, c in zip(saved, recomputed, strict=True):
        if device == "cpu":
            assert torch.equal(s, c)
        else:
            torch.testing.assert_close(s, c)
    if not center:
        shifted = stats + torch.tensor([1.0, 0.0], device=device)
        for s, o in zip(saved, op(dy, h, w, None, EPS, None, shifted), strict=True):
            assert torch.equal(s, o)
    if dtype == torch.float32:
        other = stats * torch.tensor([1.0, 1.5], device=device)  # rstd 1.5x the forward's
        dx_other, dw_other, _ = op(dy, h, w, None, EPS, None, other)
        xhat = (h - other[:, :1]) * other[:, 1:]
        torch.testing.assert_close(dw_other, (dy * xhat).sum(0), rtol=1e-4, atol=1e-3)
        assert not torch.allclose(dx_other, saved[0])
        if device == "cpu":  # a float64 gradient widens x and the statistics with it
            wide = op(dy.double(), h, w, None, EPS, None, other)[1]
            torch.testing.assert_close(wide, dw_other, rtol=1e-5, atol=1e-4)


class _num_threads:
    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


# ---- zero-size ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8), (3, 0)], ids=str)
@pytest.mark.parametrize("name", OPS)
def test_zero_size(name, shape):
    x, r, w, b = make_inputs(name, shape, torch.float32)
    leaves = [t.requires_grad_() for t in (x, r, w, b) if t is not None]
    out, s = call(name, x, r, w, b)
    assert out.shape == x.shape and (s is None or s.shape == x.shape)
    grads = torch.autograd.grad([out.sum()] + ([s.sum()] if s is not None else []), leaves)
    for g, t in zip(grads, leaves, strict=True):
        assert g.shape == t.shape
        assert not g.any()  # an empty sum: dweight and dbias are zero, the rest is empty


@pytest.mark.parametrize("name", OPS)
def test_forward_ad_is_refused_not_dropped(name):
    """Forward-mode AD has no formula here: an error, never a silently dropped tangent."""
    import torch.autograd.forward_ad as fwAD

    x, r, w, b = make_inputs(name, (4, 8), torch.float32)
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="jvp"):
        call(name, fwAD.make_dual(x, torch.randn_like(x)), r, w, b)


@pytest.mark.parametrize("name", OPS)
def test_vmap_normalizes_each_sample_with_its_own_weight(name):
    """torch.func.vmap over a model ensemble's stacked parameters (PyTorch's per-sample fallback runs
    the op once per sample): each sample's result against the float64 reference of that sample."""
    samples = [make_inputs(name, (5, 16), torch.float32) for _ in range(3)]
    # One set per sample; make_inputs seeds by name, so vary them apart from that.
    x, r, w, b = (
        None if ts[0] is None else torch.stack([t * (1 + i) for i, t in enumerate(ts)])
        for ts in zip(*samples, strict=True)
    )
    in_dims = tuple(None if t is None else 0 for t in (x, r, w, b))
    n_outs = 1 + (r is not None)  # vmap returns tensors only
    outs = torch.func.vmap(lambda *args: call(name, *args)[:n_outs], in_dims=in_dims)(x, r, w, b)
    out, s = (*outs, None)[:2]
    for i in range(3):
        args = [None if t is None else t[i] for t in (x, r, w, b)]
        ref_out, _ = reference64(name, *[None if t is None else t.double() for t in args])
        assert_no_worse(f"out[{i}]", out[i], torch_form(name, *args)[0], ref_out, torch.float32)
        if s is not None:
            assert torch.equal(s[i], args[0] + args[1])


def test_torch_func_grad_is_refused_not_wrong():
    """PyTorch does not yet run custom ops' autograd under torch.func.grad/vjp/jacrev (the C++
    autograd::Function, and torch.library.register_autograd in the fallback): a clear error."""
    x, _, w, _ = make_inputs("rms_norm", (4, 8), torch.float32)
    with pytest.raises(RuntimeError, match="functorch transforms"):
        torch.func.grad(lambda x: ops.rms_norm(x, w, EPS).sum())(x)


# ---- gradcheck / gradgradcheck in fp64 over every flag combination --------------------------------------


def _flag_grid():
    for name in OPS:
        for weight in (False, True):
            for bias in (False, True):
                for offset in (0.0, 1.0) if weight else (0.0,):
                    for p in (1.0, 0.5) if not is_center(name) else (1.0,):
                        for ndim in (1, 2):
                            yield name, weight, bias, offset, p, ndim


@pytest.mark.parametrize("name,weight,bias,offset,p,ndim", list(_flag_grid()))
def test_gradcheck(name, weight, bias, offset, p, ndim):
    x, r, w, b = make_inputs(name, (2, 3, 4), torch.float64, normalized_ndim=ndim, weight=weight, bias=bias)
    leaves = [t.requires_grad_() for t in (x, r, w, b) if t is not None]
    kw = dict(normalized_ndim=ndim, weight_offset=offset)
    if not is_center(name):
        kw["p"] = p

    def fn(*ts):
        it = iter(ts)
        args = [next(it) if t is not None else None for t in (x, r, w, b)]
        out, s = call(name, *args, **kw)
        return out if s is None else (out, s)

    assert gradcheck(fn, leaves)
    assert gradgradcheck(fn, leaves)


@pytest.mark.parametrize("name", OPS)
def test_higher_order_grads_match_float64(name):
    """Second and third derivatives against the reference's plain autograd, in float64.

    create_graph takes the C++ backward (the Python one without the extension) through the backward op's
    own formula, then through plain autograd of that formula's graph; gradgradcheck checks the second
    order only, and numerically."""
    x, r, w, b = make_inputs(name, (3, 16), torch.float64)
    kw = dict(weight_offset=0.5) if is_center(name) else dict(weight_offset=0.5, p=0.5)
    leaves = [t for t in (x, r, w, b) if t is not None]
    g = torch.Generator().manual_seed(7)
    dy = [torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(2)]  # out, sum
    v1, v2 = ([torch.randn(t.shape, generator=g, dtype=torch.float64) for t in leaves] for _ in range(2))

    def grad(outs, ins, gos, **kw):
        used = [(o, go) for o, go in zip(outs, gos, strict=False) if o.requires_grad]  # not db = sum(dy)
        outs, gos = zip(*used, strict=True)
        return torch.autograd.grad(outs, ins, gos, **kw, allow_unused=True, materialize_grads=True)

    def derivatives(fn):
        ins = [t.detach().clone().requires_grad_() for t in leaves]
        it = iter(ins)
        out, s = fn(name, *[next(it) if t is not None else None for t in (x, r, w, b)], **kw)
        outs = [out] if s is None else [out, s]
        first = grad(outs, ins, dy, create_graph=True)
        second = grad(first, ins, v1, create_graph=True)
        return outs, first, second, grad(second, ins, v2)

    ours, theirs = derivatives(call), derivatives(reference64)
    if normpass.FALLBACK_REASON is None:
        assert ours[0][0].grad_fn.name() == "torch::autograd::CppNode<normpass::NormFunction>"
    assert ours[1][0].grad_fn.name().startswith("GeneratedBackwardFor_normpass_")  # the backward op's formula
    for order in (1, 2, 3):
        for a, e in zip(ours[order], theirs[order], strict=True):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


# ---- the reference fallback ----------------------------------------------------------------------------


def test_reference_fallback_parity():
    """With NORMPASS_FORCE_REFERENCE=1 the ops are the pure-PyTorch ones; they pass the same checks."""
    code = textwrap.dedent(
        """
        import torch
        import test_ops_numerics as t
        import normpass
        assert normpass.FALLBACK_REASON is not None
        for name in t.OPS:
            for dtype in (torch.float32, torch.bfloat16):
                x, r, w, b = t.make_inputs(name, (5, 33), dtype)
                t.check_parity(name, x, r, w, b)
            x, r, w, b = t.make_inputs(
                name, (2, 3, 8), torch.float16, normalized_ndim=2, param_dtype=torch.float32
            )
            kw = dict(normalized_ndim=2, weight_offset=1.0, out_dtype=torch.float32)
            if not t.is_center(name):
                kw["p"] = 0.5
            t.check_parity(name, x, r, w, b, **kw)
            if t.has_residual(name):
                t.test_16_bit_residual_of_fp32_rows_is_widened_exactly(name, torch.bfloat16, 37, "cpu")
        # A frozen weight (BitFit): the fallback's autograd asks only for the gradients wanted.
        x, r, w, b = t.make_inputs("add_layer_norm", (5, 33), torch.float32)
        with t.BackwardCalls() as calls:
            out, _ = t.call("add_layer_norm", x.requires_grad_(), r, w, b.requires_grad_())
            torch.autograd.grad(out.sum(), (x, b))
        assert calls.asked == [(False, True)], calls.asked
        # The kernels' contract holds here too: contiguous outputs, the same op-named errors.
        ops = torch.ops.normpass
        xt = torch.randn(8, 6).t()
        assert ops.rms_norm(xt, None, 1e-6).is_contiguous()
        assert all(o.is_contiguous() for o in ops.add_layer_norm(xt, xt, None, None, 1e-6))
        bwd = dict(has_bias=False, normalized_ndim=1, weight_offset=0.0, p=1.0)
        assert ops.rms_norm_backward(xt, xt, None, None, 1e-6, None, **bwd)[0].is_contiguous()
        for call, message in (
            (lambda: ops.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-6),
             "normpass.rms_norm: weight has shape [7]"),
            (lambda: ops.rms_norm_backward(
                torch.randn(3, 8), torch.randn(3, 8), None, None, 1e-6, [torch.randn(3, 4)], **bwd),
             "normpass.rms_norm_backward: extra_grad_outs[0] has shape [3, 4]"),
        ):
            try:
                call()
            except RuntimeError as e:
                assert message in str(e), str(e)
            else:
                raise AssertionError("no error: " + message)
        print("ok")
        """
    )
    env = dict(os.environ, NORMPASS_FORCE_REFERENCE="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_parity_check_can_fail(monkeypatch, dtype):
    """The margin is small enough to catch a slightly wrong op (weight off by 3%)."""
    real_call = call

    def off_by_a_bit(name, x, residual, w, b, eps=EPS, **kw):
        return real_call(name, x, residual, w * 1.03, b, eps, **kw)

    monkeypatch.setattr(sys.modules[__name__], "call", off_by_a_bit)
    x, r, w, b = make_inputs("rms_norm", (8, 64), dtype)
    with pytest.raises(AssertionError, match="normpass err"):
        check_parity("rms_norm", x, r, w, b)


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_parity_other_cpu_variants(isa):
    """The kernels are compiled per instruction set; NORMPASS_CPU_ISA caps the one picked at run time,
    so the variants this machine would not choose are checked too (half/bf16 conversions included)."""
    code = textwrap.dedent(
        """
        import torch
        import test_ops_numerics as t
        for name in t.OPS:
            for dtype in t.DTYPES:
                x, r, w, b = t.make_inputs(name, (4, 100), dtype, layout="sliced")
                t.check_parity(name, x, r, w, b)
            x, r, w, b = t.make_inputs(name, (3, 40), torch.float16, param_dtype=torch.float32)
            t.check_parity(name, x, r, w, b, weight_offset=1.0, out_dtype=torch.bfloat16)
        # every float16 bit pattern survives the kernels' own conversions (x + 0 -> sum)
        h = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16).reshape(-1, 64)
        _, s = torch.ops.normpass.add_rms_norm(h, torch.zeros_like(h), None, 1e-6)
        want = h + torch.zeros_like(h)
        assert torch.equal(s.isnan(), want.isnan())
        assert torch.equal(s[~s.isnan()].view(torch.int16), want[~want.isnan()].view(torch.int16))
        print("ok")
        """
    )
    env = dict(os.environ, NORMPASS_CPU_ISA=isa)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


# ---- extra_grad_outs: the backward ops sum the output's gradient terms as eager adds would -----------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("center", [False, True], ids=["rms", "ln"])
@pytest.mark.parametrize("terms", [1, 2, 3])
def test_extra_grad_outs_equal_summed_grad_out(terms, center, dtype):
    """Same bits as the backward of the eagerly summed gradient (one rounding per add, in order);
    the last term's rows strided."""
    g = torch.Generator().manual_seed(terms)
    x, dy, ds = (torch.randn(5, 24, generator=g).to(dtype) for _ in range(3))
    w = torch.randn(24, generator=g).to(dtype)
    extra = [torch.randn(5, 24, generator=g).to(dtype) for _ in range(terms - 1)]
    extra.append(torch.randn(5, 30, generator=g).to(dtype)[:, 3:27])
    summed = dy
    for term in extra:
        summed = summed + term
    op = backward_op(center, weight_offset=0.25)
    expected = op(summed, x, w, ds, 1e-5)
    got = op(dy, x, w, ds, 1e-5, extra)
    for name, e, o in zip(("dx", "dweight", "dbias"), expected, got, strict=True):
        assert torch.equal(e, o), name


def test_extra_grad_outs_checked():
    x = torch.randn(3, 8)
    kw = dict(has_bias=False, normalized_ndim=1, weight_offset=0.0, p=1.0)
    message = r"extra_grad_outs\[1\] has shape \[3, 4\] but input has shape \[3, 8\]"
    with pytest.raises(RuntimeError, match=message):  # the message names which term
        ops.rms_norm_backward(x, x, None, None, 1e-5, [x, torch.randn(3, 4)], **kw)
