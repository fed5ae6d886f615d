# ruff: noqa: E501  (expecttest strings hold whole report lines)
"""torch.compile(backend="normpass"): options, the inner compilers, and real models trained through it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import Counter

import pytest
import tiny_models as models
import torch
from devices import needs_cuda
from expecttest import assert_expected_inline
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import normpass
from normpass.backend import BackendOptions

FORWARD_OPS = {"rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm"}
# Under autograd the forward ops run as norm_with_stats, which also returns each row's (mean, rstd).
TRAINING_FORWARD_OPS = {f"norm_with_stats:{op}" for op in FORWARD_OPS}
BACKWARD_OPS = {"rms_norm_backward", "layer_norm_backward"}


def op_name(n: torch.fx.Node) -> str:
    """The op's name; for norm_with_stats, with the forward op it stands for."""
    name = n.target._opname
    if name == "norm_with_stats":
        residual = n.args[1] is not None
        name += f":{'add_' if residual else ''}{'layer' if n.kwargs['center'] else 'rms'}_norm"
    return name


def normpass_ops(gm: torch.fx.GraphModule) -> list[str]:
    return [
        op_name(n)
        for n in gm.graph.nodes
        if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "normpass"
    ]


class Recorder:
    """Inner compiler: AOT autograd that keeps the forward/backward/inference graphs (no inductor)."""

    def __init__(self) -> None:
        self.graphs: dict[str, list[torch.fx.GraphModule]] = {"forward": [], "backward": [], "inference": []}

    def _keep(self, kind):
        def compiler(gm, example_inputs):
            self.graphs[kind].append(gm)
            return make_boxed_func(gm.forward)

        return compiler

    def __call__(self, gm, example_inputs):
        kinds = {"fw_compiler": "forward", "bw_compiler": "backward", "inference_compiler": "inference"}
        return aot_autograd(**{k: self._keep(v) for k, v in kinds.items()})(gm, example_inputs)

    def count(self, kind: str, names: set[str]) -> int:
        return sum(op in names for gm in self.graphs[kind] for op in normpass_ops(gm))

    def backward_ops_reading_stats(self) -> int:
        """Backward op calls handed the forward's statistics (their `stats` argument)."""
        return sum(
            n.target._opname in BACKWARD_OPS and len(n.args) > 6 and n.args[6] is not None
            for gm in self.graphs["backward"]
            for n in gm.graph.nodes
            if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "normpass"
        )


def rel_err(a: torch.Tensor, ref: torch.Tensor, floor: float = 1e-30) -> float:
    return ((a.double() - ref).norm() / ref.norm().clamp_min(floor)).item()


def grad_floor(ref_grads: dict[str, torch.Tensor]) -> float:
    """Scale under which a gradient is rounding noise (e.g. a key bias under softmax, zero in exact math)."""
    return 1e-4 * torch.cat([g.flatten() for g in ref_grads.values()]).norm().item()


def assert_no_further_than_eager(ours, eager, ref, margin: float = 1e-5, scale: float = 1.0) -> None:
    """ours, eager, ref: (loss, grads) of normpass, of eager in the same dtype, and of float64. The loss
    and every gradient are no further from float64 than eager's, times scale, plus margin."""
    (loss, grads), (eager_loss, eager_grads), (ref_loss, ref_grads) = ours, eager, ref
    assert rel_err(loss, ref_loss) <= scale * rel_err(eager_loss, ref_loss) + margin
    assert grads.keys() == eager_grads.keys()
    floor = grad_floor(ref_grads)
    for key, r in ref_grads.items():
        assert rel_err(grads[key], r, floor) <= scale * rel_err(eager_grads[key], r, floor) + margin, key


def float64_loss_and_grads(name: str, batch: dict[str, torch.Tensor]):
    """loss_and_grads of the same model (same seed) built in float64, on the batch's device: the
    reference."""
    device = next(iter(batch.values())).device
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    return loss_and_grads(models.build(name, dtype=torch.float64).to(device), batch)


def loss_and_grads(model, batch, run=None):
    """Loss and parameter grads of `run` (default: the model itself; or its compiled wrapper)."""
    model.zero_grad(set_to_none=True)
    loss = (model if run is None else run)(**batch).loss
    loss.backward()
    return loss.detach(), {
        n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---- options ------------------------------------------------------------------------------------------


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['polcy'\]; valid options are \['policy'"):
        normpass.backend(polcy="fuse")
    with pytest.raises(Exception, match="unknown policy 'fast'"):
        torch.compile(torch.nn.LayerNorm(8), backend="normpass", options={"policy": "fast"})(
            torch.randn(2, 8)
        )
    # a bad p is refused when the backend is made, not at its first compile
    with pytest.raises(ValueError, match=r"normpass backend: p must be in \(0, 1\], got 2"):
        normpass.backend(policy="prmsnorm", p=2)


def test_options_merge_over_configured_backend():
    base = BackendOptions.from_dict({"policy": "prmsnorm", "compiler": "eager"})
    merged = BackendOptions.from_dict({"p": 0.25}, base=base)
    assert (merged.policy, merged.compiler, merged.p) == ("prmsnorm", "eager", 0.25)
    with pytest.raises(ValueError, match="p is the partial fraction of policy 'prmsnorm'; policy 'rmsnorm'"):
        BackendOptions.from_dict({"policy": "rmsnorm"}, base=merged)
    with pytest.raises(ValueError, match="inductor_options need compiler='inductor'"):
        BackendOptions.from_dict({"compiler": "eager", "inductor_options": {"max_autotune": True}})


def test_mode_is_for_inductor_only():
    be = normpass.backend(compiler="eager")
    with pytest.raises(Exception, match="mode='max-autotune' is an inductor setting"):
        torch.compile(torch.nn.LayerNorm(8), backend=be, mode="max-autotune")(torch.randn(2, 8))


@pytest.mark.parametrize(
    "mode, setting",
    [
        ("max-autotune", "max_autotune"),
        ("max-autotune-no-cudagraphs", "max_autotune"),
        ("reduce-overhead", "triton.cudagraphs"),
    ],
)
def test_mode_reaches_inductor(monkeypatch, mode, setting):
    seen = {}

    def fake_compile_fx(gm, example_inputs, config_patches):
        seen.update(config_patches)
        return gm.forward

    from torch._inductor import list_mode_options

    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", fake_compile_fx)
    be = normpass.backend(inductor_options={"fallback_random": True})
    torch.compile(torch.nn.LayerNorm(8), backend=be, mode=mode)(torch.randn(2, 8))
    assert seen[setting] is True and seen["fallback_random"] is True
    assert list_mode_options(mode).items() <= seen.items()


def test_policy_and_p_reach_the_rewrite():
    """options= on torch.compile set the policy and p: LayerNorm becomes (partial) RMSNorm."""
    torch.manual_seed(0)
    ln = torch.nn.LayerNorm(16)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(16))
        ln.bias.copy_(torch.randn(16))
    x = torch.randn(4, 16)
    h = x.double()
    reports = []
    for options, k in (({"policy": "rmsnorm"}, 16), ({"policy": "prmsnorm", "p": 0.25}, 4)):
        torch._dynamo.reset()
        be = normpass.backend(compiler="eager")
        with torch.no_grad():
            y = torch.compile(ln, backend=be, options=options)(x)
        rms = h[:, :k].pow(2).mean(-1, keepdim=True)
        expected = h * torch.rsqrt(rms + ln.eps) * ln.weight.double() + ln.bias.double()
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
        reports.append(str(be.reports[0]))
    assert_expected_inline(
        "\n".join(reports),
        """\
normpass report (policy=rmsnorm): 1 site(s), 1 rewritten, 0 left alone
where   form               decision                        reason
<root>  call:F.layer_norm  rewritten -> normpass.rms_norm  policy rmsnorm: LayerNorm -> RMSNorm (no mean-centering; same weight and bias)
normpass report (policy=prmsnorm): 1 site(s), 1 rewritten, 0 left alone
where   form               decision                        reason
<root>  call:F.layer_norm  rewritten -> normpass.rms_norm  policy prmsnorm: LayerNorm -> partial RMSNorm (p=0.25)""",
    )


def test_backend_name_works_without_importing_normpass():
    """The entry point: the name alone finds the backend, which rewrites (its report is logged) and
    runs behind eager or, by default, inductor."""
    code = textwrap.dedent(
        """
        import logging, sys, torch
        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("normpass").setLevel(logging.INFO)
        ln = torch.nn.LayerNorm(16)
        x = torch.randn(4, 16)
        y = torch.compile(ln, backend="normpass", options={"compiler": "eager"})(x)
        torch.testing.assert_close(y, ln(x))
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(ln, backend="normpass")(x), ln(x))
        assert "normpass" in sys.modules
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
    assert out.stderr.count("rewritten -> normpass.layer_norm") == 2, out.stderr


# ---- real models: training through the backend ---------------------------------------------------------


@pytest.mark.parametrize("name", list(models.CONFIGS))
def test_training_matches_eager_and_fuses_every_norm(name):
    model = models.build(name)
    batch = models.example_batch(name)
    ref = float64_loss_and_grads(name, batch)
    eager = loss_and_grads(model, batch)

    recorder = Recorder()
    compiled = torch.compile(model, backend=normpass.backend(compiler=recorder))
    ours = loss_and_grads(model, batch, compiled)

    norms = models.count_norm_modules(model)
    assert recorder.count("forward", TRAINING_FORWARD_OPS) == norms
    assert recorder.count("forward", FORWARD_OPS) == 0
    assert recorder.count("backward", BACKWARD_OPS) == norms
    assert recorder.backward_ops_reading_stats() == norms
    assert_no_further_than_eager(ours, eager, ref)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_frozen_norm_weights_are_not_differentiated(name):
    """BitFit-style fine-tuning (norm weights frozen, biases trained): the traced backward asks the
    backward ops for no dweight, and the gradients that remain match eager's."""
    model = models.build(name)
    for module in model.modules():
        if "Norm" in type(module).__name__:
            module.weight.requires_grad_(False)
    batch = models.example_batch(name)
    eager = loss_and_grads(model, batch)
    recorder = Recorder()
    ours = loss_and_grads(model, batch, torch.compile(model, backend=normpass.backend(compiler=recorder)))
    asked = [
        (n.kwargs.get("weight_grad", True), n.kwargs["has_bias"])
        for gm in recorder.graphs["backward"]
        for n in gm.graph.nodes
        if isinstance(n.target, torch._ops.OpOverload) and n.target._opname in BACKWARD_OPS
    ]
    has_bias = name == "gpt2"  # LayerNorm with bias; Llama's RMSNorm has none
    assert asked == [(False, has_bias)] * models.count_norm_modules(model)
    assert ours[1].keys() == eager[1].keys()
    for key, grad in eager[1].items():
        torch.testing.assert_close(ours[1][key], grad, rtol=1e-4, atol=1e-5)


# llama: the gradient-sum test; mamba: inductor compiles its selective scan for 45 s on CPU (its norm
# is the Llama form, which the other models cover here)
@pytest.mark.parametrize("name", [n for n in models.CONFIGS if n not in ("llama", "mamba")])
def test_training_through_inductor_fuses_every_norm(name):
    """The same through inductor: its generated code calls one forward and one backward op per norm."""
    import re

    from torch._inductor.utils import run_and_get_code

    model, batch = models.build(name), models.example_batch(name)
    ref = float64_loss_and_grads(name, batch)
    eager = loss_and_grads(model, batch)
    compiled = torch.compile(model, backend=normpass.backend())
    ours, codes = run_and_get_code(lambda: loss_and_grads(model, batch, compiled))
    code = "\n".join(codes)
    norms = models.count_norm_modules(model)
    assert len(re.findall(r"normpass\.norm_with_stats\.default\(", code)) == norms
    assert len(re.findall(r"normpass\.(?:rms|layer)_norm_backward\.default\(", code)) == norms
    assert_no_further_than_eager(ours, eager, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_training_matches_eager(dtype):
    model = models.build("llama")
    batch = models.example_batch("llama")
    ref_loss, ref_grads = float64_loss_and_grads("llama", batch)
    with torch.autocast("cpu", dtype=dtype):
        eager_loss, eager_grads = loss_and_grads(model, batch)
        recorder = Recorder()
        compiled = torch.compile(model, backend=normpass.backend(compiler=recorder))
        np_loss, np_grads = loss_and_grads(model, batch, compiled)
    norms = models.count_norm_modules(model)
    assert recorder.count("forward", TRAINING_FORWARD_OPS) == norms
    assert recorder.count("backward", BACKWARD_OPS) == norms
    # The residual stream is fp32 and each projection 16-bit: every norm after the first takes its
    # residual add, as without autocast.
    assert recorder.count("forward", {"norm_with_stats:add_rms_norm"}) == norms - 1
    assert np_loss.dtype == eager_loss.dtype
    assert {k: g.dtype for k, g in np_grads.items()} == {k: g.dtype for k, g in eager_grads.items()}
    assert_no_further_than_eager(
        (np_loss, np_grads), (eager_loss, eager_grads), (ref_loss, ref_grads), margin=1e-3, scale=1.5
    )


# aten ops that copy data or change a layout: the rewrite may remove some (a norm's own casts), never add.
COPY_OPS = {"clone", "_to_copy", "copy", "copy_", "permute", "transpose", "t", "as_strided"}


def copy_ops(graphs: list[torch.fx.GraphModule]) -> Counter:
    return Counter(
        n.target._opname
        for gm in graphs
        for n in gm.graph.nodes
        if isinstance(n.target, torch._ops.OpOverload)
        and n.target.namespace == "aten"
        and n.target._opname in COPY_OPS
    )


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_no_copies_or_layout_changes_around_the_ops(name, autocast):
    """The training graphs AOT autograd derives hold no copy or layout op the model's own lacks."""
    model, batch = models.build(name), models.example_batch(name)
    plain, rewritten = Recorder(), Recorder()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss_and_grads(model, batch, torch.compile(model, backend=plain))
        torch._dynamo.reset()
        loss_and_grads(model, batch, torch.compile(model, backend=normpass.backend(compiler=rewritten)))
    assert rewritten.count("backward", BACKWARD_OPS) == models.count_norm_modules(model)
    for kind in ("forward", "backward"):
        before, after = copy_ops(plain.graphs[kind]), copy_ops(rewritten.graphs[kind])
        assert all(after[op] <= before[op] for op in after), (kind, dict(before), dict(after))


def test_no_grad_inference_uses_forward_ops_only():
    model = models.build("gpt2")
    batch = models.example_batch("gpt2")
    recorder = Recorder()
    with torch.no_grad():
        expected = model(**batch).logits
        got = torch.compile(model, backend=normpass.backend(compiler=recorder))(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert recorder.count("inference", FORWARD_OPS) == models.count_norm_modules(model)
    assert recorder.count("inference", BACKWARD_OPS) == 0


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_greedy_generation_with_kv_cache_matches_eager(name):
    """generate() through a compiled forward: the prompt, then one token per row against the cache."""
    model = models.build(name)
    prompt = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    kw = dict(
        max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True
    )
    with torch.no_grad():
        expected = model.generate(prompt, **kw)
        be = normpass.backend(compiler="eager")
        model.forward = torch.compile(model.forward, backend=be, dynamic=True)
        got = model.generate(prompt, **kw)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=1e-4, atol=1e-4)
    assert be.reports and all(
        len(r.rewritten) == len(r) == models.count_norm_modules(model) for r in be.reports
    )


@pytest.mark.parametrize("how", ["dynamic=True", "mark_dynamic"])
def test_dynamic_sequence_length_compiles_once(how):
    model = models.build("llama")
    be = normpass.backend(compiler="eager")
    compiled = torch.compile(model, backend=be, dynamic=True if how == "dynamic=True" else None)
    for seq in (8, 12, 16):
        ids = torch.randint(0, 128, (2, seq))
        if how == "mark_dynamic":
            torch._dynamo.mark_dynamic(ids, 1)
        with torch.no_grad():
            torch.testing.assert_close(
                compiled(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4
            )
    assert len(be.reports) == 1


def test_dynamic_fullgraph_training_through_inductor_compiles_once():
    """dynamic=True, fullgraph=True training behind inductor: the first call compiles (Dynamo may
    restart that analysis once, as it does for inductor alone), later sequence lengths reuse it, and
    the gradients match eager."""
    model = models.build("llama")
    be = normpass.backend()
    compiled = torch.compile(model, backend=be, dynamic=True, fullgraph=True)
    compiles = []
    for seq in (8, 12, 16):
        batch = models.example_batch("llama", seq=seq)
        ref = float64_loss_and_grads("llama", batch)
        eager = loss_and_grads(model, batch)
        ours = loss_and_grads(model, batch, compiled)
        compiles.append(len(be.reports))
        norms = models.count_norm_modules(model)
        assert f"{norms} site(s), {norms} rewritten, 0 left alone" in str(be.reports[-1])
        assert_no_further_than_eager(ours, eager, ref)
    assert compiles[0] >= 1 and compiles[1:] == [compiles[0]] * 2, compiles


def test_activation_checkpointed_blocks_are_rewritten():
    """torch.utils.checkpoint regions reach the backend as higher-order-op subgraphs: their norms
    are rewritten there (and recomputed by the fused op in the backward), with eager's gradients.
    (transformers' own gradient checkpointing graph-breaks in Dynamo before normpass sees it: a
    logging call and a context-variable write inside the checkpointed function.)"""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.proj = torch.nn.RMSNorm(32, eps=1e-6), torch.nn.Linear(32, 32)

        def forward(self, x):
            return x + self.proj(self.norm(x))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(Block() for _ in range(2))

        def forward(self, x):
            for block in self.blocks:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            return x

    torch.manual_seed(0)
    model, x = Model(), torch.randn(3, 5, 32, requires_grad=True)
    recorder = Recorder()
    be = normpass.backend(compiler=recorder)
    got = torch.compile(model, backend=be, fullgraph=True)(x)
    expected = model(x)
    grads = torch.autograd.grad(got.square().sum(), (x, *model.parameters()))
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, *model.parameters()))
    assert len(be.reports) == 1 and len(be.reports[0].rewritten) == 2, str(be.reports[0])
    torch.testing.assert_close(got, expected)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)
    assert recorder.count("backward", BACKWARD_OPS) == 2


@needs_cuda
def test_reduce_overhead_training_on_cuda():
    """mode="reduce-overhead" (inductor's CUDA graphs) around normpass's CUDA ops: the replayed
    training step of a tiny Llama matches eager against float64."""
    from torch._dynamo.utils import counters

    model = models.build("llama").cuda()
    batch = {k: v.cuda() for k, v in models.example_batch("llama").items()}
    ref = float64_loss_and_grads("llama", batch)
    eager = loss_and_grads(model, batch)
    counters.clear()
    be = normpass.backend()
    compiled = torch.compile(model, backend=be, mode="reduce-overhead")
    for _ in range(3):  # warm-up, recording, replay
        torch.compiler.cudagraph_mark_step_begin()
        np_loss, np_grads = loss_and_grads(model, batch, compiled)
        np_loss = np_loss.clone()
    norms = models.count_norm_modules(model)
    assert f"{norms} site(s), {norms} rewritten" in str(be.reports[-1])
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert_no_further_than_eager((np_loss, np_grads), eager, ref)


class TwoBlocks(torch.nn.Module):
    def __init__(self, n: int = 16) -> None:
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(n), torch.nn.RMSNorm(n, eps=1e-6)
        self.proj = torch.nn.Linear(n, n)

    def forward(self, x, graph_break: bool = False):
        h = self.ln1(x)
        if graph_break:
            torch._dynamo.graph_break()
        return self.ln2(self.proj(h) + x)


def test_graph_breaks_rewrite_every_graph():
    module, x = TwoBlocks(), torch.randn(3, 16, requires_grad=True)
    recorder = Recorder()
    y = torch.compile(module, backend=normpass.backend(compiler=recorder))(x, graph_break=True)
    torch.testing.assert_close(y, module(x, graph_break=True))
    assert len(recorder.graphs["forward"]) == 2
    # The second graph's residual add goes into the norm.
    assert [normpass_ops(gm) for gm in recorder.graphs["forward"]] == [
        ["norm_with_stats:layer_norm"],
        ["norm_with_stats:add_rms_norm"],
    ]


def test_fullgraph_with_inductor_and_cache_hit(tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    module, x = TwoBlocks(), torch.randn(3, 16, requires_grad=True)
    expected = module(x)

    for _ in range(2):
        torch._dynamo.reset()
        counters.clear()
        be = normpass.backend()
        y = torch.compile(module, backend=be, fullgraph=True)(x)
        torch.testing.assert_close(y, expected)
        y.sum().backward()
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1, dict(counters["inductor"])


def test_inductor_folds_gradient_sums_into_the_backward_ops():
    """Llama's norms feed q/k/v and gate/up: their gradient sums go into the backward ops (no add
    kernels), and training still matches eager against float64."""
    import re

    from torch._inductor.utils import run_and_get_code

    model, batch = models.build("llama"), models.example_batch("llama")
    ref = float64_loss_and_grads("llama", batch)
    eager = loss_and_grads(model, batch)
    compiled = torch.compile(model, backend=normpass.backend())
    ours, codes = run_and_get_code(lambda: loss_and_grads(model, batch, compiled))

    pattern = r".*normpass\.rms_norm_backward\.default\(.*"
    calls = [line for code in codes for line in re.findall(pattern, code)]
    with_terms = [c for c in calls if re.search(r"1e-0\d, \[", c)]
    layers = model.config.num_hidden_layers
    assert len(calls) == 2 * layers + 1  # two norms per layer and the final one
    assert len(with_terms) == 2 * layers  # all but the final norm (read by lm_head alone)
    assert_no_further_than_eager(ours, eager, ref)


def test_inductor_leaves_the_residual_add_to_the_op():
    """Behind inductor, norm(proj(x) + x) is addmm, then normpass.add_rms_norm on its output and x:
    inductor generates no kernel of its own for the add (alone it fuses add and norm into one)."""
    from torch._inductor.utils import run_and_get_code

    class Block(torch.nn.Module):
        def __init__(self, n: int = 16) -> None:
            super().__init__()
            self.norm, self.proj = torch.nn.RMSNorm(n, eps=1e-6), torch.nn.Linear(n, n)

        def forward(self, x):
            return self.norm(self.proj(x) + x)

    module, x = Block(), torch.randn(2, 3, 16)
    with torch.no_grad():
        y, codes = run_and_get_code(lambda: torch.compile(module, backend=normpass.backend())(x))
        torch.testing.assert_close(y, module(x))
    code = "\n".join(codes)
    assert code.count("normpass.add_rms_norm.default(") == 1, code
    assert "async_compile.cpp" not in code and "async_compile.triton" not in code, code


def test_gradient_sum_pass_chains_a_users_post_grad_pass():
    """inductor's post-grad custom pass slot holds one pass: a user's still runs after normpass's."""
    from torch._inductor.custom_graph_pass import CustomGraphPass
    from torch._inductor.utils import run_and_get_code

    class Counting(CustomGraphPass):
        calls = 0

        def __call__(self, graph):
            Counting.calls += 1

        def uuid(self):
            return "counting-pass"

    class TwoReaders(torch.nn.Module):  # the norm's output feeds two projections
        def __init__(self, n: int = 16) -> None:
            super().__init__()
            self.norm, self.a, self.b = (
                torch.nn.RMSNorm(n, eps=1e-6),
                torch.nn.Linear(n, n),
                torch.nn.Linear(n, n),
            )

        def forward(self, x):
            h = self.norm(x)
            return self.a(h) * self.b(h)

    # 3-D, as in a transformer: 2-D mm + add would become one addmm before this pass sees it.
    module, x = TwoReaders(), torch.randn(2, 3, 16, requires_grad=True)
    expected = torch.autograd.grad(module(x).sum(), x)[0]
    # No FX graph cache: a cache hit skips every pass (correctly), and this test counts them.
    options = {"post_grad_custom_post_pass": Counting(), "fx_graph_cache": False}
    be = normpass.backend(inductor_options=options)
    compiled = torch.compile(module, backend=be)
    grad, codes = run_and_get_code(lambda: torch.autograd.grad(compiled(x).sum(), x)[0])
    torch.testing.assert_close(grad, expected)
    assert Counting.calls == 2  # forward and backward graphs
    backward_calls = [
        line for code in codes for line in code.splitlines() if "rms_norm_backward.default(" in line
    ]
    assert len(backward_calls) == 1 and "[" in backward_calls[0].split("1e-06", 1)[1], backward_calls
