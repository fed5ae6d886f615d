# ruff: noqa: E501  (expecttest strings hold whole report lines and graph lines)
"""Every form of PATTERNS.md, in every IR: what the report says, the rewritten graph, and numerics.

Graphs and reports are expecttest strings (regenerate with EXPECTTEST_ACCEPT=1, then read them).
"""

from __future__ import annotations

import types

import pytest
import torch
from expecttest import TestCase
from norm_forms import (
    FORMS,
    LOOKALIKES,
    FlooredRms,
    HookedLayerNorm,
    InputReluInPlace,
    InputUpdatedInPlace,
    MeanWrittenOut,
    NormOfExpandedInput,
    RmsNormDefaultEps,
    RoundingNoneRms,
    build,
    inputs,
)
from rewrite_helpers import (
    IRS,
    capture,
    check_numerics,
    compact,
    n_normpass,
    op_counts,
    rewrite_copy,
    rewritten_fn,
)
from torch import nn

# symbolic_trace cannot trace T5's `if self.weight.dtype in (...)` (a Python branch on a Proxy).
FX_UNTRACEABLE = {"R2 t5"}
# sum(x^2) / n is a mean only when n is provably the reduced size, and a (1, 1, n) weight before the
# scale is a weight only when it provably adds no dim to x's: symbolic_trace graphs without metadata
# cannot tell (test_api checks the first matches once example_inputs are given).
FX_NEEDS_META = {"R4 sum/n", "L1 broadcast weight and bias"}


def _cases(forms):
    return [(name, ir) for name in forms for ir in IRS if not (ir == "fx" and name in FX_UNTRACEABLE)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,ir", _cases(FORMS))
def test_form_numerics_and_counts(name, ir, dtype):
    model, xs = build(name, dtype), inputs(name, dtype)
    rep = check_numerics(model, xs, ir)
    expected = 0 if (ir == "fx" and name in FX_NEEDS_META) else FORMS[name][2]
    assert len(rep.rewritten) == expected, str(rep)
    if ir != "dynamo":  # (Dynamo graphs are checked through the compiled function above)
        rewritten, _ = rewrite_copy(capture(model, xs, ir))
        assert n_normpass(rewritten) == expected


@pytest.mark.parametrize("name,ir", _cases(LOOKALIKES))
def test_lookalikes_left_alone(name, ir):
    model, xs = build(name), inputs(name)
    g = capture(model, xs, ir)
    before = op_counts(g)
    rewritten, rep = rewrite_copy(g)
    assert n_normpass(rewritten) == 0
    assert op_counts(rewritten) == before
    assert rep.rows and all(not r.rewritten and r.reason for r in rep.rows), str(rep)
    if ir != "dynamo":
        check_numerics(model, xs, ir)


def _summary(ir: str, forms) -> str:
    lines = []
    for name in forms:
        if ir == "fx" and name in FX_UNTRACEABLE:
            continue
        model, xs = build(name), inputs(name)
        _, rep = rewrite_copy(capture(model, xs, ir))
        rows = "; ".join(
            f"{r.form} -> {r.op}" if r.rewritten else f"{r.form}: left alone ({r.reason})" for r in rep.rows
        )
        lines.append(f"{name}: {rows or '-'}")
    return "\n".join(lines)


def _graphs(ir: str, forms) -> str:
    out = []
    for name in forms:
        model, xs = build(name), inputs(name)
        rewritten, _ = rewrite_copy(capture(model, xs, ir))
        out.append(f"# {name}\n{compact(rewritten)}")
    return "\n".join(out)


class TestReports(TestCase):
    def test_fx(self):
        self.assertExpectedInline(
            _summary("fx", {**FORMS, **LOOKALIKES}),
            """\
R1 llama: R1 llama upcast -> normpass.rms_norm
R3 gemma: R3 gemma 1+w -> normpass.rms_norm
R4 mul: R4 no casts -> normpass.rms_norm
R4 weight first: R4 no casts -> normpass.rms_norm
R4 broadcast weight: R5 no weight -> normpass.rms_norm
R4 sqrt/div: R4 no casts -> normpass.rms_norm
R4 1/sqrt: R4 no casts -> normpass.rms_norm
R4 square/rsqrt method: R4 no casts -> normpass.rms_norm
R4 sum/n: -
R5 no weight: R5 no weight -> normpass.rms_norm
R5 bias: R5 weight+bias -> normpass.rms_norm
R6 per-head: R1 llama upcast -> normpass.rms_norm; R1 llama upcast -> normpass.rms_norm
L1 two-pass: L1 two-pass -> normpass.layer_norm
L1 repeated mean: L1 two-pass -> normpass.layer_norm
L1 weight first: L1 two-pass -> normpass.layer_norm
L1 broadcast weight and bias: look-alike: scaled input: left alone (x is multiplied, before the statistics' scale, by a factor that is no weight of the normalized shape (or whose shape the graph does not record: pass example_inputs))
L2 var_mean: L2 var_mean -> normpass.layer_norm
L3 var: L3 var -> normpass.layer_norm
L3 upcast: L3 var -> normpass.layer_norm
nn.LayerNorm: call:F.layer_norm -> normpass.layer_norm
nn.LayerNorm no bias: call:F.layer_norm -> normpass.layer_norm
nn.LayerNorm no affine: call:F.layer_norm -> normpass.layer_norm
nn.LayerNorm 2 dims: call:F.layer_norm -> normpass.layer_norm
F.layer_norm: call:F.layer_norm -> normpass.layer_norm
torch.layer_norm: call:torch.layer_norm -> normpass.layer_norm
nn.RMSNorm: call:F.rms_norm -> normpass.rms_norm
F.rms_norm: call:F.rms_norm -> normpass.rms_norm
residual block: R1 llama upcast -> normpass.rms_norm; call:nn.LayerNorm -> normpass.layer_norm
sandwich block: R3 gemma 1+w -> normpass.rms_norm; R3 gemma 1+w -> normpass.rms_norm
aliased residual block: R1 llama upcast -> normpass.rms_norm
autocast residual block: R1 llama upcast -> normpass.rms_norm
mixed 16-bit residual block: R1 llama upcast -> normpass.rms_norm
autocast residual block, projection first: R1 llama upcast -> normpass.rms_norm
float64 residual block: R1 llama upcast -> normpass.rms_norm
expanded residual block: R1 llama upcast -> normpass.rms_norm
two norms of one stream: R1 llama upcast -> normpass.rms_norm; R1 llama upcast -> normpass.rms_norm
scaled by its input: R5 no weight -> normpass.rms_norm
normalized used elsewhere: R5 no weight -> normpass.rms_norm
L4 channels-first: look-alike: L1 two-pass: left alone (statistics over dims (1,), not the trailing dims)
unbiased var: look-alike: unbiased var: left alone (unbiased variance (correction=1); LayerNorm divides by n, not n - 1)
annotated transformer: look-alike: eps outside the root: left alone (divides by (std + eps): eps is added outside the root, not inside it, and the std is unbiased (correction=1))
eps outside rms: look-alike: eps outside the root: left alone (divides by (sqrt + eps): eps is added outside the root, not inside it)
F.normalize: look-alike: F.normalize: left alone (divides by max(||x||, eps): the norm is clamped at eps, not computed with eps inside the root)
mismatched dims: look-alike: mismatched dims: left alone (mean over dims (-1,) but variance over dims (-2,))
repeated mean of another dim: look-alike: mismatched dims: left alone (x is centered by two different means of it: over dims (-2,) (keepdim=True) and over dims (-1,) (keepdim=True))
scaled before normalizing: look-alike: scaled input: left alone (x is multiplied, before the statistics' scale, by a factor that is no weight of the normalized shape (or whose shape the graph does not record: pass example_inputs))
batch stats: look-alike: RMS-like: left alone (statistics over dims (0,), not the trailing dims)
mean used elsewhere: L3 var: left alone (intermediate mean is also used by add_1; the fused op would not produce it)
rstd used elsewhere: R4 no casts: left alone (intermediate rsqrt is also used by output; the fused op would not produce it)""",
        )

    def test_dynamo(self):
        self.assertExpectedInline(
            _summary("dynamo", {**FORMS, **LOOKALIKES}),
            """\
R1 llama: R1 llama upcast -> normpass.rms_norm
R2 t5: R2 t5 fp32 stats -> normpass.rms_norm
R3 gemma: R3 gemma 1+w -> normpass.rms_norm
R4 mul: R4 no casts -> normpass.rms_norm
R4 weight first: R4 no casts -> normpass.rms_norm
R4 broadcast weight: R4 no casts -> normpass.rms_norm
R4 sqrt/div: R4 no casts -> normpass.rms_norm
R4 1/sqrt: R4 no casts -> normpass.rms_norm
R4 square/rsqrt method: R4 no casts -> normpass.rms_norm
R4 sum/n: R4 no casts -> normpass.rms_norm
R5 no weight: R5 no weight -> normpass.rms_norm
R5 bias: R5 weight+bias -> normpass.rms_norm
R6 per-head: R1 llama upcast -> normpass.rms_norm; R1 llama upcast -> normpass.rms_norm
L1 two-pass: L1 two-pass -> normpass.layer_norm
L1 repeated mean: L1 two-pass -> normpass.layer_norm
L1 weight first: L1 two-pass -> normpass.layer_norm
L1 broadcast weight and bias: L1 two-pass -> normpass.layer_norm
L2 var_mean: L2 var_mean -> normpass.layer_norm
L3 var: L3 var -> normpass.layer_norm
L3 upcast: L3 var -> normpass.layer_norm
nn.LayerNorm: call:F.layer_norm -> normpass.layer_norm
nn.LayerNorm no bias: call:F.layer_norm -> normpass.layer_norm
nn.LayerNorm no affine: call:F.layer_norm -> normpass.layer_norm
nn.LayerNorm 2 dims: call:F.layer_norm -> normpass.layer_norm
F.layer_norm: call:F.layer_norm -> normpass.layer_norm
torch.layer_norm: call:torch.layer_norm -> normpass.layer_norm
nn.RMSNorm: call:torch.rms_norm -> normpass.rms_norm
F.rms_norm: call:torch.rms_norm -> normpass.rms_norm
residual block: R1 llama upcast -> normpass.add_rms_norm; call:F.layer_norm -> normpass.add_layer_norm
sandwich block: R3 gemma 1+w -> normpass.rms_norm; R3 gemma 1+w -> normpass.rms_norm
aliased residual block: R1 llama upcast -> normpass.add_rms_norm
autocast residual block: R1 llama upcast -> normpass.add_rms_norm
mixed 16-bit residual block: R1 llama upcast -> normpass.rms_norm
autocast residual block, projection first: R1 llama upcast -> normpass.add_rms_norm
float64 residual block: R1 llama upcast -> normpass.rms_norm
expanded residual block: R1 llama upcast -> normpass.add_rms_norm
two norms of one stream: R1 llama upcast -> normpass.add_rms_norm; R4 no casts -> normpass.rms_norm
scaled by its input: R5 no weight -> normpass.add_rms_norm
normalized used elsewhere: R5 no weight -> normpass.rms_norm
L4 channels-first: L4 channels-first: left alone (statistics over dim 1 of an NCHW tensor; normpass ops normalize trailing dims, and a movedim round trip would cost two copies)
unbiased var: look-alike: unbiased var: left alone (unbiased variance (correction=1); LayerNorm divides by n, not n - 1)
annotated transformer: look-alike: eps outside the root: left alone (divides by (std + eps): eps is added outside the root, not inside it, and the std is unbiased (correction=1))
eps outside rms: look-alike: eps outside the root: left alone (divides by (sqrt + eps): eps is added outside the root, not inside it)
F.normalize: look-alike: F.normalize: left alone (divides by max(||x||, eps): the norm is clamped at eps, not computed with eps inside the root)
mismatched dims: look-alike: mismatched dims: left alone (mean over dims (-1,) but variance over dims (-2,))
repeated mean of another dim: look-alike: mismatched dims: left alone (x is centered by two different means of it: over dims (-2,) (keepdim=True) and over dims (-1,) (keepdim=True))
scaled before normalizing: look-alike: scaled input: left alone (x is multiplied, before the statistics' scale, by a factor that is no weight of the normalized shape (or whose shape the graph does not record: pass example_inputs))
batch stats: look-alike: RMS-like: left alone (statistics over dims (0,) include the batch dim 0 (BatchNorm-like))
mean used elsewhere: L3 var: left alone (intermediate u is also used by add_1; the fused op would not produce it)
rstd used elsewhere: R4 no casts: left alone (intermediate r is also used by output; the fused op would not produce it)""",
        )

    def test_aten(self):
        self.assertExpectedInline(
            _summary("aten", {**FORMS, **LOOKALIKES}),
            """\
R1 llama: R4 no casts -> normpass.rms_norm
R2 t5: R4 no casts -> normpass.rms_norm
R3 gemma: R3 gemma 1+w -> normpass.rms_norm
R4 mul: R4 no casts -> normpass.rms_norm
R4 weight first: R4 no casts -> normpass.rms_norm
R4 broadcast weight: R4 no casts -> normpass.rms_norm
R4 sqrt/div: R4 no casts -> normpass.rms_norm
R4 1/sqrt: R4 no casts -> normpass.rms_norm
R4 square/rsqrt method: R4 no casts -> normpass.rms_norm
R4 sum/n: R4 no casts -> normpass.rms_norm
R5 no weight: R5 no weight -> normpass.rms_norm
R5 bias: R5 weight+bias -> normpass.rms_norm
R6 per-head: R4 no casts -> normpass.rms_norm; R4 no casts -> normpass.rms_norm
L1 two-pass: L1 two-pass -> normpass.layer_norm
L1 repeated mean: L1 two-pass -> normpass.layer_norm
L1 weight first: L1 two-pass -> normpass.layer_norm
L1 broadcast weight and bias: L1 two-pass -> normpass.layer_norm
L2 var_mean: L2 var_mean -> normpass.layer_norm
L3 var: L3 var -> normpass.layer_norm
L3 upcast: L3 var -> normpass.layer_norm
nn.LayerNorm: call:aten.native_layer_norm -> normpass.layer_norm
nn.LayerNorm no bias: call:aten.native_layer_norm -> normpass.layer_norm
nn.LayerNorm no affine: call:aten.native_layer_norm -> normpass.layer_norm
nn.LayerNorm 2 dims: call:aten.native_layer_norm -> normpass.layer_norm
F.layer_norm: call:aten.native_layer_norm -> normpass.layer_norm
torch.layer_norm: call:aten.native_layer_norm -> normpass.layer_norm
nn.RMSNorm: R4 no casts -> normpass.rms_norm
F.rms_norm: R4 no casts -> normpass.rms_norm
residual block: R4 no casts -> normpass.add_rms_norm; call:aten.native_layer_norm -> normpass.add_layer_norm
sandwich block: R3 gemma 1+w -> normpass.rms_norm; R3 gemma 1+w -> normpass.rms_norm
aliased residual block: R4 no casts -> normpass.add_rms_norm
autocast residual block: R4 no casts -> normpass.add_rms_norm
mixed 16-bit residual block: R4 no casts -> normpass.rms_norm
autocast residual block, projection first: R4 no casts -> normpass.add_rms_norm
float64 residual block: R1 llama upcast -> normpass.rms_norm
expanded residual block: R4 no casts -> normpass.add_rms_norm
two norms of one stream: R4 no casts -> normpass.add_rms_norm; R4 no casts -> normpass.rms_norm
scaled by its input: R5 no weight -> normpass.add_rms_norm
normalized used elsewhere: R5 no weight -> normpass.rms_norm
L4 channels-first: L4 channels-first: left alone (statistics over dim 1 of an NCHW tensor; normpass ops normalize trailing dims, and a movedim round trip would cost two copies)
unbiased var: look-alike: unbiased var: left alone (unbiased variance (correction=1); LayerNorm divides by n, not n - 1)
annotated transformer: look-alike: eps outside the root: left alone (divides by (sqrt + eps): eps is added outside the root, not inside it, and the std is unbiased (correction=1))
eps outside rms: look-alike: eps outside the root: left alone (divides by (sqrt + eps): eps is added outside the root, not inside it)
F.normalize: look-alike: F.normalize: left alone (divides by max(||x||, eps): the norm is clamped at eps, not computed with eps inside the root)
mismatched dims: look-alike: mismatched dims: left alone (mean over dims (-1,) but variance over dims (-2,))
repeated mean of another dim: look-alike: mismatched dims: left alone (x is centered by two different means of it: over dims (-2,) (keepdim=True) and over dims (-1,) (keepdim=True))
scaled before normalizing: look-alike: scaled input: left alone (x is multiplied, before the statistics' scale, by a factor that is no weight of the normalized shape (or whose shape the graph does not record: pass example_inputs))
batch stats: look-alike: RMS-like: left alone (statistics over dims (0,) include the batch dim 0 (BatchNorm-like))
mean used elsewhere: L3 var: left alone (intermediate mean is also used by add_1; the fused op would not produce it)
rstd used elsewhere: R4 no casts: left alone (intermediate rsqrt is also used by output; the fused op would not produce it)""",
        )

    def test_export(self):
        self.assertExpectedInline(
            _summary("export", {**FORMS, **LOOKALIKES}),
            """\
R1 llama: R1 llama upcast -> normpass.rms_norm
R2 t5: R1 llama upcast -> normpass.rms_norm
R3 gemma: R3 gemma 1+w -> normpass.rms_norm
R4 mul: R4 no casts -> normpass.rms_norm
R4 weight first: R4 no casts -> normpass.rms_norm
R4 broadcast weight: R4 no casts -> normpass.rms_norm
R4 sqrt/div: R4 no casts -> normpass.rms_norm
R4 1/sqrt: R4 no casts -> normpass.rms_norm
R4 square/rsqrt method: R4 no casts -> normpass.rms_norm
R4 sum/n: R4 no casts -> normpass.rms_norm
R5 no weight: R5 no weight -> normpass.rms_norm
R5 bias: R5 weight+bias -> normpass.rms_norm
R6 per-head: R1 llama upcast -> normpass.rms_norm; R1 llama upcast -> normpass.rms_norm
L1 two-pass: L1 two-pass -> normpass.layer_norm
L1 repeated mean: L1 two-pass -> normpass.layer_norm
L1 weight first: L1 two-pass -> normpass.layer_norm
L1 broadcast weight and bias: L1 two-pass -> normpass.layer_norm
L2 var_mean: L2 var_mean -> normpass.layer_norm
L3 var: L3 var -> normpass.layer_norm
L3 upcast: L3 var -> normpass.layer_norm
nn.LayerNorm: call:aten.layer_norm -> normpass.layer_norm
nn.LayerNorm no bias: call:aten.layer_norm -> normpass.layer_norm
nn.LayerNorm no affine: call:aten.layer_norm -> normpass.layer_norm
nn.LayerNorm 2 dims: call:aten.layer_norm -> normpass.layer_norm
F.layer_norm: call:aten.layer_norm -> normpass.layer_norm
torch.layer_norm: call:aten.layer_norm -> normpass.layer_norm
nn.RMSNorm: call:aten.rms_norm -> normpass.rms_norm
F.rms_norm: call:aten.rms_norm -> normpass.rms_norm
residual block: R1 llama upcast -> normpass.add_rms_norm; call:aten.layer_norm -> normpass.add_layer_norm
sandwich block: R3 gemma 1+w -> normpass.rms_norm; R3 gemma 1+w -> normpass.rms_norm
aliased residual block: R1 llama upcast -> normpass.add_rms_norm
autocast residual block: R1 llama upcast -> normpass.add_rms_norm
mixed 16-bit residual block: R1 llama upcast -> normpass.rms_norm
autocast residual block, projection first: R1 llama upcast -> normpass.add_rms_norm
float64 residual block: R1 llama upcast -> normpass.rms_norm
expanded residual block: R1 llama upcast -> normpass.add_rms_norm
two norms of one stream: R1 llama upcast -> normpass.add_rms_norm; R4 no casts -> normpass.rms_norm
scaled by its input: R5 no weight -> normpass.add_rms_norm
normalized used elsewhere: R5 no weight -> normpass.rms_norm
L4 channels-first: L4 channels-first: left alone (statistics over dim 1 of an NCHW tensor; normpass ops normalize trailing dims, and a movedim round trip would cost two copies)
unbiased var: look-alike: unbiased var: left alone (unbiased variance (correction=1); LayerNorm divides by n, not n - 1)
annotated transformer: look-alike: eps outside the root: left alone (divides by (std + eps): eps is added outside the root, not inside it, and the std is unbiased (correction=1))
eps outside rms: look-alike: eps outside the root: left alone (divides by (sqrt + eps): eps is added outside the root, not inside it)
F.normalize: look-alike: F.normalize: left alone (divides by max(||x||, eps): the norm is clamped at eps, not computed with eps inside the root)
mismatched dims: look-alike: mismatched dims: left alone (mean over dims (-1,) but variance over dims (-2,))
repeated mean of another dim: look-alike: mismatched dims: left alone (x is centered by two different means of it: over dims (-2,) (keepdim=True) and over dims (-1,) (keepdim=True))
scaled before normalizing: look-alike: scaled input: left alone (x is multiplied, before the statistics' scale, by a factor that is no weight of the normalized shape (or whose shape the graph does not record: pass example_inputs))
batch stats: look-alike: RMS-like: left alone (statistics over dims (0,) include the batch dim 0 (BatchNorm-like))
mean used elsewhere: L3 var: left alone (intermediate mean is also used by add_1; the fused op would not produce it)
rstd used elsewhere: R4 no casts: left alone (intermediate rsqrt is also used by output; the fused op would not produce it)""",
        )


class TestGraphs(TestCase):
    def test_export_all_forms(self):
        self.assertExpectedInline(
            _graphs("export", FORMS),
            """\
# R1 llama
rms_norm_default = normpass.rms_norm(x, p_weight, 1e-06)
return [rms_norm_default]
# R2 t5
rms_norm_default = normpass.rms_norm(x, p_weight, 1e-06)
return [rms_norm_default]
# R3 gemma
rms_norm_default = normpass.rms_norm(x, p_weight, 1e-06, weight_offset=1.0)
return [rms_norm_default]
# R4 mul
rms_norm_default = normpass.rms_norm(x, p_weight, 1e-06)
return [rms_norm_default]
# R4 weight first
rms_norm_default = normpass.rms_norm(x, p_weight, 1e-06)
return [rms_norm_default]
# R4 broadcast weight
reshape_default = aten.reshape(p_weight, [8])
rms_norm_default = normpass.rms_norm(x, reshape_default, 1e-06)
return [rms_norm_default]
# R4 sqrt/div
rms_norm_default = normpass.rms_norm(x, p_weight, 1e-06)
return [rms_norm_default]
# R4 1/sqrt
rms_norm_default = normpass.rms_norm(x, p_weight, 1e-06)
return [rms_norm_default]
# R4 square/rsqrt method
rms_norm_default = normpass.rms_norm(x, p_weight, 1e-06)
return [rms_norm_default]
# R4 sum/n
rms_norm_default = normpass.rms_norm(x, p_weight, 1e-06)
return [rms_norm_default]
# R5 no weight
rms_norm_default = normpass.rms_norm(x, None, 1e-06)
return [rms_norm_default]
# R5 bias
rms_norm_default = normpass.rms_norm(x, p_weight, 1e-06, p_bias)
return [rms_norm_default]
# R6 per-head
unflatten = aten.unflatten(x, -1, [2, 4])
rms_norm_default = normpass.rms_norm(unflatten, p_q_norm_weight, 1e-06)
transpose = aten.transpose(rms_norm_default, 1, 2)
unflatten_1 = aten.unflatten(x, -1, [2, 4])
transpose_1 = aten.transpose(unflatten_1, 1, 2)
rms_norm_default_1 = normpass.rms_norm(transpose_1, p_k_norm_weight, 1e-06)
add_2 = aten.add(transpose, rms_norm_default_1)
return [add_2]
# L1 two-pass
layer_norm_default = normpass.layer_norm(x, p_weight, p_bias, 1e-05)
return [layer_norm_default]
# L1 repeated mean
layer_norm_default = normpass.layer_norm(x, p_weight, p_bias, 1e-05)
return [layer_norm_default]
# L1 weight first
layer_norm_default = normpass.layer_norm(x, p_weight, p_bias, 1e-05)
return [layer_norm_default]
# L1 broadcast weight and bias
reshape_default = aten.reshape(p_weight, [8])
reshape_default_1 = aten.reshape(p_bias, [8])
layer_norm_default = normpass.layer_norm(x, reshape_default, reshape_default_1, 1e-05)
return [layer_norm_default]
# L2 var_mean
layer_norm_default = normpass.layer_norm(x, p_weight, p_bias, 1e-05)
return [layer_norm_default]
# L3 var
layer_norm_default = normpass.layer_norm(x, p_weight, p_bias, 1e-05)
return [layer_norm_default]
# L3 upcast
layer_norm_default = normpass.layer_norm(x, p_weight, p_bias, 1e-05)
return [layer_norm_default]
# nn.LayerNorm
layer_norm_default = normpass.layer_norm(input, p_weight, p_bias, 1e-05)
return [layer_norm_default]
# nn.LayerNorm no bias
layer_norm_default = normpass.layer_norm(input, p_weight, None, 1e-05)
return [layer_norm_default]
# nn.LayerNorm no affine
layer_norm_default = normpass.layer_norm(input, None, None, 1e-05)
return [layer_norm_default]
# nn.LayerNorm 2 dims
layer_norm_default = normpass.layer_norm(input, p_weight, p_bias, 1e-05, normalized_ndim=2)
return [layer_norm_default]
# F.layer_norm
layer_norm_default = normpass.layer_norm(x, p_weight, p_bias, 1e-05)
return [layer_norm_default]
# torch.layer_norm
layer_norm_default = normpass.layer_norm(x, p_weight, p_bias, 1e-05)
return [layer_norm_default]
# nn.RMSNorm
rms_norm_default = normpass.rms_norm(x, p_weight, 1e-06)
return [rms_norm_default]
# F.rms_norm
rms_norm_default = normpass.rms_norm(x, p_weight, 1e-06)
return [rms_norm_default]
# residual block
add_rms_norm_default = normpass.add_rms_norm(x, r, p_norm_weight, 1e-06)
getitem = getitem(add_rms_norm_default, 0)
getitem_1 = getitem(add_rms_norm_default, 1)
tanh = aten.tanh(getitem)
add_layer_norm_default = normpass.add_layer_norm(getitem_1, tanh, p_ln_weight, p_ln_bias, 1e-05)
getitem_2 = getitem(add_layer_norm_default, 0)
getitem_3 = getitem(add_layer_norm_default, 1)
add_3 = aten.add(getitem_2, getitem_3)
return [add_3]
# sandwich block
to = aten.to(x, float32)
rms_norm_default = normpass.rms_norm(x, p_pre_weight, 1e-06, weight_offset=1.0)
linear = aten.linear(rms_norm_default, p_proj_weight, p_proj_bias)
rms_norm_default_1 = normpass.rms_norm(linear, p_post_weight, 1e-06, weight_offset=1.0)
add_4 = aten.add(to, rms_norm_default_1)
return [add_4]
# aliased residual block
add_rms_norm_default = normpass.add_rms_norm(x, r, p_norm_weight, 1e-06)
getitem = getitem(add_rms_norm_default, 0)
getitem_1 = getitem(add_rms_norm_default, 1)
tanh = aten.tanh(getitem)
add_2 = aten.add(getitem_1, tanh)
return [add_2]
# autocast residual block
to = aten.to(x, float32)
to_1 = aten.to(r, bfloat16)
add_rms_norm_default = normpass.add_rms_norm(to, to_1, p_norm_weight, 1e-06)
getitem = getitem(add_rms_norm_default, 0)
getitem_1 = getitem(add_rms_norm_default, 1)
tanh = aten.tanh(getitem)
add_2 = aten.add(getitem_1, tanh)
return [add_2]
# mixed 16-bit residual block
to = aten.to(x, bfloat16)
to_1 = aten.to(r, float16)
add = aten.add(to, to_1)
to_2 = aten.to(add, float32)
rms_norm_default = normpass.rms_norm(add, p_norm_weight, 1e-06)
tanh = aten.tanh(rms_norm_default)
add_2 = aten.add(to_2, tanh)
return [add_2]
# autocast residual block, projection first
to = aten.to(r, float16)
to_1 = aten.to(x, float32)
add_rms_norm_default = normpass.add_rms_norm(to_1, to, p_norm_weight, 1e-06)
getitem = getitem(add_rms_norm_default, 0)
getitem_1 = getitem(add_rms_norm_default, 1)
tanh = aten.tanh(getitem)
add_2 = aten.add(getitem_1, tanh)
return [add_2]
# float64 residual block
to = aten.to(x, float32)
to_1 = aten.to(r, float64)
add = aten.add(to, to_1)
to_2 = aten.to(add, float32)
rms_norm_default = normpass.rms_norm(to_2, p_norm_weight, 1e-06, out_dtype=float64)
tanh = aten.tanh(rms_norm_default)
add_2 = aten.add(add, tanh)
return [add_2]
# expanded residual block
add_rms_norm_default = normpass.add_rms_norm(x, r, p_norm_weight, 1e-06)
getitem = getitem(add_rms_norm_default, 0)
getitem_1 = getitem(add_rms_norm_default, 1)
expand = aten.expand(getitem_1, [2, 2, 3, 8])
sum_1 = aten.sum(expand, [0])
add_2 = aten.add(getitem, sum_1)
return [add_2]
# two norms of one stream
add_rms_norm_default = normpass.add_rms_norm(x, r, p_n1_weight, 1e-06)
getitem = getitem(add_rms_norm_default, 0)
getitem_1 = getitem(add_rms_norm_default, 1)
rms_norm_default = normpass.rms_norm(getitem_1, p_n2_weight, 1e-06)
add_3 = aten.add(getitem, rms_norm_default)
add_4 = aten.add(add_3, getitem_1)
return [add_4]
# scaled by its input
add_rms_norm_default = normpass.add_rms_norm(x, r, None, 1e-06)
getitem = getitem(add_rms_norm_default, 0)
getitem_1 = getitem(add_rms_norm_default, 1)
mul_1 = aten.mul(getitem, getitem_1)
add_2 = aten.add(mul_1, getitem_1)
return [add_2]
# normalized used elsewhere
rms_norm_default = normpass.rms_norm(x, None, 1e-06)
mul_1 = aten.mul(rms_norm_default, p_weight)
return [mul_1, rms_norm_default]""",
        )

    def test_fx_selected(self):
        self.assertExpectedInline(
            _graphs("fx", ["R1 llama", "R3 gemma", "L1 two-pass", "residual block"]),
            """\
# R1 llama
getattr_2 = getattr(x, 'dtype')
promote_types = promote_types(getattr_2, float32)
rms_norm_default = normpass.rms_norm(x, weight, 1e-06, out_dtype=promote_types)
return rms_norm_default
# R3 gemma
rms_norm_default = normpass.rms_norm(x, weight, 1e-06, weight_offset=1.0)
return rms_norm_default
# L1 two-pass
getattr_1 = getattr(x, 'dtype')
promote_types = promote_types(getattr_1, float32)
layer_norm_default = normpass.layer_norm(x, weight, bias, 1e-05, out_dtype=promote_types)
return layer_norm_default
# residual block
add = add(x, r)
getattr_2 = getattr(add, 'dtype')
promote_types = promote_types(getattr_2, float32)
rms_norm_default = normpass.rms_norm(add, norm_weight, 1e-06, out_dtype=promote_types)
tanh = .tanh(rms_norm_default)
add_2 = add(add, tanh)
layer_norm_default = normpass.layer_norm(add_2, ln_weight, ln_bias, 1e-05)
add_3 = add(layer_norm_default, add_2)
return add_3""",
        )

    def test_dynamo_selected(self):
        self.assertExpectedInline(
            _graphs("dynamo", ["R1 llama", "R3 gemma", "L2 var_mean", "residual block"]),
            """\
# R1 llama
rms_norm_default = normpass.rms_norm(l_x_, l_self_parameters_weight_, 1e-06)
return [rms_norm_default]
# R3 gemma
rms_norm_default = normpass.rms_norm(l_x_, l_self_parameters_weight_, 1e-06, weight_offset=1.0)
return [rms_norm_default]
# L2 var_mean
layer_norm_default = normpass.layer_norm(l_x_, l_self_parameters_weight_, l_self_parameters_bias_, 1e-05)
return [layer_norm_default]
# residual block
add_rms_norm_default = normpass.add_rms_norm(l_x_, l_r_, l_self_modules_norm_parameters_weight_, 1e-06)
getitem = getitem(add_rms_norm_default, 0)
getitem_1 = getitem(add_rms_norm_default, 1)
tanh = .tanh(getitem)
add_layer_norm_default = normpass.add_layer_norm(getitem_1, tanh, l_self_modules_ln_parameters_weight_, l_self_modules_ln_parameters_bias_, 1e-05)
getitem_2 = getitem(add_layer_norm_default, 0)
getitem_3 = getitem(add_layer_norm_default, 1)
add_3 = add(getitem_2, getitem_3)
return [add_3]""",
        )

    def test_bf16_llama_keeps_dtypes(self):
        # bf16 activations, bf16 weight: the op's output is bf16 and no out_dtype is needed.
        model, xs = build("R1 llama", torch.bfloat16), inputs("R1 llama", torch.bfloat16)
        rewritten, _ = rewrite_copy(capture(model, xs, "export"))
        self.assertExpectedInline(
            compact(rewritten),
            """\
rms_norm_default = normpass.rms_norm(x, p_weight, 1e-06)
return [rms_norm_default]""",
        )

    def test_gemma_fp32_weight_bf16_input(self):
        # Gemma keeps w in fp32 and computes (h * (1 + w)) in fp32 before the final cast: the op takes the
        # fp32 weight with weight_offset=1 and casts once at the end (its output dtype is x's, bf16).
        model, xs = build("R3 gemma"), inputs("R3 gemma", torch.bfloat16)
        rewritten, _ = rewrite_copy(capture(model, xs, "export"))
        self.assertExpectedInline(
            compact(rewritten),
            """\
rms_norm_default = normpass.rms_norm(x, p_weight, 1e-06, weight_offset=1.0)
return [rms_norm_default]""",
        )
        check_numerics(model, xs, "export")
        check_numerics(model, xs, "dynamo")

    def test_llama_fp32_weight_bf16_input_promotes(self):
        # w (fp32) * h.to(bf16) promotes to fp32: out_dtype=fp32 keeps the original output dtype.
        model, xs = build("R1 llama"), inputs("R1 llama", torch.bfloat16)
        rewritten, _ = rewrite_copy(capture(model, xs, "export"))
        self.assertExpectedInline(
            compact(rewritten),
            """\
rms_norm_default = normpass.rms_norm(x, p_weight, 1e-06, out_dtype=float32)
return [rms_norm_default]""",
        )
        check_numerics(model, xs, "export")


@pytest.mark.parametrize("ir", IRS)
def test_norm_of_an_expanded_input_keeps_the_expanded_shape(ir):
    # Where the graph records shapes the expand is seen through, so the site is left alone with the
    # reason; plain fx keeps the expand and normalizes its output.
    x, y = torch.randn(1, 3, 8), torch.randn(4, 3, 8)
    rep = check_numerics(NormOfExpandedInput(), (x, y), ir)
    if ir != "fx":
        assert not rep.rewritten and "shape" in rep.rows[0].reason, str(rep)


@pytest.mark.parametrize("ir", ["dynamo", "export", "aten"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_rms_norm_default_eps_is_the_accumulation_dtypes(ir, dtype):
    # eps=None: ATen uses fp32's machine epsilon for 16-bit inputs, not theirs (which rows this small
    # would feel); plain fx records no dtype and leaves the call alone.
    x = (0.01 * torch.randn(2, 3, 8)).to(dtype)
    rep = check_numerics(RmsNormDefaultEps(), (x,), ir)
    assert len(rep.rewritten) == 1, str(rep)


@pytest.mark.parametrize("ir", IRS)
def test_layer_with_a_hook_keeps_it(ir):
    # symbolic_trace keeps the module call, hook and all: the call is left alone, with the reason.
    # Dynamo and export trace the hook into the graph, so the norm itself is rewritten.
    rep = check_numerics(HookedLayerNorm(), inputs("R1 llama"), ir)
    if ir == "fx":
        reason = "the layer may compute more than its norm: it has hooks registered on it"
        assert [(r.rewritten, r.reason) for r in rep.rows] == [(False, reason)], str(rep)
    else:
        assert len(rep.rewritten) == 1, str(rep)


@pytest.mark.parametrize("ir", IRS)
def test_floored_division_is_no_norm(ir):
    rep = check_numerics(FlooredRms(), (3 * torch.randn(2, 3, 8),), ir)
    assert not rep.rewritten, str(rep)
    rep = check_numerics(
        RoundingNoneRms(), (3 * torch.randn(2, 3, 8),), ir
    )  # rounding_mode=None: true division
    assert len(rep.rewritten) == 1, str(rep)


def test_layer_with_a_replaced_forward_or_a_global_hook_keeps_it():
    # The module call in a symbolic_trace graph runs whatever wraps the layer's forward.
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    # as accelerate's device hooks do (a method, so that the float64 copy calls its own layer)
    model[1].forward = types.MethodType(lambda self, x: nn.LayerNorm.forward(self, x) * 2.0, model[1])
    rep = check_numerics(model, inputs("R1 llama"), "fx")
    assert [r.reason for r in rep.rows] == [
        "the layer may compute more than its norm: its forward is replaced on the instance"
    ]

    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: out + 1.0)
    try:
        rep = check_numerics(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)), inputs("R1 llama"), "fx")
    finally:
        handle.remove()
    assert len(rep.rows) == 1 and "global module hooks are registered" in rep.rows[0].reason, str(rep)


def test_input_updated_in_place_inside_the_norm():
    # Export's ATen graph is functional (the update is a new tensor): there the rewrite is correct.
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8)
    rows = []
    with torch.no_grad():
        for model in (InputUpdatedInPlace(), InputReluInPlace(), MeanWrittenOut()):
            want = model(x)
            for ir in IRS:
                fn, _, rep = rewritten_fn(model, (x,), ir)
                got = fn(x)
                for g, w in zip(got, want, strict=True):
                    torch.testing.assert_close(g, w)
                why = "; ".join(r.op or f"left alone ({r.reason})" for r in rep.rows) or "no site"
                rows.append(f"{type(model).__name__}, {ir}: {why}")
    TestCase().assertExpectedInline(
        "\n".join(rows),
        """\
InputUpdatedInPlace, fx: left alone (add_ writes a tensor in place inside the norm; the fused op would read it after)
InputUpdatedInPlace, dynamo: left alone (add_ writes a tensor in place inside the norm; the fused op would read it after)
InputUpdatedInPlace, export: left alone (add_ writes a tensor in place inside the norm; the fused op would read it after)
InputUpdatedInPlace, aten: normpass.rms_norm
InputReluInPlace, fx: left alone (relu writes a tensor in place inside the norm; the fused op would read it after)
InputReluInPlace, dynamo: left alone (relu writes a tensor in place inside the norm; the fused op would read it after)
InputReluInPlace, export: left alone (relu_ writes a tensor in place inside the norm; the fused op would read it after)
InputReluInPlace, aten: normpass.rms_norm
MeanWrittenOut, fx: no site
MeanWrittenOut, dynamo: no site
MeanWrittenOut, export: no site
MeanWrittenOut, aten: left alone (intermediate mean is also used by output; the fused op would not produce it)""",
    )


class _WeightDifferenceFirst(torch.nn.Module):
    """(w - b) * (x - u) / sqrt(var + eps): of the product's two differences, x - u is centered."""

    def __init__(self):
        super().__init__()
        self.w, self.b = (torch.nn.Parameter(torch.randn(8)) for _ in range(2))

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        return (self.w - self.b) * (x - u) / torch.sqrt(s + 1e-5)


def test_centered_factor_found_beside_another_difference():
    torch.manual_seed(0)
    model, x = _WeightDifferenceFirst(), torch.randn(2, 3, 8)
    for ir in IRS:
        kw = {"example_inputs": (x,)} if ir == "fx" else {}  # the shape of w - b, for plain fx
        fn, _, rep = rewritten_fn(model, (x,), ir, **kw)
        assert [r.op for r in rep.rows] == ["normpass.layer_norm"], (ir, str(rep))
        torch.testing.assert_close(fn(x), model(x))
