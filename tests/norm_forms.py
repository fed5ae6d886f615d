"""Every normalization form of shared/PATTERNS.md as a tiny module, plus the look-alikes.

FORMS maps a name to (module factory, input shape, expected normpass ops after `fuse`). Inputs are
fresh torch.randn; weights are random too (never ones), so a dropped weight or offset shows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

H = 8  # hidden size


class _Norm(nn.Module):
    def __init__(self, weight: bool = True, bias: bool = False, n: int = H, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n)) if weight else None
        self.bias = nn.Parameter(torch.randn(n)) if bias else None
        self.eps = eps


# ---- hand-written RMSNorm -----------------------------------------------------------------------------


class R1Llama(_Norm):
    def forward(self, x):
        dt = x.dtype
        h = x.to(torch.float32)
        var = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(var + self.eps)
        return self.weight * h.to(dt)


class R2T5(_Norm):
    def forward(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class R3Gemma(_Norm):
    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        out = self._norm(x.float())
        out = out * (1.0 + self.weight.float())
        return out.type_as(x)


class R4Mul(_Norm):
    def forward(self, x):
        return x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + self.eps) * self.weight


class R4WeightFirst(_Norm):
    """The weight applied before the statistics' scale."""

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class R4BroadcastWeight(_Norm):
    """A weight stored with leading 1s, (1, 1, n): it broadcasts to the same output as (n,)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, 1, H))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class R4SqrtDiv(_Norm):
    def forward(self, x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class R4OneOverSqrt(_Norm):
    """1 / sqrt(...): export writes it reciprocal(sqrt(...)) * 1."""

    def forward(self, x):
        return x * (1 / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)) * self.weight


class R4SquareMethod(_Norm):
    def forward(self, x):
        return self.weight * (x * (torch.square(x).mean(dim=(-1,), keepdim=True) + self.eps).rsqrt())


class R4SumOverN(_Norm):
    def forward(self, x):
        return x * torch.rsqrt((x**2).sum(-1, keepdim=True) / H + self.eps) * self.weight


class R5NoWeight(_Norm):
    def __init__(self):
        super().__init__(weight=False)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class R5Bias(_Norm):
    def __init__(self):
        super().__init__(bias=True)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight + self.bias


class R6PerHead(nn.Module):
    """Qwen3-style q_norm over head_dim on a view, then a transposed view (non-contiguous)."""

    def __init__(self):
        super().__init__()
        self.q_norm = R1Llama(n=4)
        self.k_norm = R1Llama(n=4)

    def forward(self, x):
        q = self.q_norm(x.unflatten(-1, (2, 4))).transpose(1, 2)
        k = self.k_norm(x.unflatten(-1, (2, 4)).transpose(1, 2))  # normalizes a non-contiguous view
        return q + k


# ---- hand-written LayerNorm ---------------------------------------------------------------------------


class L1TwoPass(_Norm):
    def __init__(self):
        super().__init__(bias=True, eps=1e-5)

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight * x + self.bias


class L1RepeatedMean(_Norm):
    """L1 with the mean computed again inside the variance (no shared `u`)."""

    def __init__(self):
        super().__init__(bias=True, eps=1e-5)

    def forward(self, x):
        centered = x - x.mean(-1, keepdim=True)
        s = (x - x.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True)
        return centered / torch.sqrt(s + self.eps) * self.weight + self.bias


class L1WeightFirst(_Norm):
    def __init__(self):
        super().__init__(bias=True, eps=1e-5)

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        return self.weight * (x - u) / torch.sqrt(s + self.eps) + self.bias


class L1BroadcastParams(L1WeightFirst):
    """Weight (1, 1, n) before the scale, bias (1, n)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, 1, H))
        self.bias = nn.Parameter(torch.randn(1, H))


class L2VarMean(_Norm):
    def __init__(self):
        super().__init__(bias=True, eps=1e-5)

    def forward(self, x):
        var, mean = torch.var_mean(x, -1, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class L3Var(_Norm):
    def __init__(self):
        super().__init__(bias=True, eps=1e-5)

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        v = x.var(-1, unbiased=False, keepdim=True)
        return (x - u) * torch.rsqrt(v + self.eps) * self.weight + self.bias


class L3Upcast(_Norm):
    """LayerNorm computed in fp32 on a half/bf16 input, cast back (the common mixed-precision port)."""

    def __init__(self):
        super().__init__(bias=True, eps=1e-5)

    def forward(self, x):
        h = x.float()
        u = h.mean(-1, keepdim=True)
        v = h.var(-1, correction=0, keepdim=True)
        return ((h - u) * torch.rsqrt(v + self.eps)).to(x.dtype) * self.weight + self.bias


class L4ChannelsFirst(nn.Module):
    """ConvNeXt LayerNorm2d: statistics over dim 1 of NCHW (left alone, see check_dims)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4))
        self.bias = nn.Parameter(torch.randn(4))

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + 1e-6)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


# ---- calls ----------------------------------------------------------------------------------------------


def layer_norm_module():
    return nn.LayerNorm(H)


def layer_norm_no_bias():
    return nn.LayerNorm(H, bias=False)


def layer_norm_no_affine():
    return nn.LayerNorm(H, elementwise_affine=False)


def layer_norm_2d():
    return nn.LayerNorm((2, 4))


class FLayerNorm(_Norm):
    def __init__(self):
        super().__init__(bias=True, eps=1e-5)

    def forward(self, x):
        return F.layer_norm(x, (H,), self.weight, self.bias, self.eps)


class TorchLayerNorm(_Norm):
    def __init__(self):
        super().__init__(bias=True, eps=1e-5)

    def forward(self, x):
        return torch.layer_norm(x, (H,), self.weight, self.bias, self.eps)


def rms_norm_module():
    return nn.RMSNorm(H, eps=1e-6)


class FRmsNorm(_Norm):
    def forward(self, x):
        return F.rms_norm(x, (H,), self.weight, self.eps)


# ---- look-alikes ----------------------------------------------------------------------------------------


class UnbiasedVar(_Norm):
    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        return (x - u) * torch.rsqrt(x.var(-1, keepdim=True) + self.eps) * self.weight


class AnnotatedTransformerLN(_Norm):
    """(x - mean) / (std + eps): unbiased std, eps outside the root."""

    def __init__(self):
        super().__init__(bias=True)

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)
        return self.weight * (x - mean) / (std + self.eps) + self.bias


class EpsOutsideRms(_Norm):
    def forward(self, x):
        rms = torch.sqrt(x.pow(2).mean(-1, keepdim=True))
        return x / (rms + self.eps) * self.weight


class NormalizeScaled(_Norm):
    def forward(self, x):
        return F.normalize(x, dim=-1) * math.sqrt(H) * self.weight


class MismatchedDims(nn.Module):
    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-2, keepdim=True)
        return (x - u) * torch.rsqrt(s + 1e-5)


class RepeatedMeanOfAnotherDim(nn.Module):
    """L1 spelled with two means, the variance's over another dim: not the same centering."""

    def forward(self, x):
        s = (x - x.mean(-2, keepdim=True)).pow(2).mean(-1, keepdim=True)
        return (x - x.mean(-1, keepdim=True)) * torch.rsqrt(s + 1e-5)


class ScaledBeforeNormalizing(nn.Module):
    """x * r * rsqrt(mean(x^2)): r (an activation of x's shape) is no weight, and the statistics
    are x's, not x * r's."""

    def forward(self, x, r):
        return x * r * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class BatchStats(nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + 1e-5)


class MeanUsedElsewhere(_Norm):
    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        v = x.var(-1, unbiased=False, keepdim=True)
        return (x - u) * torch.rsqrt(v + self.eps) * self.weight + u


class RstdUsedElsewhere(_Norm):
    def forward(self, x):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * r * self.weight, r


class NormalizedUsedElsewhere(_Norm):
    """The normalized x (before the weight) is returned too: the op computes it, the weight stays."""

    def forward(self, x):
        n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return n * self.weight, n


# ---- fused residual add -----------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """Pre-norm residual stream: h = x + r; y = norm(h); h is used again."""

    def __init__(self):
        super().__init__()
        self.norm = R1Llama()
        self.ln = nn.LayerNorm(H)

    def forward(self, x, r):
        h = x + r
        y = self.norm(h)
        h2 = h + y.tanh()
        return self.ln(h2) + h2


class AliasedResidualBlock(nn.Module):
    """Mamba's block: the stream h = x + r is cast to the norm's dtype, the norm upcasts it again, and
    the residual is cast to fp32 after the norm. In an fp32 graph these are no-op aliases, and
    torch.export routes each later use of h through the latest of them."""

    def __init__(self):
        super().__init__()
        self.norm = R1Llama()

    def forward(self, x, r):
        h = x + r
        y = self.norm(h.to(self.norm.weight.dtype))
        return h.to(torch.float32) + y.tanh()


class AutocastResidualBlock(nn.Module):
    """autocast's residual stream: h = x + r of the fp32 stream and a 16-bit projection, promoted to
    fp32, normalized and used again. The op takes x as input and widens r, as the promotion does."""

    def __init__(self):
        super().__init__()
        self.norm = R1Llama()

    def forward(self, x, r):
        h = x.float() + r.bfloat16()
        return h + self.norm(h).tanh()


class AutocastResidualBlockProjectionFirst(AutocastResidualBlock):
    """The same add written projection first: the op still takes the fp32 operand as its input."""

    def forward(self, x, r):
        h = r.half() + x.float()
        return h + self.norm(h).tanh()


class Float64ResidualBlock(AutocastResidualBlock):
    """fp32 + fp64 promotes to fp64, wider than the fp32 stream: the norm is rewritten, its add is
    not (the op widens only a 16-bit residual)."""

    def forward(self, x, r):
        h = x.float() + r.double()
        return h + self.norm(h).tanh()


class Mixed16BitResidualBlock(AutocastResidualBlock):
    """bf16 + fp16 promotes to fp32 too, but neither operand is the fp32 row the op reads: the norm
    is rewritten, its add is not."""

    def forward(self, x, r):
        h = x.bfloat16() + r.half()
        return h + self.norm(h).tanh()


class SandwichBlock(nn.Module):
    """Gemma2/3's sandwich norms: a post-norm's output added straight to the residual stream,
    h = x + post(f(pre(x))). The pre-norm's `x.float()` of an fp32 stream is an alias, and
    torch.export routes the later use of x (the add) through it: the add's other operand is then an
    alias that is no bias of the post-norm."""

    def __init__(self):
        super().__init__()
        # in call order, the order fx lists their parameters in
        self.pre, self.proj, self.post = R3Gemma(), nn.Linear(H, H), R3Gemma()

    def forward(self, x):
        return x + self.post(self.proj(self.pre(x)))


class ExpandedResidualBlock(nn.Module):
    """The stream read again through an `expand`, a view of another shape: a use of h that reads
    `sum`, not an alias whose uses do."""

    def __init__(self):
        super().__init__()
        self.norm = R1Llama()

    def forward(self, x, r):
        h = x + r
        y = self.norm(h)
        return y + h.expand(2, 2, 3, H).sum(0)


class TwoNormsOfOneStream(nn.Module):
    """Two norms of the same h, then h: the first takes the add, the second reads its sum."""

    def __init__(self):
        super().__init__()
        self.n1, self.n2 = R1Llama(), R1Llama()

    def forward(self, x, r):
        h = x + r
        return self.n1(h) + self.n2(h) + h


class ScaledByItsInput(nn.Module):
    """rms(h) * h on a 1-D stream: h has the weight's shape, but is the norm's input, no weight."""

    def forward(self, x, r):
        h = x + r
        y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * h.contiguous()
        return y + h


# ---- outside the tables (inputs of their own) ----------------------------------------------------------


class NormOfExpandedInput(nn.Module):
    """F.layer_norm of a broadcast input: the norm's output has the expanded shape."""

    def forward(self, x, y):
        return F.layer_norm(x.expand_as(y), (y.shape[-1],))


class RmsNormDefaultEps(nn.Module):
    """F.rms_norm with eps=None: the machine epsilon of the accumulation dtype."""

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],))


class FlooredRms(_Norm):
    """x * floor(1 / rms): the division's rounding_mode makes it no RMSNorm."""

    def forward(self, x):
        rms = torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps)
        return x * torch.div(1.0, rms, rounding_mode="floor") * self.weight


class RoundingNoneRms(_Norm):
    """x / rms with rounding_mode=None: plain true division, an RMSNorm."""

    def forward(self, x):
        rms = torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps)
        return torch.div(x, rms, rounding_mode=None) * self.weight


class HookedLayerNorm(nn.Module):
    """An nn.LayerNorm with a forward hook: the module call computes more than the norm."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(H)
        self.ln.register_forward_hook(lambda module, args, out: out * 2.0 + 1.0)

    def forward(self, x):
        return self.ln(x)


# name: (factory, extra inputs beyond x, rewritten ops expected under fuse)
FORMS: dict[str, tuple] = {
    "R1 llama": (R1Llama, 0, 1),
    "R2 t5": (R2T5, 0, 1),
    "R3 gemma": (R3Gemma, 0, 1),
    "R4 mul": (R4Mul, 0, 1),
    "R4 weight first": (R4WeightFirst, 0, 1),
    "R4 broadcast weight": (R4BroadcastWeight, 0, 1),
    "R4 sqrt/div": (R4SqrtDiv, 0, 1),
    "R4 1/sqrt": (R4OneOverSqrt, 0, 1),
    "R4 square/rsqrt method": (R4SquareMethod, 0, 1),
    "R4 sum/n": (R4SumOverN, 0, 1),
    "R5 no weight": (R5NoWeight, 0, 1),
    "R5 bias": (R5Bias, 0, 1),
    "R6 per-head": (R6PerHead, 0, 2),
    "L1 two-pass": (L1TwoPass, 0, 1),
    "L1 repeated mean": (L1RepeatedMean, 0, 1),
    "L1 weight first": (L1WeightFirst, 0, 1),
    "L1 broadcast weight and bias": (L1BroadcastParams, 0, 1),
    "L2 var_mean": (L2VarMean, 0, 1),
    "L3 var": (L3Var, 0, 1),
    "L3 upcast": (L3Upcast, 0, 1),
    "nn.LayerNorm": (layer_norm_module, 0, 1),
    "nn.LayerNorm no bias": (layer_norm_no_bias, 0, 1),
    "nn.LayerNorm no affine": (layer_norm_no_affine, 0, 1),
    "nn.LayerNorm 2 dims": (layer_norm_2d, 0, 1),
    "F.layer_norm": (FLayerNorm, 0, 1),
    "torch.layer_norm": (TorchLayerNorm, 0, 1),
    "nn.RMSNorm": (rms_norm_module, 0, 1),
    "F.rms_norm": (FRmsNorm, 0, 1),
    "residual block": (ResidualBlock, 1, 2),
    "sandwich block": (SandwichBlock, 0, 2),
    "aliased residual block": (AliasedResidualBlock, 1, 1),
    "autocast residual block": (AutocastResidualBlock, 1, 1),
    "mixed 16-bit residual block": (Mixed16BitResidualBlock, 1, 1),
    "autocast residual block, projection first": (AutocastResidualBlockProjectionFirst, 1, 1),
    "float64 residual block": (Float64ResidualBlock, 1, 1),
    "expanded residual block": (ExpandedResidualBlock, 1, 1),
    "two norms of one stream": (TwoNormsOfOneStream, 1, 2),
    "scaled by its input": (ScaledByItsInput, 1, 1),
    "normalized used elsewhere": (NormalizedUsedElsewhere, 0, 1),
}

LOOKALIKES: dict[str, tuple] = {
    "L4 channels-first": (L4ChannelsFirst, 0, 0),
    "unbiased var": (UnbiasedVar, 0, 0),
    "annotated transformer": (AnnotatedTransformerLN, 0, 0),
    "eps outside rms": (EpsOutsideRms, 0, 0),
    "F.normalize": (NormalizeScaled, 0, 0),
    "mismatched dims": (MismatchedDims, 0, 0),
    "repeated mean of another dim": (RepeatedMeanOfAnotherDim, 0, 0),
    "scaled before normalizing": (ScaledBeforeNormalizing, 1, 0),
    "batch stats": (BatchStats, 0, 0),
    "mean used elsewhere": (MeanUsedElsewhere, 0, 0),
    "rstd used elsewhere": (RstdUsedElsewhere, 0, 0),
}


def inputs(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, ...]:
    factory, extra, _ = {**FORMS, **LOOKALIKES}[name]
    g = torch.Generator().manual_seed(seed)
    shape = {
        "L4 channels-first": (2, 4, 4, 4),
        "nn.LayerNorm 2 dims": (2, 3, 2, 4),
        "scaled by its input": (H,),
    }.get(name, (2, 3, H))
    return tuple(torch.randn(shape, generator=g).to(dtype) for _ in range(1 + extra))


def build(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    factory = {**FORMS, **LOOKALIKES}[name][0]
    return factory().to(dtype)


class InputUpdatedInPlace(_Norm):
    """x is updated in place between the statistics and the output (valid under no_grad only): the
    op, inserted at the output, would normalize the updated x."""

    def forward(self, x):
        x = x.clone()
        n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        x.add_(1.0)
        return n * self.weight, x


class InputReluInPlace(InputUpdatedInPlace):
    """The same, the write spelled as an `inplace=True` argument."""

    def forward(self, x):
        x = x.clone()
        n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        F.relu(x, inplace=True)
        return n * self.weight, x


class MeanWrittenOut(_Norm):
    """L1 whose mean is also written into a tensor it returns (`out=`): the rewrite would drop the
    write, leaving that tensor uninitialized."""

    def __init__(self):
        super().__init__(bias=True, eps=1e-5)

    def forward(self, x):
        buf = torch.empty_like(x[..., :1])
        u = torch.mean(x, -1, True, out=buf)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        return (x - u) / torch.sqrt(s + self.eps) * self.weight + self.bias, buf
