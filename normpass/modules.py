"""nn.Module front ends of the normpass ops: drop-in norm layers that can adopt existing Parameters.

The `from_*` constructors take the weight and bias Parameter objects of the layer they replace
(never copies), so an optimizer built before the swap keeps updating the tensors the model uses.
The state_dict keys (`weight`, `bias`) are the ones torch's LayerNorm and RMSNorm use.

Example:
    >>> ln = torch.nn.LayerNorm(64)
    >>> rms = FusedRMSNorm.from_layer_norm(ln)
    >>> rms.weight is ln.weight
    True
    >>> y = rms(torch.randn(2, 8, 64))
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from normpass import reference

__all__ = ["FusedLayerNorm", "FusedRMSNorm", "PartialRMSNorm"]

_ShapeLike = int | Sequence[int] | torch.Size


def _as_shape(normalized_shape: _ShapeLike) -> tuple[int, ...]:
    """As nn.LayerNorm takes it: an int or a sequence of them, of any integer type (numpy's too)."""
    dims = normalized_shape if isinstance(normalized_shape, Sequence) else (normalized_shape,)
    try:
        shape = tuple(_dim(s) for s in dims)
    except TypeError:
        shape = ()
    if not shape or min(shape) <= 0:
        raise ValueError(
            f"normalized_shape must be a non-empty sequence of positive ints, got {normalized_shape!r}"
        )
    return shape


def _dim(s: object) -> int:
    if isinstance(s, bool):  # an int to operator.index, but FusedRMSNorm(True) is a mistake
        raise TypeError("bool")
    return operator.index(s)


def _check_param(name: str, t: Tensor | None, shape: tuple[int, ...]) -> None:
    if t is None:
        return
    if not isinstance(t, nn.Parameter):
        raise TypeError(f"{name} must be an nn.Parameter (or None), got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {list(t.shape)} but normalized_shape is {list(shape)}")


def _check_input(layer: str, input: Tensor, normalized_shape: tuple[int, ...]) -> None:
    # The op checks weight/bias against the input, but a layer without them must check itself.
    k = len(normalized_shape)
    if input.dim() < k or tuple(input.shape[input.dim() - k :]) != normalized_shape:
        raise RuntimeError(
            f"{layer}: expected input with trailing shape {list(normalized_shape)}, got {list(input.shape)}"
        )


# The layers' forward bodies. torch.fx.wrap keeps each one a single call in symbolic_trace graphs
# (checks and autocast decisions then happen when the graph runs, as in nn.LayerNorm's leaf call);
# Dynamo traces through them.
def rms_norm(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float | None,
    normalized_shape: tuple[int, ...],
    p: float = 1.0,
) -> Tensor:
    """`FusedRMSNorm`/`PartialRMSNorm` as a function; eps=None means the machine epsilon of the
    input's accumulation dtype (fp32 for bf16/fp16 inputs), as `F.rms_norm` computes it."""
    _check_input("normpass rms_norm", input, normalized_shape)
    if eps is None:  # nn.RMSNorm's eps=None
        eps = torch.finfo(reference.acc_dtype(input)).eps
    return torch.ops.normpass.rms_norm(input, weight, eps, bias, normalized_ndim=len(normalized_shape), p=p)


def layer_norm(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    normalized_shape: tuple[int, ...],
    low_precision: bool = False,
) -> Tensor:
    """`FusedLayerNorm` as a function (see its docstring for what autocast does)."""
    _check_input("normpass layer_norm", input, normalized_shape)
    out_dtype = None
    device_type = input.device.type
    if torch.is_autocast_enabled(device_type):
        if low_precision:
            out_dtype = torch.get_autocast_dtype(device_type)
            input = input.to(out_dtype)
        elif device_type != "cpu":  # torch's autocast runs layer_norm in fp32 except on CPU
            out_dtype = torch.float32
    return torch.ops.normpass.layer_norm(
        input, weight, bias, eps, normalized_ndim=len(normalized_shape), out_dtype=out_dtype
    )


torch.fx.wrap("rms_norm")
torch.fx.wrap("layer_norm")


class _FusedNorm(nn.Module):
    """Shared state of the normpass norm layers: normalized_shape, eps, optional weight and bias."""

    def __init__(
        self,
        normalized_shape: _ShapeLike,
        eps: float | None,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.normalized_shape = _as_shape(normalized_shape)
        if eps is not None and eps < 0:
            raise ValueError(f"eps must be >= 0 (or None), got {eps}")
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        kw = dict(device=device, dtype=dtype)
        weight = nn.Parameter(torch.ones(self.normalized_shape, **kw)) if elementwise_affine else None
        bias_ = (
            nn.Parameter(torch.zeros(self.normalized_shape, **kw)) if elementwise_affine and bias else None
        )
        self.register_parameter("weight", weight)
        self.register_parameter("bias", bias_)

    @classmethod
    def _adopt(
        cls, normalized_shape: _ShapeLike, weight: nn.Parameter | None, bias: nn.Parameter | None, **kw
    ):
        """A layer that uses the given Parameter objects themselves (no copy)."""
        self = cls(normalized_shape, elementwise_affine=False, bias=False, **kw)
        _check_param("weight", weight, self.normalized_shape)
        _check_param("bias", bias, self.normalized_shape)
        self.weight, self.bias = weight, bias
        self.elementwise_affine = weight is not None or bias is not None
        return self

    def reset_parameters(self) -> None:
        """Weight to ones and bias to zeros, as nn.LayerNorm's (after `to_empty`, e.g.).

        Example:
            >>> FusedRMSNorm(8, device="meta").to_empty(device="cpu").reset_parameters()
        """
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"bias={self.bias is not None}"
        )


class FusedRMSNorm(_FusedNorm):
    """RMSNorm on `torch.ops.normpass.rms_norm`: y = x * rsqrt(mean(x^2) + eps) * weight (+ bias).

    Statistics are taken in fp32 (fp64 for fp64 input); the output has the input's dtype. Unlike
    nn.RMSNorm it takes an optional bias, so it can replace a LayerNorm without dropping Parameters.

    Example:
        >>> norm = FusedRMSNorm(64, eps=1e-6)
        >>> y = norm(torch.randn(2, 8, 64))
    """

    def __init__(
        self,
        normalized_shape: _ShapeLike,
        eps: float | None = 1e-6,
        elementwise_affine: bool = True,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)

    p = 1.0  # the fraction of each row the statistics are taken over (PartialRMSNorm sets it)

    @classmethod
    def from_layer_norm(cls, ln: nn.LayerNorm, eps: float | None = None, **kw) -> FusedRMSNorm:
        """An RMSNorm that uses `ln.weight` and `ln.bias` themselves; eps defaults to `ln.eps`."""
        return cls._adopt(ln.normalized_shape, ln.weight, ln.bias, eps=ln.eps if eps is None else eps, **kw)

    @classmethod
    def from_rms_norm(cls, rms: nn.RMSNorm | FusedRMSNorm, **kw) -> FusedRMSNorm:
        """A layer that uses `rms.weight` (and `rms.bias`, if any) themselves, with the same eps."""
        return cls._adopt(rms.normalized_shape, rms.weight, getattr(rms, "bias", None), eps=rms.eps, **kw)

    def forward(self, input: Tensor) -> Tensor:
        return rms_norm(input, self.weight, self.bias, self.eps, self.normalized_shape, self.p)


class PartialRMSNorm(FusedRMSNorm):
    """pRMSNorm (Zhang & Sennrich, 2019): the RMS is estimated from the first ceil(p * n) elements.

    n is the number of normalized elements per row (the product of normalized_shape); p=1 is RMSNorm.

    Example:
        >>> norm = PartialRMSNorm(64, p=0.0625)    # the RMS of the first 4 of 64 features
        >>> y = norm(torch.randn(2, 8, 64))
    """

    def __init__(
        self, normalized_shape: _ShapeLike, p: float = 0.0625, eps: float | None = 1e-8, **kw
    ) -> None:
        if not 0 < p <= 1:
            raise ValueError(f"p must be in (0, 1], got {p}")
        super().__init__(normalized_shape, eps, **kw)
        self.p = float(p)

    @classmethod
    def from_layer_norm(
        cls, ln: nn.LayerNorm, p: float = 0.0625, eps: float | None = None, **kw
    ) -> PartialRMSNorm:
        """A pRMSNorm that uses `ln.weight` and `ln.bias` themselves; eps defaults to `ln.eps`."""
        return super().from_layer_norm(ln, eps=eps, p=p, **kw)

    @classmethod
    def from_rms_norm(cls, rms: nn.RMSNorm | FusedRMSNorm, p: float = 0.0625, **kw) -> PartialRMSNorm:
        """A pRMSNorm that uses `rms.weight` (and `rms.bias`, if any) themselves, with the same eps."""
        return super().from_rms_norm(rms, p=p, **kw)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


class FusedLayerNorm(_FusedNorm):
    """LayerNorm on `torch.ops.normpass.layer_norm`, optionally with low-precision IO under autocast.

    Outside autocast it computes nn.LayerNorm's function in the input dtype (statistics in fp32).
    Under autocast:
      - `low_precision=False` follows torch's autocast policy for layer_norm: fp32 output on
        accelerators, the input dtype on CPU (CPU autocast leaves layer_norm alone).
      - `low_precision=True` (the "Low Precision LayerNorm" algorithm) reads and writes the autocast
        dtype (fp16 or bf16): the input is cast to it and the output has it. The function is the same
        and the statistics stay fp32 inside the kernel; weight and bias are read in their own dtype.

    Example:
        >>> ln = torch.nn.LayerNorm(64)
        >>> lp = FusedLayerNorm.from_layer_norm(ln, low_precision=True)
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     y = lp(torch.randn(2, 8, 64))
        >>> y.dtype
        torch.bfloat16
    """

    def __init__(
        self,
        normalized_shape: _ShapeLike,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        low_precision: bool = False,
    ) -> None:
        if eps is None:  # RMSNorm's eps=None (the machine epsilon) has no LayerNorm counterpart
            raise ValueError("FusedLayerNorm: eps must be a float >= 0, got None")
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.low_precision = low_precision

    @classmethod
    def from_layer_norm(cls, ln: nn.LayerNorm, *, low_precision: bool = False) -> FusedLayerNorm:
        """A layer that uses `ln.weight` and `ln.bias` themselves, with `ln.eps`."""
        return cls._adopt(ln.normalized_shape, ln.weight, ln.bias, eps=ln.eps, low_precision=low_precision)

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm(input, self.weight, self.bias, self.eps, self.normalized_shape, self.low_precision)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, low_precision={self.low_precision}"


def why_not_plain(layer: nn.Module) -> str | None:
    """Why a norm layer may compute more than its class's norm (so that replacing its call by a
    normpass op could change the model), or None.

    Example:
        >>> ln = torch.nn.LayerNorm(8)
        >>> why_not_plain(ln) is None
        True
        >>> _ = ln.register_forward_hook(lambda m, i, o: o * 2)
        >>> why_not_plain(ln)
        'it has hooks registered on it'
    """
    bases = (nn.LayerNorm, nn.RMSNorm, FusedLayerNorm, FusedRMSNorm)
    base = next(b for b in bases if isinstance(layer, b))
    if type(layer).forward is not base.forward:
        return f"its class {type(layer).__qualname__} overrides {base.__name__}.forward"
    if "forward" in vars(layer):  # e.g. accelerate's device hooks wrap the instance's forward
        return "its forward is replaced on the instance"
    if torch.nn.utils.parametrize.is_parametrized(layer):
        return "it is parametrized (torch.nn.utils.parametrize)"
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    if any(getattr(layer, h, None) for h in hooks):
        return "it has hooks registered on it"
    if any(getattr(torch.nn.modules.module, "_global" + h, None) for h in hooks):
        return "global module hooks are registered (torch.nn.modules.module.register_module_*_hook)"
    return None
