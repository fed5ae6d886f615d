# ruff: noqa: E501  (expecttest strings hold whole graph lines)
"""Policies (rmsnorm, prmsnorm, low_precision) and the multi-output ATen calls."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from expecttest import TestCase
from norm_forms import build, inputs
from rewrite_helpers import capture, compact, n_normpass, rewrite_copy, rewritten_fn
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from normpass import api, reference


def _close(a, b, dtype):
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


class TestChangedMath(TestCase):
    def test_rmsnorm_policy_keeps_weight_and_bias(self):
        model, xs = build("nn.LayerNorm"), inputs("nn.LayerNorm")
        with torch.no_grad():
            model.bias.normal_()
        g, rep = rewrite_copy(capture(model, xs, "export"), "rmsnorm")
        self.assertExpectedInline(
            compact(g),
            """\
rms_norm_default = normpass.rms_norm(input, p_weight, 1e-05, p_bias)
return [rms_norm_default]""",
        )
        self.assertExpectedInline(
            rep.rows[0].reason,
            """policy rmsnorm: LayerNorm -> RMSNorm (no mean-centering; same weight and bias)""",
        )
        want = reference.norm(xs[0], model.weight, model.bias, 1e-5, center=False)
        _close(g.module()(*xs), want, torch.float32)

    def test_rmsnorm_policy_hand_written_layernorm(self):
        model, xs = build("L2 var_mean"), inputs("L2 var_mean")
        fn, _, rep = rewritten_fn(model, xs, "dynamo", "rmsnorm")
        self.assertEqual([r.op for r in rep.rows], ["normpass.rms_norm"])
        want = reference.norm(xs[0], model.weight, model.bias, model.eps, center=False)
        _close(fn(*xs), want, torch.float32)

    def test_prmsnorm_policy(self):
        for name in ("nn.RMSNorm", "L1 two-pass", "R1 llama"):
            model, xs = build(name), inputs(name)
            g, rep = rewrite_copy(capture(model, xs, "export"), "prmsnorm", p=0.25)
            self.assertEqual(
                [r.reason for r in rep.rows],
                [
                    f"policy prmsnorm: {'LayerNorm' if name == 'L1 two-pass' else 'RMSNorm'} -> partial RMSNorm (p=0.25)"
                ],
            )
            bias = getattr(model, "bias", None)
            want = reference.norm(xs[0], model.weight, bias, model.eps, center=False, p=0.25)
            _close(g.module()(*xs), want, torch.float32)
        self.assertExpectedInline(
            compact(g),
            """\
rms_norm_default = normpass.rms_norm(x, p_weight, 1e-06, p=0.25)
return [rms_norm_default]""",
        )

    def test_p_is_prmsnorms_alone(self):
        model, xs = build("nn.RMSNorm"), inputs("nn.RMSNorm")
        g, _ = rewrite_copy(capture(model, xs, "export"), "fuse")
        self.assertNotIn("p=", compact(g))
        with self.assertRaisesRegex(ValueError, "policy 'fuse' has none"):  # it would be ignored
            rewrite_copy(capture(model, xs, "export"), "fuse", p=0.25)


class ExplicitFp32LayerNorm(nn.Module):
    """A LayerNorm computed in fp32 on a bf16 activation (what autocast does on CUDA), then used twice:
    once through a bf16 cast and once as is."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(8)

    def forward(self, x):
        y = F.layer_norm(x.float(), (8,), self.ln.weight, self.ln.bias, 1e-5)
        return y.to(torch.bfloat16) * 2, y + 1


class TestLowPrecision(TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.model = ExplicitFp32LayerNorm()
        with torch.no_grad():
            self.model.ln.weight.normal_()
            self.model.ln.bias.normal_()
        self.xs = (torch.randn(2, 3, 8).bfloat16(),)

    def test_fuse_keeps_fp32_output(self):
        g, rep = rewrite_copy(capture(self.model, self.xs, "export"), "fuse")
        self.assertExpectedInline(
            compact(g),
            """\
layer_norm_default = normpass.layer_norm(x, p_ln_weight, p_ln_bias, 1e-05, out_dtype=float32)
to_1 = aten.to(layer_norm_default, bfloat16)
mul = aten.mul(to_1, 2)
add = aten.add(layer_norm_default, 1)
return [mul, add]""",
        )

    def test_aten_bf16_io_casts_back_for_fp32_users(self):
        g, rep = rewrite_copy(capture(self.model, self.xs, "export"), "low_precision")
        self.assertExpectedInline(
            compact(g),
            """\
layer_norm_default = normpass.layer_norm(x, p_ln_weight, p_ln_bias, 1e-05)
_to_copy_default = aten._to_copy(layer_norm_default, dtype=float32)
mul = aten.mul(layer_norm_default, 2)
add = aten.add(_to_copy_default, 1)
return [mul, add]""",
        )
        self.assertExpectedInline(
            rep.rows[0].reason,
            """policy low_precision: autocast LayerNorm with bfloat16 IO instead of fp32""",
        )
        lo, hi = g.module()(*self.xs)
        self.assertEqual((lo.dtype, hi.dtype), (torch.bfloat16, torch.float32))
        want = reference.norm(self.xs[0], self.model.ln.weight, self.model.ln.bias, 1e-5, center=True)
        _close(hi, want.float() + 1, torch.bfloat16)

    def test_core_aten_native_layer_norm(self):
        # Decomposed: _to_copy(x, fp32) -> native_layer_norm -> getitem(0); the same site.
        g, rep = rewrite_copy(capture(self.model, self.xs, "aten"), "low_precision")
        self.assertExpectedInline(
            compact(g),
            """\
layer_norm_default = normpass.layer_norm(x, p_ln_weight, p_ln_bias, 1e-05)
_to_copy_default = aten._to_copy(layer_norm_default, dtype=float32)
mul = aten.mul(layer_norm_default, 2)
add = aten.add(_to_copy_default, 1)
return [mul, add]""",
        )
        lo, hi = g.module()(*self.xs)
        self.assertEqual((lo.dtype, hi.dtype), (torch.bfloat16, torch.float32))

    def test_dynamo_bf16_output(self):
        fn, _, rep = rewritten_fn(self.model, self.xs, "dynamo", "low_precision")
        self.assertEqual(rep.rows[0].op, "normpass.layer_norm")
        lo, hi = fn(*self.xs)
        # Torch-level graphs get the norm's output in bf16 (the algorithm's contract: downstream ops
        # under autocast cast for themselves), so `y + 1` is bf16 too.
        self.assertEqual((lo.dtype, hi.dtype), (torch.bfloat16, torch.bfloat16))
        want = reference.norm(self.xs[0], self.model.ln.weight, self.model.ln.bias, 1e-5, center=True)
        _close(lo, want * 2, torch.bfloat16)

    def test_without_autocast_equals_fuse(self):
        model, xs = build("nn.LayerNorm"), inputs("nn.LayerNorm", torch.bfloat16)
        a, _ = rewrite_copy(capture(model, xs, "export"), "fuse")
        b, _ = rewrite_copy(capture(model, xs, "export"), "low_precision")
        self.assertEqual(compact(a), compact(b))

    def test_dynamo_autocast_meta(self):
        # Under CUDA autocast Dynamo records layer_norm(bf16 input) -> fp32 output, with no cast node.
        # Build that graph directly (this machine has no CUDA autocast for layer_norm).
        graph = fx.Graph()
        x, w, b = (graph.placeholder(n) for n in ("x", "w", "b"))
        ln = graph.call_function(F.layer_norm, (x, (8,), w, b, 1e-5))
        graph.output((ln,))
        with FakeTensorMode() as mode:
            x.meta["example_value"] = torch.empty(2, 8, dtype=torch.bfloat16)
            w.meta["example_value"] = torch.empty(8)
            b.meta["example_value"] = torch.empty(8)
            ln.meta["example_value"] = torch.empty(2, 8)
        del mode
        gm = fx.GraphModule(nn.Module(), graph)
        fused, _ = rewrite_copy(gm, "fuse")
        low, rep = rewrite_copy(gm, "low_precision")
        self.assertExpectedInline(
            compact(fused) + "\n--\n" + compact(low),
            """\
layer_norm_default = normpass.layer_norm(x, w, b, 1e-05, out_dtype=float32)
return [layer_norm_default]
--
layer_norm_default = normpass.layer_norm(x, w, b, 1e-05)
return [layer_norm_default]""",
        )
        xv, wv, bv = torch.randn(2, 8).bfloat16(), torch.randn(8), torch.randn(8)
        self.assertEqual(fused(xv, wv, bv)[0].dtype, torch.float32)
        self.assertEqual(low(xv, wv, bv)[0].dtype, torch.bfloat16)


def _native_ln(x, w, b):
    out, mean, rstd = torch.native_layer_norm(x, (8,), w, b, 1e-5)
    return out


def _native_ln_stats(x, w, b):
    out, mean, rstd = torch.native_layer_norm(x, (8,), w, b, 1e-5)
    return out, mean


def _fused_rms(x, w):
    return torch.ops.aten._fused_rms_norm(x, [8], w, 1e-6)[0]


def _fused_rms_stats(x, w):
    out, rstd = torch.ops.aten._fused_rms_norm(x, [8], w, 1e-6)
    return out * rstd


class TestMultiOutputCalls(TestCase):
    def _run(self, fn, n_args):
        gm = fx.symbolic_trace(fn)
        args = [torch.randn(2, 3, 8)] + [torch.randn(8) for _ in range(n_args - 1)]
        want = fn(*args)
        _, rep = api.rewrite(gm, report=True)
        got = gm(*args)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        return gm, rep

    def test_native_layer_norm(self):
        gm, rep = self._run(_native_ln, 3)
        self.assertEqual(n_normpass(gm), 1)
        _, rep = self._run(_native_ln_stats, 3)
        self.assertExpectedInline(
            str(rep),
            """\
normpass report (policy=fuse): 1 site(s), 0 rewritten, 1 left alone
where              form                          decision    reason
native_layer_norm  call:torch.native_layer_norm  left alone  its mean/rstd output is used by output; normpass ops do not return it""",
        )

    def test_fused_rms_norm(self):
        gm, rep = self._run(_fused_rms, 2)
        self.assertEqual(n_normpass(gm), 1)
        gm, rep = self._run(_fused_rms_stats, 2)
        self.assertEqual(n_normpass(gm), 0)
        self.assertIn("rstd output is used by mul", rep.rows[0].reason)
