"""normpass.post_grad: the backend's inductor post-grad passes, on a real model under autocast."""

from __future__ import annotations

import pytest
import tiny_models as models
import torch
from devices import DEVICES
from torch._inductor.custom_graph_pass import CustomGraphPass

import normpass
from normpass import grad_sums, post_grad
from normpass.post_grad import PostGradPasses


class Keyed(CustomGraphPass):
    """A chained user pass: records the post-grad graphs it sees."""

    def __init__(self, key=None):
        self.key = key
        self.graphs: list[torch.fx.Graph] = []

    def __call__(self, graph):
        self.graphs.append(graph)

    def uuid(self):
        return self.key


def test_cache_key_follows_the_chained_pass():
    """The compile cache keys on PostGradPasses.uuid(): it changes with the user's chained pass, and a
    chained pass without a key of its own turns the cache off (None), as it would alone."""
    alone = PostGradPasses(None).uuid()
    a, b = PostGradPasses(Keyed("a")).uuid(), PostGradPasses(Keyed("b")).uuid()
    assert alone is not None and alone == PostGradPasses(None).uuid()
    assert a == PostGradPasses(Keyed("a")).uuid()
    assert len({alone, a, b}) == 3
    assert PostGradPasses(Keyed(None)).uuid() is None
    assert PostGradPasses(lambda graph: None).uuid() is None


def amp_llama_step(monkeypatch, passes, device="cpu"):
    """Loss, parameter grads and the post-grad graphs of a tiny Llama step under bf16 autocast (fp32
    weights) through the backend with inductor, running only `passes`."""
    monkeypatch.setattr(post_grad, "_PASSES", passes)
    torch._dynamo.reset()
    model = models.build("llama").to(device)
    batch = {k: v.to(device) for k, v in models.example_batch("llama").items()}
    seen = Keyed(repr(passes))  # a cache key of its own per set of passes
    backend = normpass.backend(inductor_options={"post_grad_custom_post_pass": seen, "fx_graph_cache": False})
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = torch.compile(model, backend=backend)(**batch).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return loss, grads, seen.graphs, models.count_norm_modules(model)


def io_dtypes(graphs):
    """Each forward op's out_dtype and each backward op's grad_out dtype."""
    nodes = [n for g in graphs for n in g.nodes if n.op == "call_function"]
    with_stats = torch.ops.normpass.norm_with_stats.default
    forward = [n.kwargs.get("out_dtype") for n in nodes if n.target is with_stats]
    backward = [n.args[0].meta["val"].dtype for n in nodes if n.target in grad_sums.BACKWARD_OPS]
    return forward, backward


@pytest.mark.parametrize("device", DEVICES)
def test_amp_llama_norms_take_their_casts_with_the_same_bits(monkeypatch, device):
    """Under autocast a Llama's norms are fp32 (its residual stream is): their bf16 casts go into the
    ops (on CUDA, kernels that write and read 16 bits), and the loss and every gradient keep their
    bits."""
    loss, grads, graphs, norms = amp_llama_step(monkeypatch, post_grad._PASSES, device)
    ref_loss, ref_grads, ref_graphs, _ = amp_llama_step(monkeypatch, (grad_sums.fold_grad_sums,), device)
    assert io_dtypes(graphs) == ([torch.bfloat16] * norms, [torch.bfloat16] * norms)
    assert io_dtypes(ref_graphs) == ([None] * norms, [torch.float32] * norms)
    assert torch.equal(loss, ref_loss)
    for name, grad in ref_grads.items():
        assert torch.equal(grads[name], grad), name
