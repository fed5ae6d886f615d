"""Module-level surgery: swap norm layers for normpass layers in place, keeping the Parameter objects.

Each `apply_*` function walks the model, decides per layer whether it applies, and puts one new
layer in place of each old one (a layer shared between several places gets one replacement, placed
at all of them). The new layers adopt the old layers' weight and bias Parameters themselves, so an
optimizer keeps working whether it was built before or after the swap, and the state_dict keys stay
the same. Every function is idempotent: a second call finds nothing to do and returns [].

Rules shared by all of them:
- Layers whose class overrides `forward` (a LayerNorm subclass with its own math), that have hooks
  (state_dict hooks too), that hold parameters, buffers or submodules beyond weight and bias, that
  are parametrized (torch.nn.utils.parametrize), or that sit in an nn.TransformerEncoderLayer (its
  inference fast path computes LayerNorm from their weights) are left alone with a warning:
  swapping them would change what they compute or drop behavior.
- `optimizers` (one optimizer or a sequence) is optional. When given, every trainable Parameter of
  every layer about to be replaced must be in one of their param groups; otherwise nothing is changed
  and a ValueError names the missing ones (it catches a model/optimizer mix-up before training).
- The model itself cannot be the layer to replace (there is no parent to put the new one in).

Example:
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    >>> opt = torch.optim.AdamW(model.parameters())
    >>> [(name, type(new).__name__) for name, old, new in apply_fused_rms_norm(model, opt)]
    [('1', 'FusedRMSNorm')]
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import nn

from normpass.modules import FusedLayerNorm, FusedRMSNorm, PartialRMSNorm, why_not_plain

__all__ = [
    "Replacement",
    "apply_fused_rms_norm",
    "apply_low_precision_layernorm",
    "apply_partial_rms_norm",
    "apply_rms_norm",
]

Optimizers = torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None

# The `precision` values of apply_low_precision_layernorm, and whether each one runs under autocast.
PRECISIONS = {"amp": True, "amp_fp16": True, "amp_bf16": True, "fp32": False, "fp16": False}


class Replacement(NamedTuple):
    """One place in the model where a layer was swapped (qualified name, old layer, new layer)."""

    name: str
    old: nn.Module
    new: nn.Module


# A converter returns the new layer for a module it handles, or None for modules it does not.
Converter = Callable[[nn.Module], nn.Module | None]


def _layer_norms(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm | FusedLayerNorm)


def _rms_norms(m: nn.Module) -> bool:
    return isinstance(m, nn.RMSNorm | FusedRMSNorm)


def _optimizer_params(optimizers: Optimizers) -> set[int] | None:
    if optimizers is None:
        return None
    if isinstance(optimizers, torch.optim.Optimizer):
        optimizers = [optimizers]
    ids: set[int] = set()
    for opt in optimizers:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                f"optimizers must be a torch.optim.Optimizer or a sequence of them, got {type(opt)}"
            )
        ids.update(id(p) for group in opt.param_groups for p in group["params"])
    return ids


def _swap(model: nn.Module, convert: Converter, optimizers: Optimizers, what: str) -> list[Replacement]:
    """Replace every module `convert` handles, everywhere it sits in `model`; return what was done."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: expected an nn.Module, got {type(model).__name__}")
    in_optimizers = _optimizer_params(optimizers)
    if convert(model) is not None:
        raise ValueError(
            f"{what}: the model itself is a {type(model).__name__}, so there is no parent to put the new "
            "layer in; wrap it in a container (e.g. nn.Sequential) or use the layer's from_* constructor"
        )

    new_for: dict[int, nn.Module | None] = {}  # id(old) -> its replacement; shared layers convert once
    sites: list[tuple[nn.Module, str, str, nn.Module]] = []
    for name, child in model.named_modules(remove_duplicate=False):  # pre-order: the order of the model
        if child is model:
            continue
        if id(child) not in new_for:
            new_for[id(child)] = convert(child)
        if new_for[id(child)] is not None:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            if isinstance(parent, nn.TransformerEncoderLayer):
                # Its inference fast path (torch._transformer_encoder_layer_fwd) computes LayerNorm
                # from norm1/norm2's weights itself: a new layer there would be skipped in eval.
                _warn_left_alone(name, _ENCODER_FAST_PATH, stacklevel=4)
                continue
            sites.append((parent, attr, name, child))

    if in_optimizers is not None:
        missing = [
            f"{name}.{pname}"
            for _, _, name, old in sites
            for pname, p in old.named_parameters(recurse=False)
            if p.requires_grad and id(p) not in in_optimizers
        ]
        if missing:
            raise ValueError(
                f"{what}: these parameters of the layers to replace are in none of the given optimizers: "
                f"{', '.join(missing)}. Pass the optimizer(s) that train this model, or optimizers=None."
            )

    replaced = []
    for parent, attr, name, old in sites:
        new = new_for[id(old)]
        setattr(parent, attr, new)
        replaced.append(Replacement(name, old, new))
    return replaced


_STATE_DICT_HOOKS = (
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _why_not_replaceable(layer: nn.Module) -> str | None:
    """Why a new layer would lose what `layer` holds beyond its norm (a subclass's parameters, buffers
    or submodules; hooks that rename checkpoint keys), or None."""
    extra = [
        name
        for name, _ in (*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False))
        if name not in ("weight", "bias")
    ] + [name for name, _ in layer.named_children()]
    if extra:
        return f"it holds more than weight and bias ({', '.join(extra)}), which the new layer would drop"
    if any(getattr(layer, h, None) for h in _STATE_DICT_HOOKS):
        return "it has state_dict hooks registered on it, which the new layer would not have"
    return None


_ENCODER_FAST_PATH = (
    "nn.TransformerEncoderLayer's inference fast path computes LayerNorm from its weights without calling it"
)


def _warn_left_alone(what: str, reason: str, stacklevel: int) -> None:
    """The warning for a layer the surgery skips; `stacklevel` points it at the user's call."""
    warnings.warn(f"normpass: left {what} alone because {reason}", stacklevel=stacklevel)


def _is_number(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _converter(applies: Callable[[nn.Module], bool], build: Callable[[nn.Module], nn.Module]) -> Converter:
    """A converter for modules where `applies` holds, skipping (with a warning) ones unsafe to swap."""
    warned: set[int] = set()

    def convert(m: nn.Module) -> nn.Module | None:
        if not applies(m):
            return None
        reason = why_not_plain(m) or _why_not_replaceable(m)
        if reason is not None:
            if id(m) not in warned:
                warned.add(id(m))
                _warn_left_alone(type(m).__name__, reason, stacklevel=5)
            return None
        return build(m).train(m.training)

    return convert


def apply_rms_norm(model: nn.Module, optimizers: Optimizers = None, eps: float = 1e-8) -> list[Replacement]:
    """Replace LayerNorm layers with RMSNorm (normpass's fused op), in place. This changes the model.

    RMSNorm drops LayerNorm's mean-centering: y = x * rsqrt(mean(x^2) + eps) * weight + bias. The
    weight and bias Parameters are the LayerNorm's own. `eps` (default 1e-8) is the one
    hyperparameter and replaces each layer's eps. LayerNorm here means nn.LayerNorm and
    normpass.FusedLayerNorm.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
        >>> [name for name, old, new in apply_rms_norm(model)]
        ['1']
        >>> model[1].eps
        1e-08
    """
    if not _is_number(eps) or eps < 0:
        raise ValueError(f"apply_rms_norm: eps must be a float >= 0, got {eps!r}")
    build = lambda ln: FusedRMSNorm.from_layer_norm(ln, eps=eps)  # noqa: E731
    return _swap(model, _converter(_layer_norms, build), optimizers, "apply_rms_norm")


def apply_fused_rms_norm(model: nn.Module, optimizers: Optimizers = None) -> list[Replacement]:
    """Replace LayerNorm layers with normpass's fused RMSNorm, in place. This changes the model.

    No hyperparameters: normalized_shape and eps come from each layer; the weight and bias
    Parameters are the layer's own.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8, eps=1e-6))
        >>> _ = apply_fused_rms_norm(model)
        >>> model[1]
        FusedRMSNorm((8,), eps=1e-06, elementwise_affine=True, bias=True)
    """
    return _swap(
        model, _converter(_layer_norms, FusedRMSNorm.from_layer_norm), optimizers, "apply_fused_rms_norm"
    )


def apply_low_precision_layernorm(
    model: nn.Module, optimizers: Optimizers = None, precision: str = "amp_bf16"
) -> list[Replacement]:
    """Under autocast, run LayerNorm with fp16/bf16 inputs and outputs instead of fp32, in place.

    Same function (statistics still fp32 inside the kernel), lower IO precision. `precision` names how
    the model is trained: "amp" / "amp_fp16" (autocast to fp16) and "amp_bf16" swap the LayerNorm
    layers for `FusedLayerNorm(low_precision=True)`, which reads and writes the autocast dtype in
    effect when it runs; "fp32" and "fp16" (no autocast) have no effect: nothing is replaced and a
    warning says so.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
        >>> _ = apply_low_precision_layernorm(model, precision="amp_bf16")
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     model(torch.randn(2, 8)).dtype
        torch.bfloat16
    """
    if precision not in PRECISIONS:
        raise ValueError(
            f"apply_low_precision_layernorm: unknown precision {precision!r}; valid values are "
            f"{', '.join(map(repr, PRECISIONS))}"
        )
    if not PRECISIONS[precision]:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"apply_low_precision_layernorm: expected an nn.Module, got {type(model).__name__}"
            )
        warnings.warn(
            f"normpass: apply_low_precision_layernorm has no effect with precision={precision!r} (it changes "
            "LayerNorm only under autocast, i.e. 'amp', 'amp_fp16' or 'amp_bf16')",
            stacklevel=2,
        )
        return []

    def applies(m: nn.Module) -> bool:
        return _layer_norms(m) and not getattr(m, "low_precision", False)

    build = lambda ln: FusedLayerNorm.from_layer_norm(ln, low_precision=True)  # noqa: E731
    return _swap(model, _converter(applies, build), optimizers, "apply_low_precision_layernorm")


def apply_partial_rms_norm(
    model: nn.Module, p: float = 0.0625, optimizers: Optimizers = None
) -> list[Replacement]:
    """Replace LayerNorm and RMSNorm layers with pRMSNorm, in place. This changes the model.

    pRMSNorm (Zhang & Sennrich, 2019) estimates the RMS from the first ceil(p * n) of the n
    normalized elements (p=0.0625 in the paper). eps, weight and bias come from each layer (the same
    Parameter objects). Sources: nn.LayerNorm, nn.RMSNorm, normpass.FusedLayerNorm and
    normpass.FusedRMSNorm; existing PartialRMSNorm layers are left as they are.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.RMSNorm(64))
        >>> _ = apply_partial_rms_norm(model, p=0.0625)
        >>> model[1].p
        0.0625
    """
    if not _is_number(p):
        raise TypeError(
            f"apply_partial_rms_norm: p must be a number in (0, 1], got a {type(p).__name__} "
            "(optimizers go in the third argument, optimizers=)"
        )
    if not 0 < p <= 1:
        raise ValueError(f"apply_partial_rms_norm: p must be in (0, 1], got {p}")

    def applies(m: nn.Module) -> bool:
        return (_layer_norms(m) or _rms_norms(m)) and not isinstance(m, PartialRMSNorm)

    def build(m: nn.Module) -> nn.Module:
        return (
            PartialRMSNorm.from_layer_norm(m, p=p)
            if _layer_norms(m)
            else PartialRMSNorm.from_rms_norm(m, p=p)
        )

    return _swap(model, _converter(applies, build), optimizers, "apply_partial_rms_norm")
