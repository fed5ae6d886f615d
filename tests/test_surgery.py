"""The apply_* functions: what they replace, Parameter identity, optimizers, numerics, errors."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import tiny_models as models
import torch
from torch import nn

import normpass
from normpass import FusedLayerNorm, FusedRMSNorm, PartialRMSNorm

APPLY = {
    "rms_norm": normpass.apply_rms_norm,
    "fused_rms_norm": normpass.apply_fused_rms_norm,
    "low_precision_layernorm": lambda m, opt=None: normpass.apply_low_precision_layernorm(m, opt, "amp_bf16"),
    "partial_rms_norm": lambda m, opt=None: normpass.apply_partial_rms_norm(m, optimizers=opt),
}
NEW_TYPE = {
    "rms_norm": FusedRMSNorm,
    "fused_rms_norm": FusedRMSNorm,
    "low_precision_layernorm": FusedLayerNorm,
    "partial_rms_norm": PartialRMSNorm,
}


class Block(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(torch.nn.functional.gelu(self.fc(x)))


class Nested(nn.Module):
    """LayerNorms in a ModuleList, a Sequential, a ModuleDict, and one instance at two places."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.shared = nn.LayerNorm(d, eps=1e-6)
        self.seq = nn.Sequential(nn.Linear(d, d), self.shared, nn.Sequential(nn.LayerNorm(d, bias=False)))
        self.heads = nn.ModuleDict({"a": nn.LayerNorm(d, elementwise_affine=False), "b": nn.Linear(d, d)})
        for m in self.modules():  # random affine params so a dropped or swapped Parameter shows
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                nn.init.normal_(m.weight, 1.0, 0.5)
                if m.bias is not None:
                    nn.init.normal_(m.bias, 0.0, 0.5)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        x = self.shared(self.seq(x))
        return self.heads["b"](self.heads["a"](x))


SITES = ["blocks.0.norm", "blocks.1.norm", "shared", "seq.1", "seq.2.0", "heads.a"]


@pytest.mark.parametrize("kind", APPLY)
def test_replaces_every_layer_norm_and_keeps_parameters(kind):
    model = Nested()
    before = dict(model.named_modules(remove_duplicate=False))
    params = list(model.parameters())
    state_keys = list(model.state_dict())

    replaced = APPLY[kind](model)

    assert [r.name for r in replaced] == SITES
    for name, old, new in replaced:
        assert before[name] is old and model.get_submodule(name) is new
        assert type(new) is NEW_TYPE[kind]
        assert new.weight is old.weight and new.bias is old.bias
    # The shared LayerNorm got one replacement, placed at both of its places.
    assert model.shared is model.seq[1] and isinstance(model.shared, NEW_TYPE[kind])
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert list(model.state_dict()) == state_keys
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())

    assert APPLY[kind](model) == []  # idempotent


def test_eps_rules():
    model = Nested()
    normpass.apply_rms_norm(model)
    assert {m.eps for m in model.modules() if isinstance(m, FusedRMSNorm)} == {1e-8}  # the seed's default

    model = Nested()
    normpass.apply_rms_norm(model, eps=1e-3)
    assert {m.eps for m in model.modules() if isinstance(m, FusedRMSNorm)} == {1e-3}

    model = Nested()  # fused rms norm and partial rms norm keep each layer's eps
    normpass.apply_fused_rms_norm(model)
    assert model.shared.eps == 1e-6 and model.blocks[0].norm.eps == 1e-5
    model = Nested()
    normpass.apply_partial_rms_norm(model, p=0.25)
    assert model.shared.eps == 1e-6 and model.blocks[0].norm.eps == 1e-5 and model.shared.p == 0.25


def test_partial_rms_norm_takes_rms_norms_too():
    model = nn.Sequential(nn.Linear(8, 8), nn.RMSNorm(8), FusedRMSNorm(8), PartialRMSNorm(8, p=0.5))
    replaced = normpass.apply_partial_rms_norm(model, p=0.25)
    assert [r.name for r in replaced] == ["1", "2"]
    assert [getattr(m, "p", None) for m in model] == [None, 0.25, 0.25, 0.5]  # existing pRMSNorm kept


def test_chains_with_each_other():
    model = Nested()
    normpass.apply_low_precision_layernorm(model)
    assert len(normpass.apply_rms_norm(model)) == len(SITES)  # FusedLayerNorm counts as a LayerNorm
    assert len(normpass.apply_partial_rms_norm(model)) == len(SITES)


# ---- numerics: the swapped model computes the promised function ---------------------------------------


def handwritten_norm(layer, x, *, center, eps, p=1.0):
    """The norm a layer should compute, in plain PyTorch in x's dtype."""
    s = x[..., : max(1, math.ceil(p * x.shape[-1]))]
    mean = s.mean(-1, keepdim=True) if center else 0
    y = (x - mean) * torch.rsqrt((s - mean).square().mean(-1, keepdim=True) + eps)
    y = y * layer.weight if layer.weight is not None else y
    return y + layer.bias if layer.bias is not None else y


class Handwritten(nn.Module):
    def __init__(self, layer, **kw):
        super().__init__()
        self.layer, self.kw = layer, kw

    def forward(self, x):
        return handwritten_norm(self.layer, x, **self.kw)


EXPECTED = {  # what each old LayerNorm `ln` must compute after the swap
    "rms_norm": lambda ln: dict(center=False, eps=1e-8),
    "fused_rms_norm": lambda ln: dict(center=False, eps=ln.eps),
    "low_precision_layernorm": lambda ln: dict(center=True, eps=ln.eps),
    "partial_rms_norm": lambda ln: dict(center=False, eps=ln.eps, p=0.0625),
}


def outputs_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = model(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y.backward(g.to(y.dtype))  # the same upstream gradient in every dtype
    return [y.detach(), x.grad] + [p.grad for p in model.parameters()]


def rel_err(a, ref):
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("kind", APPLY)
def test_numerics_against_float64(kind):
    torch.manual_seed(1)
    d = 64  # p * 64 = 4 columns for pRMSNorm
    original = Nested(d)
    expected = copy.deepcopy(original)  # the promised function, hand-written, same weights
    for parent in list(expected.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(parent, attr, Handwritten(child, **EXPECTED[kind](child)))
    ours = copy.deepcopy(original)
    APPLY[kind](ours)

    x = torch.randn(4, 5, d) * 2 + 0.3
    ref = outputs_and_grads(copy.deepcopy(expected).double(), x.double())
    got = outputs_and_grads(ours, x)
    theirs = outputs_and_grads(expected, x)
    assert len(got) == len(theirs) == len(ref)
    for a, b, r in zip(got, theirs, ref, strict=True):
        assert rel_err(a, r) <= rel_err(b, r) + 1e-6, (rel_err(a, r), rel_err(b, r))


def test_low_precision_layernorm_under_autocast():
    torch.manual_seed(2)
    original = Nested(32)
    ours = copy.deepcopy(original)
    normpass.apply_low_precision_layernorm(ours, precision="amp_bf16")
    x = torch.randn(3, 32)
    torch.testing.assert_close(ours(x), original(x))  # no autocast: the same model
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = ours.heads["a"](x)
        y = ours(x)
    assert lp.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    assert rel_err(y, original.double()(x.double())) < 5e-2


def test_optimizer_keeps_working_before_and_after():
    torch.manual_seed(3)
    model = Nested()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(4, 16)
    model(x).square().mean().backward()
    opt.step()  # optimizer state now exists for the LayerNorm Parameters
    weight = model.shared.weight
    state_before = opt.state[weight]["exp_avg"].clone()

    normpass.apply_fused_rms_norm(model, optimizers=opt)
    assert model.shared.weight is weight
    opt.zero_grad()
    model(x).square().mean().backward()
    value = weight.detach().clone()
    opt.step()
    assert not torch.equal(weight, value)  # the step moved the tensor the model uses
    assert opt.state[weight]["step"] == 2 and not torch.equal(opt.state[weight]["exp_avg"], state_before)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in model.parameters())


def test_optimizer_made_after_surgery():
    model = Nested()
    normpass.apply_rms_norm(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 16)).sum().backward()
    w = model.blocks[0].norm.weight.detach().clone()
    opt.step()
    assert not torch.equal(model.blocks[0].norm.weight, w)


def test_optimizer_check():
    model = Nested()
    norm_params = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    others = torch.optim.SGD([p for p in model.parameters() if id(p) not in norm_params], lr=0.1)
    with pytest.raises(ValueError, match=r"in none of the given optimizers: blocks\.0\.norm\.weight, "):
        normpass.apply_fused_rms_norm(model, optimizers=others)
    assert isinstance(model.blocks[0].norm, nn.LayerNorm)  # nothing was changed

    # A sequence of optimizers: together they must hold every trainable Parameter of the layers.
    norm_opt = torch.optim.SGD([p for b in model.blocks for p in b.norm.parameters()], lr=0.1)
    with pytest.raises(ValueError, match=r"shared\.weight"):
        normpass.apply_fused_rms_norm(model, optimizers=[others, norm_opt])
    everything = torch.optim.SGD(model.parameters(), lr=0.1)
    assert len(normpass.apply_fused_rms_norm(model, optimizers=(norm_opt, everything))) == len(SITES)

    frozen = Nested()
    for p in frozen.parameters():
        p.requires_grad_(False)
    assert len(normpass.apply_rms_norm(frozen, optimizers=[])) == len(SITES)  # frozen: nothing to train

    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        normpass.apply_rms_norm(Nested(), optimizers=[object()])


def test_errors_and_skips():
    net = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="p must be a number in \\(0, 1\\], got a SGD"):
        normpass.apply_partial_rms_norm(net, opt)  # the optimizer where p goes
    with pytest.raises(ValueError, match="apply_rms_norm: eps must be a float >= 0, got None"):
        normpass.apply_rms_norm(net, eps=None)
    with pytest.raises(TypeError, match="expected an nn.Module, got dict"):
        normpass.apply_rms_norm({})
    with pytest.raises(TypeError, match="expected an nn.Module"):
        normpass.apply_low_precision_layernorm("model", precision="fp32")
    with pytest.raises(ValueError, match=r"the model itself is a LayerNorm"):
        normpass.apply_fused_rms_norm(nn.LayerNorm(8))
    with pytest.raises(
        ValueError, match=r"unknown precision 'bf16'; valid values are 'amp', 'amp_fp16', 'amp_bf16'"
    ):
        normpass.apply_low_precision_layernorm(Nested(), precision="bf16")
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\]"):
        normpass.apply_partial_rms_norm(Nested(), p=1.5)
    with pytest.raises(ValueError, match="eps must be a float >= 0, got -1.0"):
        normpass.apply_rms_norm(Nested(), eps=-1.0)

    for precision in ("fp32", "fp16"):
        model = Nested()
        with pytest.warns(UserWarning, match=f"no effect with precision='{precision}'"):
            assert normpass.apply_low_precision_layernorm(model, precision=precision) == []
        assert isinstance(model.shared, nn.LayerNorm)


class CustomLayerNorm(nn.LayerNorm):
    def forward(self, x):  # not LayerNorm's function any more
        return super().forward(x) * 2


class TaggedLayerNorm(nn.LayerNorm):
    tag = "same forward"


class ScaledLayerNorm(nn.LayerNorm):
    """LayerNorm.forward, but state of its own that its users read: a new layer would drop it."""

    def __init__(self, n):
        super().__init__(n)
        self.gain = nn.Parameter(torch.ones(1))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))


def test_skips_layers_it_cannot_swap_safely():
    hooked = nn.LayerNorm(8)
    hooked.register_forward_hook(lambda m, i, o: o)
    parametrized = nn.LayerNorm(8)
    torch.nn.utils.parametrize.register_parametrization(parametrized, "weight", nn.Identity())
    wrapped = nn.LayerNorm(8)
    wrapped.forward = lambda x: nn.LayerNorm.forward(wrapped, x)  # as accelerate's device hooks do
    renamed = nn.LayerNorm(8)  # a hook that maps old checkpoint keys
    renamed._register_load_state_dict_pre_hook(lambda *args: None)
    model = nn.Sequential(CustomLayerNorm(8), TaggedLayerNorm(8), hooked, parametrized, CustomLayerNorm(8))
    model.append(wrapped)
    model.append(model[0])  # shared: warned about once
    model.extend([ScaledLayerNorm(8), renamed])
    # Its inference fast path computes LayerNorm from norm1/norm2's weights, not calling them.
    model.append(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True))

    with pytest.warns(UserWarning) as record:
        replaced = normpass.apply_rms_norm(model)
    messages = [str(w.message) for w in record]
    assert messages == [
        "normpass: left CustomLayerNorm alone because its class CustomLayerNorm overrides LayerNorm.forward",
        "normpass: left LayerNorm alone because it has hooks registered on it",
        "normpass: left ParametrizedLayerNorm alone because it is parametrized (torch.nn.utils.parametrize)",
        "normpass: left CustomLayerNorm alone because its class CustomLayerNorm overrides LayerNorm.forward",
        "normpass: left LayerNorm alone because its forward is replaced on the instance",
        "normpass: left ScaledLayerNorm alone because it holds more than weight and bias (gain, steps), "
        "which the new layer would drop",
        "normpass: left LayerNorm alone because it has state_dict hooks registered on it, which the new "
        "layer would not have",
        "normpass: left 9.norm1 alone because nn.TransformerEncoderLayer's inference fast path computes "
        "LayerNorm from its weights without calling it",
        "normpass: left 9.norm2 alone because nn.TransformerEncoderLayer's inference fast path computes "
        "LayerNorm from its weights without calling it",
    ]
    assert [r.name for r in replaced] == ["1"]  # a subclass that keeps LayerNorm.forward is swapped
    layer, x = model[9].eval(), torch.randn(2, 3, 8)
    with torch.no_grad():
        fast = layer(x)
    torch.testing.assert_close(fast, layer(x))  # the fast path and the Python path: the same norms
    assert record[0].filename == __file__  # the warning points at the caller

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert normpass.apply_rms_norm(nn.Sequential(nn.Linear(2, 2))) == []


# ---- real models -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bert", "gpt2", "vit"])
def test_tiny_transformers(name):
    model = models.build(name)
    n_layer_norms = sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert n_layer_norms >= 5
    batch = models.example_batch(name)
    with torch.no_grad():
        want = model(**batch).logits

    lp = copy.deepcopy(model)
    assert len(normpass.apply_low_precision_layernorm(lp)) == n_layer_norms
    with torch.no_grad():
        torch.testing.assert_close(lp(**batch).logits, want, rtol=1e-4, atol=1e-4)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    replaced = normpass.apply_fused_rms_norm(model, optimizers=opt)
    assert len(replaced) == n_layer_norms
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    model.train()
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    assert all(new.weight.grad is not None for _, _, new in replaced)
    assert torch.isfinite(loss)
    assert normpass.apply_fused_rms_norm(model) == []


def test_tiny_llama_rms_norms_are_not_layer_norms():
    # Llama's RMSNorm is its own class (not nn.RMSNorm): module surgery leaves it to the graph passes.
    model = models.build("llama")
    assert normpass.apply_partial_rms_norm(model) == []
