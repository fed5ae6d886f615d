"""Tiny transformers models (random weights, built from configs): every norm module is one rewritten site.

torch.export (non-strict) for each model; Dynamo for two of them (a compile costs seconds).
"""

from __future__ import annotations

import pytest
import torch
from rewrite_helpers import n_normpass
from tiny_models import CONFIGS, build, count_norm_modules, example_batch

from normpass import api

MODELS = list(CONFIGS)


class Loss(torch.nn.Module):
    """The model's loss alone (export wants tensors out, not a ModelOutput with a cache)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, **batch):
        return self.m(**batch).loss


def _model(name):
    model = build(name)
    model.config.use_cache = False
    return Loss(model), example_batch(name)


def _grads(module, batch):
    module.zero_grad()
    loss = module(**batch)
    loss.backward()
    named = module.named_parameters()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in named if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("name", MODELS)
def test_export_every_norm_module_rewritten(name):
    model, batch = _model(name)
    ep, rep = api.rewrite(torch.export.export(model, (), kwargs=batch, strict=False), report=True)
    n = count_norm_modules(model)
    assert len(rep.rewritten) == n == n_normpass(ep), str(rep)
    assert not rep.left_alone, str(rep)
    # Module paths come from the export's nn_module_stack, one row per norm module.
    paths = {name for name, m in model.named_modules() if "norm" in type(m).__name__.lower()}
    assert {r.where for r in rep.rows} == paths
    want_loss, want = _grads(model, batch)
    got_loss, got = _grads(ep.module(), batch)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-4, rtol=1e-4, msg=k)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_dynamo_every_norm_module_rewritten(name):
    model, batch = _model(name)
    reports = []

    def backend(gm, example_inputs):
        gm, rep = api.rewrite(gm, report=True)
        reports.append(rep)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    want_loss, want = _grads(model, batch)
    got_loss, got = _grads(compiled, batch)
    assert sum(len(r.rewritten) for r in reports) == count_norm_modules(model), "\n".join(map(str, reports))
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-4, rtol=1e-4, msg=k)
