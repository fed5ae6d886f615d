# ruff: noqa: E501  (expecttest strings hold whole report lines)
"""normpass.rewrite / explain / register_pattern: the public surface of the graph passes."""

from __future__ import annotations

import copy
import io
import os
import re
import tempfile
import zipfile

import pytest
import torch
from expecttest import TestCase
from functorch.compile import make_boxed_func
from norm_forms import H, R1Llama, ResidualBlock, build, inputs
from rewrite_helpers import capture, check_numerics, compact, n_normpass, op_counts, rewrite_copy
from torch import fx, nn
from torch._dynamo.backends.common import aot_autograd

import normpass
from normpass import api
from normpass.passes.match import NoMatch, Reject, Site
from normpass.passes.registry import current_registry


class TestRewrite(TestCase):
    def test_fx_convention_and_report(self):
        gm = fx.symbolic_trace(build("R1 llama"))
        self.assertIs(normpass.rewrite(gm), gm)
        gm = fx.symbolic_trace(build("R1 llama"))
        out, report = api.rewrite(gm, report=True)
        self.assertIs(out, gm)
        self.assertIsInstance(report, api.Report)
        self.assertEqual(
            [(r.form, r.decision, r.op) for r in report.rows],
            [("R1 llama upcast", "rewritten", "normpass.rms_norm")],
        )

    def test_op_counts_before_after(self):
        model, xs = ResidualBlock(), inputs("residual block")
        ep = capture(model, xs, "export")
        self.assertEqual(dict(op_counts(ep)), {"aten.layer_norm": 1})
        ep = normpass.rewrite(ep)
        self.assertEqual(dict(op_counts(ep)), {"normpass.add_rms_norm": 1, "normpass.add_layer_norm": 1})

    def test_exported_program_save_load(self):
        model, xs = ResidualBlock(), inputs("residual block")
        ep = normpass.rewrite(torch.export.export(model, xs))
        self.assertIsInstance(ep, torch.export.ExportedProgram)
        buf = io.BytesIO()
        torch.export.save(ep, buf)
        buf.seek(0)
        loaded = torch.export.load(buf)
        self.assertEqual(n_normpass(loaded), 2)
        torch.testing.assert_close(loaded.module()(*xs), model(*xs), atol=1e-5, rtol=1e-5)

    def test_aot_inductor_package(self):
        """Deployment without Python: AOTInductor compiles the rewritten program and calls the fused ops
        through the dispatcher (their C++ kernels), with the original's float64 accuracy."""
        model, xs = ResidualBlock().eval(), inputs("residual block")
        ep = normpass.rewrite(torch.export.export(model, xs))
        with tempfile.TemporaryDirectory() as tmp:
            path = torch._inductor.aoti_compile_and_package(ep, package_path=os.path.join(tmp, "m.pt2"))
            with zipfile.ZipFile(path) as package:
                called = {
                    op
                    for name in package.namelist()
                    if name.endswith(".wrapper.json")
                    for op in re.findall(r'"target": "(normpass::\w+)"', package.read(name).decode())
                }
            out = torch._inductor.aoti_load_package(path)(*xs)
        self.assertEqual(called, {"normpass::add_rms_norm", "normpass::add_layer_norm"})
        ref = copy.deepcopy(model).double()(*(x.double() for x in xs))
        margin = 4 * torch.finfo(torch.float32).eps * max(1.0, ref.abs().max().item())
        err_orig, err_new = ((t.double() - ref).abs().max().item() for t in (model(*xs), out))
        self.assertLessEqual(err_new, err_orig + margin)

    def test_example_inputs_give_metadata(self):
        # symbolic_trace graphs know no shapes: sum/n needs them, and so does the residual fusion.
        for name, op in (("R4 sum/n", "normpass.rms_norm"), ("residual block", "normpass.add_rms_norm")):
            model, xs = build(name), inputs(name)
            _, rep = rewrite_copy(fx.symbolic_trace(model))
            self.assertNotIn(op, [r.op for r in rep.rows])
            gm, rep = rewrite_copy(fx.symbolic_trace(model), example_inputs=xs)
            self.assertIn(op, [r.op for r in rep.rows])
            torch.testing.assert_close(gm(*xs), model(*xs), atol=1e-5, rtol=1e-5)

    def test_dims_spelled_two_ways_need_the_rank(self):
        class MeanLastVarDim2(nn.Module):  # the same dim of a 3-D input, spelled -1 and 2
            def forward(self, x):
                u = x.mean(-1, keepdim=True)
                return (x - u) * torch.rsqrt(((x - u) ** 2).mean(2, keepdim=True) + 1e-5)

        model, xs = MeanLastVarDim2(), (torch.randn(2, 3, H),)
        _, rep = rewrite_copy(fx.symbolic_trace(model))
        self.assertIn("does not record the input's rank", rep.rows[0].reason)
        gm, rep = rewrite_copy(fx.symbolic_trace(model), example_inputs=xs)
        self.assertEqual([r.op for r in rep.rows], ["normpass.layer_norm"])
        torch.testing.assert_close(gm(*xs), model(*xs), atol=1e-5, rtol=1e-5)

    def test_runtime_dtype_without_metadata(self):
        # No metadata: the output dtype promote(x.dtype, w.dtype) is computed in the graph, so one graph
        # serves fp32 and bf16 inputs like the original.
        model = build("R1 llama")
        gm = normpass.rewrite(fx.symbolic_trace(model))
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, 3, H).to(dtype)
            self.assertEqual(gm(x).dtype, model(x).dtype)
            torch.testing.assert_close(gm(x), model(x), atol=2e-2, rtol=2e-2)

    def test_bad_input(self):
        gm = fx.symbolic_trace(build("R1 llama"))
        with self.assertRaisesRegex(ValueError, "unknown policy 'fast'"):
            normpass.rewrite(gm, "fast")
        ep = torch.export.export(build("R1 llama"), inputs("R1 llama"))
        with self.assertRaisesRegex(ValueError, "an ExportedProgram records its shapes"):
            normpass.rewrite(ep, example_inputs=inputs("R1 llama"))
        with self.assertRaisesRegex(ValueError, "p must be in"):
            normpass.rewrite(gm, "prmsnorm", p=0.0)
        with self.assertRaisesRegex(ValueError, "p is the partial fraction of policy 'prmsnorm'"):
            normpass.rewrite(gm, p=0.5)  # "fuse" would ignore it
        with self.assertRaisesRegex(TypeError, r"give them, as in explain\(model, x\)"):
            normpass.explain(build("R1 llama"))
        with self.assertRaisesRegex(ValueError, "policy 'rmsnorm' has none"):
            normpass.explain(gm, *inputs("R1 llama"), policy="rmsnorm", p=0.5)
        with self.assertRaisesRegex(TypeError, "nn.Module, use torch.fx.symbolic_trace"):
            normpass.rewrite(build("R1 llama"))


class TestDynamo(TestCase):
    def _compile(self, model, xs, dynamic):
        graphs, reports = [], []

        def backend(gm, example_inputs):
            gm, rep = api.rewrite(gm, report=True)
            graphs.append(compact(gm))  # (AOT autograd may consume the graph)
            reports.append(rep)
            boxed = lambda g, _: make_boxed_func(g.forward)  # noqa: E731
            return aot_autograd(fw_compiler=boxed, bw_compiler=boxed)(gm, example_inputs)

        torch._dynamo.reset()
        fn = torch.compile(model, backend=backend, dynamic=dynamic, fullgraph=True)
        return fn, graphs, reports

    def test_eps_runtime_scalar_and_symbolic_shapes(self):
        # dynamic=True: Dynamo lifts the float attribute `self.eps` to a graph input read with .item(), and
        # batch/sequence sizes are symbolic. The op takes the .item() node as eps; AOT autograd traces it.
        model = R1Llama()
        fn, graphs, reports = self._compile(model, None, dynamic=True)
        for shape in ((2, 3, H), (5, 7, H)):
            x = torch.randn(shape, requires_grad=True)
            y = fn(x)
            torch.testing.assert_close(y, model(x), atol=1e-5, rtol=1e-5)
            (gx,) = torch.autograd.grad(y.sum(), x)
            (want,) = torch.autograd.grad(model(x).sum(), x)
            torch.testing.assert_close(gx, want, atol=1e-5, rtol=1e-5)
        first = graphs[0]
        self.assertIn("normpass.rms_norm(l_x_, l_self_parameters_weight_, item)", first)
        self.assertIn("eps passed through as a runtime scalar", reports[0].rows[0].reason)

    def test_residual_block_dynamic(self):
        model = ResidualBlock()
        fn, graphs, _ = self._compile(model, None, dynamic=True)
        for shape in ((2, 3, H), (4, 5, H)):
            x, r = torch.randn(shape), torch.randn(shape)
            torch.testing.assert_close(fn(x, r), model(x, r), atol=1e-5, rtol=1e-5)
        self.assertEqual(graphs[0].count("normpass.add_"), 2)


class TestExplain(TestCase):
    def test_module(self):
        model = ResidualBlock()
        before = copy.deepcopy(model.state_dict())
        report = normpass.explain(model, *inputs("residual block"))
        self.assertExpectedInline(
            str(report),
            """\
normpass report (policy=fuse): 2 site(s), 2 rewritten, 0 left alone
where                    form                  decision                              reason
norm (norm_forms.py:35)  R1 llama upcast       rewritten -> normpass.add_rms_norm    same function, fp32 accumulation; residual add fused (h = x + r used downstream takes the op's sum)
ln (norm_forms.py:364)   call:aten.layer_norm  rewritten -> normpass.add_layer_norm  same function, fp32 accumulation; residual add fused (h = x + r used downstream takes the op's sum)""",
        )
        self.assertIsInstance(report.rows[0], api.Row)
        self.assertEqual(report.rows[0].where, "norm")
        for k, v in model.state_dict().items():
            self.assertTrue(torch.equal(v, before[k]))

    def test_lookalike_policy_and_graph_untouched(self):
        model, xs = build("annotated transformer"), inputs("annotated transformer")
        gm = fx.symbolic_trace(model)
        code = gm.code
        report = normpass.explain(gm, *xs, policy="rmsnorm")
        self.assertEqual(gm.code, code)
        self.assertExpectedInline(
            str(report),
            """\
normpass report (policy=rmsnorm): 1 site(s), 0 rewritten, 1 left alone
where    form                              decision    reason
truediv  look-alike: eps outside the root  left alone  divides by (std + eps): eps is added outside the root, not inside it, and the std is unbiased (correction=1)""",
        )


def _abs_rms(x, weight, eps):
    return x * torch.rsqrt(x.abs().pow(2).mean(-1, keepdim=True) + eps) * weight


class AbsRms(nn.Module):
    """An RMSNorm spelled with |x|^2, which the built-in patterns do not know."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(H))

    def forward(self, x):
        return x * torch.rsqrt(x.abs().square().mean(dim=-1, keepdim=True) + 1e-6) * self.weight


class TestRegisterPattern(TestCase):
    def test_template_scoped_and_idempotent(self):
        model, xs = AbsRms(), inputs("R1 llama")
        _, rep = rewrite_copy(capture(model, xs, "export"))
        self.assertEqual(rep.rows, [])
        with normpass.PatternRegistry() as reg:
            p1 = normpass.register_pattern("abs_rms", _abs_rms, kind="rms")
            p2 = normpass.register_pattern("abs_rms", _abs_rms, kind="rms")
            self.assertEqual(p1, p2)
            self.assertEqual(len(reg), len(normpass.PatternRegistry()) + 1)
            with self.assertRaisesRegex(ValueError, "different pattern named 'abs_rms'"):
                normpass.register_pattern(
                    "abs_rms", lambda x, weight, eps: _abs_rms(x, weight, eps), kind="rms"
                )
            for ir in ("dynamo", "export"):
                rep = check_numerics(model, xs, ir)
                self.assertEqual([(r.form, r.op) for r in rep.rows], [("abs_rms", "normpass.rms_norm")], ir)
            # A template needs the output dtype from metadata: symbolic_trace graphs get it from example_inputs.
            _, rep = rewrite_copy(fx.symbolic_trace(model))
            self.assertEqual(
                rep.rows[0].reason, "the graph does not record the output dtype; pass example_inputs"
            )
            gm, rep = rewrite_copy(fx.symbolic_trace(model), example_inputs=xs)
            self.assertEqual(n_normpass(gm), 1)
            torch.testing.assert_close(gm(*xs), model(*xs), atol=1e-5, rtol=1e-5)
        self.assertNotIn("abs_rms", current_registry())
        _, rep = rewrite_copy(capture(model, xs, "export"))
        self.assertEqual(rep.rows, [])  # nothing leaked out of the block

    def test_ops_the_template_does_not_know_match_only_themselves(self):
        # |x| is no canonical op (a leaf): it matches |x| in any spelling, not tanh(x) or |2x|.
        class Stat(nn.Module):
            def __init__(self, f):
                super().__init__()
                self.f, self.weight = f, nn.Parameter(torch.randn(H))

            def forward(self, x):
                return x * torch.rsqrt(self.f(x).pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

        spellings = {"torch.abs": torch.abs, "tanh": torch.tanh, "abs of 2x": lambda x: (2 * x).abs()}
        lines = []
        with normpass.PatternRegistry():
            normpass.register_pattern("abs_rms", _abs_rms, kind="rms")
            for name, f in spellings.items():
                for ir in ("dynamo", "export"):
                    rep = check_numerics(Stat(f), inputs("R1 llama"), ir)
                    lines.append(f"{name}, {ir}: {[r.op for r in rep.rows]}")
        self.assertExpectedInline(
            "\n".join(lines),
            """\
torch.abs, dynamo: ['normpass.rms_norm']
torch.abs, export: ['normpass.rms_norm']
tanh, dynamo: []
tanh, export: []
abs of 2x, dynamo: []
abs of 2x, export: []""",
        )

    def test_explicit_registry_checks_and_replacement(self):
        reg = normpass.PatternRegistry()
        normpass.register_pattern(
            "abs_rms",
            _abs_rms,
            kind="rms",
            registry=reg,
            checks=[lambda site: "weight must be a parameter" if site.weight is None else None],
        )
        g, rep = rewrite_copy(capture(AbsRms(), inputs("R1 llama"), "export"), registry=reg)
        self.assertEqual(n_normpass(g), 1)

        def to_aten(graph, site):  # a custom replacement: aten.rms_norm instead of the normpass op
            return graph.call_function(
                torch.ops.aten.rms_norm.default, (site.input, [H], site.weight, site.eps)
            )

        reg2 = normpass.PatternRegistry(builtins=False)
        normpass.register_pattern("abs_rms", _abs_rms, kind="rms", replacement=to_aten, registry=reg2)
        model, xs = AbsRms(), inputs("R1 llama")
        g, rep = rewrite_copy(capture(model, xs, "export"), registry=reg2)
        self.assertExpectedInline(
            compact(g),
            """\
rms_norm_default = aten.rms_norm(x, [8], p_weight, 1e-06)
return [rms_norm_default]""",
        )
        self.assertEqual(rep.rows[0].reason, "custom replacement")
        torch.testing.assert_close(g.module()(*xs), model(*xs), atol=1e-5, rtol=1e-5)

    def test_template_must_compute_the_op_it_becomes(self):
        # Without a replacement the site becomes the plain op: whatever else a template computes would
        # be dropped, so registering it fails and says why.
        cases = {
            "needs an argument named eps": lambda x, weight: (
                x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 0.1) * weight
            ),
            "does not compute RMSNorm": lambda x, weight, eps: (
                x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * (1.0 + weight)
            ),
            # A small literal beside eps: invisible at x of unit scale, checked at smaller ones too.
            "does not compute RMSNorm of x": lambda x, weight, eps: (
                x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps + 1e-8) * weight
            ),
            "has argument\\(s\\) \\['scale'\\]": lambda x, weight, eps, scale: (
                _abs_rms(x, weight, eps) * scale
            ),
        }
        for message, template in cases.items():
            with normpass.PatternRegistry(), self.assertRaisesRegex(ValueError, message):
                normpass.register_pattern("t", template, kind="rms")
        with normpass.PatternRegistry(), self.assertRaisesRegex(ValueError, "does not compute LayerNorm"):
            normpass.register_pattern("t", _abs_rms, kind="layer")
        with normpass.PatternRegistry():  # a template that ends in a cast is checked at its own dtype
            normpass.register_pattern(
                "t", lambda x, weight, eps: _abs_rms(x, weight, eps).bfloat16(), kind="rms"
            )
        with normpass.PatternRegistry():  # with a replacement, the template's math is the user's to keep
            normpass.register_pattern(
                "t", cases["does not compute RMSNorm"], kind="rms", replacement=lambda g, s: None
            )

    def test_template_weight_must_have_the_normalized_shape(self):
        class Gated(nn.Module):  # the "weight" is an activation of the input's full shape
            def forward(self, x, gate):
                return _abs_rms(x, gate, 1e-6)

        xs = (torch.randn(2, H), torch.randn(2, H))
        with normpass.PatternRegistry():
            normpass.register_pattern("abs_rms", _abs_rms, kind="rms")
            for ir in ("dynamo", "export"):
                rep = check_numerics(Gated(), xs, ir)
                self.assertEqual(
                    [(r.rewritten, r.reason) for r in rep.rows],
                    [(False, "its weight is not a float tensor of the normalized shape")],
                )

    def test_failing_replacement_leaves_the_graph_as_it_was(self):
        def half_built(graph, site):  # inserts a node, then fails
            graph.call_function(torch.ops.aten.neg.default, (site.input,))
            raise RuntimeError("replacement broke")

        model, xs = AbsRms(), inputs("R1 llama")
        with normpass.PatternRegistry():
            normpass.register_pattern("abs_rms", _abs_rms, kind="rms", replacement=half_built)
            ep = capture(model, xs, "export")
            before = compact(ep)
            with self.assertWarnsRegex(UserWarning, "replacement broke"):
                ep, rep = api.rewrite(ep, report=True)
        self.assertEqual(compact(ep), before)
        ep.validate()
        self.assertEqual(
            [(r.decision, r.reason) for r in rep.rows],
            [("left alone", "the rewrite failed: RuntimeError('replacement broke')")],
        )

        def rewired(graph, site):  # changes the graph's existing nodes, then fails: nothing to undo
            site.output.replace_all_uses_with(graph.call_function(torch.ops.aten.neg.default, (site.input,)))
            raise RuntimeError("replacement broke after rewiring")

        with normpass.PatternRegistry():
            normpass.register_pattern("abs_rms", _abs_rms, kind="rms", replacement=rewired)
            with self.assertRaisesRegex(RuntimeError, "replacement broke after rewiring"):
                api.rewrite(capture(model, xs, "export"))

    def test_search_function_reports_lookalike(self):
        def tanh_norm(term, m):  # a search function over the canonical view: flags tanh(x) "norms"
            if term.node.target in (torch.tanh, torch.ops.aten.tanh.default):
                raise Reject("look-alike: tanh squash", "bounded, but not a normalization")
            return None

        model, xs = ResidualBlock(), inputs("residual block")
        with normpass.PatternRegistry():
            normpass.register_pattern("tanh", tanh_norm, anchors=("leaf",))
            _, rep = rewrite_copy(capture(model, xs, "export"))
        self.assertEqual([r.form for r in rep.rows if not r.rewritten], ["look-alike: tanh squash"])
        with pytest.raises(TypeError, match="needs `anchors`"):
            normpass.register_pattern("x", tanh_norm)

    def test_search_function_builds_site(self):
        def abs_rms(term, m):  # x * rsqrt(mean(abs(x)^2) + eps), walked by hand over the canonical view
            rsqrt, h = m.split(term, "rsqrt")
            add = m.take(rsqrt.args[0], "add")
            mean = m.take(add.args[0], "mean")
            a = m.take(m.take(mean.args[0], "square").args[0], "leaf")  # aten.abs: not in the vocabulary
            if a.node.target is not torch.ops.aten.abs.default or a.node.args[0] is not m.node_of(h):
                raise NoMatch
            return Site(
                kind="rms",
                form="abs rms (search)",
                input=m.node_of(h),
                output=term.node,
                weight=None,
                bias=None,
                eps=m.eps(add.args[1]),
                normalized_ndim=1,
                out_dtype=torch.float32,
                nodes=set(m.nodes) | {term.node},
            )

        class Plain(nn.Module):
            def forward(self, x):
                return x * torch.rsqrt(x.abs().square().mean(-1, keepdim=True) + 1e-6)

        model, xs = Plain(), inputs("R1 llama")
        with normpass.PatternRegistry():
            normpass.register_pattern("abs_rms_search", abs_rms, anchors=("mul",))
            g, rep = rewrite_copy(capture(model, xs, "export"))
        self.assertEqual([(r.form, r.op) for r in rep.rows], [("abs rms (search)", "normpass.rms_norm")])
        torch.testing.assert_close(g.module()(*xs), model(*xs), atol=1e-5, rtol=1e-5)


class TestRobustness(TestCase):
    def test_broken_pattern_is_reported_not_raised(self):
        def broken(term, m):
            raise KeyError("oops")

        model, xs = build("R1 llama"), inputs("R1 llama")
        with normpass.PatternRegistry() as reg:
            normpass.register_pattern("broken", broken, anchors=("rsqrt",), registry=reg)
            with self.assertWarnsRegex(UserWarning, "pattern 'broken' failed"):
                g, rep = rewrite_copy(capture(model, xs, "export"))
        self.assertEqual(n_normpass(g), 1)  # the built-in pattern still matched at its own anchor
        self.assertEqual(
            [(r.form, r.decision) for r in rep.rows],
            [("broken", "left alone"), ("R1 llama upcast", "rewritten")],
        )

    def test_second_rewrite_is_a_no_op(self):
        gm = normpass.rewrite(fx.symbolic_trace(ResidualBlock()))
        code = gm.code
        _, rep = api.rewrite(gm, report=True)
        self.assertEqual((rep.rows, gm.code), ([], code))

    def test_integer_input_keeps_its_cast(self):
        # An int tensor cast to fp32 is not an "exact upcast" the op could absorb: the cast stays its input.
        class IntRms(nn.Module):
            def forward(self, x):
                h = x.float()
                return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)

        x = torch.randint(-5, 5, (2, 8))
        ep = normpass.rewrite(torch.export.export(IntRms(), (x,)))
        self.assertExpectedInline(
            compact(ep),
            """\
to = aten.to(x, float32)
rms_norm_default = normpass.rms_norm(to, None, 1e-06)
return [rms_norm_default]""",
        )
        torch.testing.assert_close(ep.module()(x), IntRms()(x))
