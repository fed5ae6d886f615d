"""The end-to-end benchmark's "sdpa-causal" attention computes what transformers' own SDPA does.

It hands SDPA no mask (is_causal=True) when there is no padding, also under Dynamo, where plain
"sdpa" builds an explicit mask on older torch/transformers. A wrong shortcut would make the
benchmark time a different model, so its logits are checked against plain "sdpa".
"""

import pathlib
import sys

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_e2e  # noqa: E402


def logits(name: str, attention: str, ids, mask=None, compiled: bool = False):
    model = bench_e2e.build(name, tiny=True, device="cpu", dtype=torch.float32, attention=attention)
    fn = torch.compile(model, backend="eager") if compiled else model
    with torch.no_grad():
        return fn(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "dynamo"])
def test_sdpa_causal_matches_sdpa(name, compiled):
    torch._dynamo.reset()
    ids = torch.randint(0, 256, (2, 16))
    expected = logits(name, "sdpa", ids)
    torch.testing.assert_close(logits(name, "sdpa-causal", ids, compiled=compiled), expected)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_sdpa_causal_hands_sdpa_no_mask_under_dynamo(name):
    """What the option is for: Dynamo's graph calls SDPA with is_causal=True and no mask tensor."""
    calls = []

    def backend(gm, example_inputs):
        for node in gm.graph.find_nodes(op="call_function", target=torch._C._nn.scaled_dot_product_attention):
            mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
            calls.append((mask, node.kwargs.get("is_causal")))
        return gm

    torch._dynamo.reset()
    model = bench_e2e.build(name, tiny=True, device="cpu", dtype=torch.float32, attention="sdpa-causal")
    torch.compile(model, backend=backend)(input_ids=torch.randint(0, 256, (2, 16)))
    assert calls == [(None, True)] * model.config.num_hidden_layers


def test_sdpa_causal_keeps_padding_masks():
    ids = torch.randint(0, 256, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :5] = 0  # left padding: the mask is needed, so the shortcut must not apply
    expected = logits("llama", "sdpa", ids, mask)
    torch.testing.assert_close(logits("llama", "sdpa-causal", ids, mask), expected)
    assert not torch.allclose(logits("llama", "sdpa-causal", ids), expected)


def test_unknown_attention_is_an_error():
    with pytest.raises(ValueError, match="attention must be one of"):
        bench_e2e.build("llama", tiny=True, device="cpu", dtype=torch.float32, attention="flash")


def test_interleaved_variants_each_run_their_own_compiled_step():
    """The timed rounds call every variant once per round; each variant's calls reach its own backend's
    compiled graph (Dynamo keeps one cache entry per backend), and a failing variant is dropped."""
    calls = {"a": 0, "b": 0}

    def counting(name):
        def backend(gm, example_inputs):
            def run(*args):
                calls[name] += 1
                return gm.forward(*args)

            return run

        return backend

    def failing(gm, example_inputs):
        raise RuntimeError("boom")

    torch._dynamo.reset()
    model = bench_e2e.build("llama", tiny=True, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 16))
    backends = {"eager": None, "a": counting("a"), "broken": failing, "b": counting("b")}
    results = bench_e2e.run_variants(model, backends, ids, "cpu", steps=2, warmup=1)
    assert list(results) == ["eager", "a", "b"]
    assert calls["a"] == calls["b"] > 0 and calls["a"] % 4 == 0  # first call, warm-up, two rounds
