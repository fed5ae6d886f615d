"""The end-to-end benchmark's "sdpa-causal" attention computes what transformers' own SDPA does.

It hands SDPA no mask (is_causal=True) when there is no padding, also under Dynamo, where plain
"sdpa" builds an explicit mask on older torch/transformers. A wrong shortcut would make the
benchmark time a different model, so its logits are checked against plain "sdpa".
"""

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
bench_e2e = pytest.importorskip("bench_e2e")


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
