# ruff: noqa: E501  (expecttest strings hold whole graph lines)
"""normpass.grad_sums: the adds of a norm output's gradient terms fold into the backward op."""

from __future__ import annotations

import torch
from expecttest import TestCase
from torch.fx.experimental.proxy_tensor import make_fx

import normpass  # noqa: F401  (registers the ops)
from normpass.grad_sums import fold_grad_sums

ops = torch.ops.normpass
KW = dict(has_bias=False, normalized_ndim=1, weight_offset=0.0, p=1.0)


def trace(fn, *shapes_dtypes):
    """A fake-traced ATen graph of fn (every node carries meta['val'], as inductor's do)."""
    args = [torch.randn(s, dtype=d) for s, d in shapes_dtypes]
    return make_fx(fn, tracing_mode="fake")(*args), args


def backward(grad, x, w):
    return ops.rms_norm_backward(grad, x, w, None, 1e-6, **KW)


class FoldGradSumsTest(TestCase):
    def test_left_nested_adds_fold_in_order(self):
        def fn(a, b, c, x, w):
            return backward((a + b) + c, x, w)

        f32 = torch.float32
        gm, args = trace(fn, *[((4, 8), f32)] * 4, ((8,), f32))
        expected = fn(*args)
        self.assertEqual(fold_grad_sums(gm.graph), 1)
        gm.recompile()
        self.assertExpectedInline(
            gm.code.strip(),
            """\
def forward(self, a_1, b_1, c_1, x_1, w_1):
    rms_norm_backward = torch.ops.normpass.rms_norm_backward.default(a_1, x_1, w_1, None, 1e-06, [b_1, c_1], has_bias = False, normalized_ndim = 1, weight_offset = 0.0, p = 1.0);  a_1 = x_1 = w_1 = b_1 = c_1 = None
    getitem = rms_norm_backward[0]
    getitem_1 = rms_norm_backward[1]
    getitem_2 = rms_norm_backward[2];  rms_norm_backward = None
    return (getitem, getitem_1, getitem_2)""",
        )
        for e, o in zip(expected, gm(*args), strict=True):
            self.assertTrue(torch.equal(e, o))

    def test_lookalikes_stay(self):
        def shared(a, b, x, w):  # the sum is also used elsewhere: folding would add work
            s = a + b
            return backward(s, x, w), s * 2

        def right_nested(a, b, c, x, w):  # a + (b + c) rounds differently: only the outer add folds
            return backward(a + (b + c), x, w)

        def other_dtype(a, b, x, w):  # terms in another dtype than the input: the add casts once
            return backward(a + b, x, w)

        def alpha(a, b, x, w):
            return backward(torch.add(a, b, alpha=2), x, w)

        f32, bf16 = torch.float32, torch.bfloat16
        cases = [
            (shared, [((4, 8), f32)] * 3 + [((8,), f32)], 0),
            (right_nested, [((4, 8), f32)] * 4 + [((8,), f32)], 1),
            (other_dtype, [((4, 8), f32), ((4, 8), f32), ((4, 8), bf16), ((8,), bf16)], 0),
            (alpha, [((4, 8), f32)] * 3 + [((8,), f32)], 0),
        ]
        for fn, specs, folds in cases:
            gm, _ = trace(fn, *specs)
            adds_before = sum(n.target is torch.ops.aten.add.Tensor for n in gm.graph.nodes)
            self.assertEqual(fold_grad_sums(gm.graph), folds, fn.__name__)
            adds_after = sum(n.target is torch.ops.aten.add.Tensor for n in gm.graph.nodes)
            self.assertEqual(adds_before - adds_after, folds, fn.__name__)
