"""normpass: find normalization in PyTorch graphs and rewrite it into fused kernels."""

from normpass import ops  # noqa: F401  (registers the torch.ops.normpass ops, fake impls and autograd)
from normpass._extension import FALLBACK_REASON

__all__ = ["FALLBACK_REASON"]
