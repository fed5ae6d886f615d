"""normpass: find normalization in PyTorch graphs and rewrite it into fused kernels."""

__version__ = "0.1.0"

from normpass import ops  # noqa: F401, E402  (registers the torch.ops.normpass ops, fake impls and autograd)
from normpass._extension import FALLBACK_REASON  # noqa: E402

# `normpass.backend` is the factory; the module stays importable as `from normpass.backend import ...`.
from normpass.backend import NormpassBackend, backend  # noqa: E402

__all__ = ["FALLBACK_REASON", "NormpassBackend", "__version__", "backend"]

from normpass.modules import FusedLayerNorm, FusedRMSNorm, PartialRMSNorm  # noqa: E402
from normpass.surgery import (  # noqa: E402
    Replacement,
    apply_fused_rms_norm,
    apply_low_precision_layernorm,
    apply_partial_rms_norm,
    apply_rms_norm,
)

__all__ += ["FusedLayerNorm", "FusedRMSNorm", "PartialRMSNorm", "Replacement"]
__all__ += ["apply_fused_rms_norm", "apply_low_precision_layernorm", "apply_partial_rms_norm"]
__all__ += ["apply_rms_norm"]

from normpass.api import PatternRegistry, Report, explain, register_pattern, rewrite  # noqa: E402

__all__ += ["PatternRegistry", "Report", "explain", "register_pattern", "rewrite"]
