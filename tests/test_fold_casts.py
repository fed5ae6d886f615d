# ruff: noqa: E501  (expecttest strings hold whole graph lines)
"""normpass.fold_casts: the casts around a norm go into normpass's ops, with the same bits."""

from __future__ import annotations

import torch
from expecttest import TestCase
from torch.fx.experimental.proxy_tensor import make_fx

import normpass  # noqa: F401  (registers the ops)
from normpass.fold_casts import fold_casts

ops = torch.ops.normpass
cast = torch.ops.prims.convert_element_type.default
KW = dict(has_bias=False, normalized_ndim=1, weight_offset=0.0, p=1.0)
f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16


def trace(fn, *shapes_dtypes):
    """A fake-traced ATen graph of fn (every node carries meta['val'], as inductor's do), and inputs."""
    args = [torch.randn(s, dtype=d) for s, d in shapes_dtypes]
    return make_fx(fn, tracing_mode="fake")(*args), args


def amp_step(x, w, g):
    """A Llama norm under autocast: fp32 rows, the output cast to bf16, its bf16 gradient widened back."""
    y, _, stats = ops.norm_with_stats(x, None, w, None, 1e-6, center=False)
    dx, dw, _ = ops.rms_norm_backward(cast(g, f32), x, w, None, 1e-6, None, stats, **KW)
    return cast(y, bf16), dx, dw


class FoldCastsTest(TestCase):
    def test_forward_and_backward_casts_fold(self):
        gm, args = trace(amp_step, ((4, 8), f32), ((8,), f32), ((4, 8), bf16))
        expected = gm(*args)
        self.assertEqual(fold_casts(gm.graph), 2)
        gm.recompile()
        self.assertExpectedInline(
            gm.code.strip(),
            """\
def forward(self, x_1, w_1, g_1):
    norm_with_stats = torch.ops.normpass.norm_with_stats.default(x_1, None, w_1, None, 1e-06, center = False, out_dtype = torch.bfloat16)
    getitem = norm_with_stats[0]
    getitem_2 = norm_with_stats[2];  norm_with_stats = None
    rms_norm_backward = torch.ops.normpass.rms_norm_backward.default(g_1, x_1, w_1, None, 1e-06, None, getitem_2, has_bias = False, normalized_ndim = 1, weight_offset = 0.0, p = 1.0);  g_1 = x_1 = w_1 = getitem_2 = None
    getitem_3 = rms_norm_backward[0]
    getitem_4 = rms_norm_backward[1];  rms_norm_backward = None
    return (getitem, getitem_3, getitem_4)""",
        )
        for e, o in zip(expected, gm(*args), strict=True):
            self.assertEqual(e.dtype, o.dtype)
            self.assertTrue(torch.equal(e, o))

    def test_every_gradient_term_folds(self):
        def fn(x, w, g1, g2):
            terms = [cast(g1, f32), cast(g2, f32)]
            return ops.layer_norm_backward(
                terms[0], x, w, None, 1e-6, terms[1:], has_bias=True, normalized_ndim=1, weight_offset=0.0
            )

        gm, args = trace(fn, ((4, 8), f32), ((8,), f32), ((4, 8), bf16), ((4, 8), bf16))
        expected = gm(*args)
        self.assertEqual(fold_casts(gm.graph), 1)
        self.assertFalse(any(n.target is cast for n in gm.graph.nodes))
        for e, o in zip(expected, gm(*args), strict=True):
            self.assertTrue(torch.equal(e, o))

    def test_a_cast_with_the_dtype_as_keyword_folds(self):
        gm, args = trace(lambda x, w: cast(ops.rms_norm(x, w, 1e-6), bf16), ((4, 8), f32), ((8,), f32))
        (node,) = gm.graph.find_nodes(op="call_function", target=cast)
        node.args, node.kwargs = node.args[:1], {"dtype": bf16}  # as another tracer may spell it
        gm.recompile()
        expected = gm(*args)
        self.assertEqual(fold_casts(gm.graph), 1)
        gm.recompile()
        self.assertTrue(torch.equal(gm(*args), expected))
        self.assertFalse(any(n.target is cast for n in gm.graph.nodes))

    def test_lookalikes_stay(self):
        def also_read_in_fp32(x, w):  # the fp32 output is needed as well
            y = ops.rms_norm(x, w, 1e-6)
            return cast(y, bf16), y * 2

        def two_dtypes(x, w):
            y = ops.rms_norm(x, w, 1e-6)
            return cast(y, bf16), cast(y, f16)

        def widened(x, w):  # a cast up is no narrowing
            return cast(ops.rms_norm(x, w, 1e-6), torch.float64)

        def bf16_rows(x, w, g):  # fp16 -> bf16 loses bits: the op would not see the same gradient
            return ops.rms_norm_backward(cast(g, bf16), x, w, None, 1e-6, **KW)

        def one_term_uncast(x, w, g1, g2):  # both terms or none: the op reads them in one dtype
            return ops.rms_norm_backward(cast(g1, f32), x, w, None, 1e-6, [g2], **KW)

        def mixed_sources(x, w, g1, g2):
            return ops.rms_norm_backward(cast(g1, f32), x, w, None, 1e-6, [cast(g2, f32)], **KW)

        cases = [
            (also_read_in_fp32, [((4, 8), f32), ((8,), f32)]),
            (two_dtypes, [((4, 8), f32), ((8,), f32)]),
            (widened, [((4, 8), f32), ((8,), f32)]),
            (bf16_rows, [((4, 8), bf16), ((8,), bf16), ((4, 8), f16)]),
            (one_term_uncast, [((4, 8), f32), ((8,), f32), ((4, 8), bf16), ((4, 8), f32)]),
            (mixed_sources, [((4, 8), f32), ((8,), f32), ((4, 8), bf16), ((4, 8), f16)]),
        ]
        for fn, specs in cases:
            gm, _ = trace(fn, *specs)
            casts_before = sum(n.target is cast for n in gm.graph.nodes)
            self.assertEqual(fold_casts(gm.graph), 0, fn.__name__)
            self.assertEqual(sum(n.target is cast for n in gm.graph.nodes), casts_before, fn.__name__)


if __name__ == "__main__":
    from torch.testing._internal.common_utils import run_tests

    run_tests()
