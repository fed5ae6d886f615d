"""The fake impls work with symbolic shapes and do not specialize them."""

from __future__ import annotations

import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.fx.experimental.proxy_tensor import make_fx

import normpass  # noqa: F401  (registers the ops)

ops = torch.ops.normpass


def all_ops(x, r, w, b):
    """Every forward op, with normalized_ndim=2 and the keyword flags, summed into one output."""
    y1 = ops.rms_norm(x, w, 1e-6, b, normalized_ndim=2, weight_offset=1.0, p=0.5)
    y2 = ops.layer_norm(x, w, b, 1e-5, normalized_ndim=2, out_dtype=torch.float64)
    y3, s3 = ops.add_rms_norm(x, r, w, 1e-6, normalized_ndim=2)
    y4, s4 = ops.add_layer_norm(x, r, None, b, 1e-5, normalized_ndim=2)
    return y1 + y2 + y3 + y4 + s3 * s4


def inputs(batch, seq, hidden, requires_grad=False):
    g = torch.Generator().manual_seed(batch * 1000 + hidden)
    x, r = torch.randn(batch, seq, hidden, generator=g), torch.randn(batch, seq, hidden, generator=g)
    w, b = torch.randn(seq, hidden, generator=g), torch.randn(seq, hidden, generator=g)
    return [t.requires_grad_(requires_grad) for t in (x, r, w, b)]


def test_make_fx_symbolic_keeps_sizes_symbolic():
    gm = make_fx(all_ops, tracing_mode="symbolic")(*inputs(2, 3, 8))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    sizes = out.meta["val"].shape
    assert all(isinstance(s, torch.SymInt) for s in sizes), sizes
    assert all(not s.node.expr.is_number for s in sizes), sizes  # not specialized to 2, 3, 8
    for shape in [(2, 3, 8), (5, 4, 33)]:
        args = inputs(*shape)
        torch.testing.assert_close(gm(*args), all_ops(*args))


def test_make_fx_symbolic_backward_ops():
    def grads(dy, x, w, ds):
        a = ops.rms_norm_backward(
            dy, x, w, ds, 1e-6, has_bias=True, normalized_ndim=2, weight_offset=0.0, p=0.5
        )
        b = ops.layer_norm_backward(
            dy, x, w, None, 1e-6, has_bias=False, normalized_ndim=2, weight_offset=1.0
        )
        return [*a, *b]

    x, r, w, _ = inputs(2, 3, 8)
    gm = make_fx(grads, tracing_mode="symbolic")(r, x, w, r)
    outs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    # Every gradient but the absent dbias of the second op (an empty tensor) has symbolic sizes.
    for node in outs[:5]:
        sizes = node.meta["val"].shape
        assert all(isinstance(s, torch.SymInt) and not s.node.expr.is_number for s in sizes), sizes
    assert tuple(outs[5].meta["val"].shape) == (0,)
    x, r, w, _ = inputs(4, 5, 16)
    for got, want in zip(gm(r, x, w, r), grads(r, x, w, r), strict=True):
        torch.testing.assert_close(got, want)


def test_compile_dynamic_aot_eager_no_recompile():
    """One compile (forward and backward through the fake impls) serves every shape."""
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(all_ops, backend=counter, dynamic=True, fullgraph=True)
    for shape in [(2, 3, 8), (3, 5, 16), (4, 7, 40)]:  # sizes >= 2: torch specializes 0 and 1
        args = inputs(*shape, requires_grad=True)
        out = compiled(*args)
        want = all_ops(*args)
        torch.testing.assert_close(out, want)
        dy = torch.randn_like(out)
        got_grads = torch.autograd.grad(out, args, dy)
        want_grads = torch.autograd.grad(want, args, dy)
        for got, exp in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(got, exp)
    assert counter.frame_count == 1
