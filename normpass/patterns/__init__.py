"""The built-in patterns, one file per family, each declared once over the canonical view."""

from __future__ import annotations

from normpass.passes.registry import Pattern
from normpass.patterns.calls import match_call
from normpass.patterns.layernorm import match_layernorm
from normpass.patterns.lookalikes import match_eps_outside, match_normalize_call
from normpass.patterns.rmsnorm import match_rmsnorm

BUILTIN: tuple[Pattern, ...] = (
    Pattern("calls", match_call, ("layer_norm", "native_layer_norm", "rms_norm", "fused_rms_norm"), "calls"),
    Pattern("rmsnorm", match_rmsnorm, ("mul",), "rmsnorm"),
    Pattern("layernorm", match_layernorm, ("mul",), "layernorm"),
    Pattern("eps_outside_root", match_eps_outside, ("mul",), "lookalikes"),
    Pattern("normalize_call", match_normalize_call, ("normalize",), "lookalikes"),
)
