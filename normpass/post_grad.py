"""The inductor post-grad passes of the normpass backend, as one `post_grad_custom_post_pass`.

Example:
    >>> torch._inductor.config.post_grad_custom_post_pass = PostGradPasses()
"""

from __future__ import annotations

from typing import Any

from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx import Graph

from normpass import fold_casts, grad_sums

# In order: the gradient sums first, so that the casts' pass sees each backward op's final terms.
_PASSES = (grad_sums.fold_grad_sums, fold_casts.fold_casts)
_FILES = (__file__, grad_sums.__file__, fold_casts.__file__)


class PostGradPasses(CustomGraphPass):
    """normpass's post-grad passes, then `then` (a pass that was already in inductor's slot, which is
    a single global one)."""

    def __init__(self, then: Any = None) -> None:
        self.then = then

    def __call__(self, graph: Graph) -> None:
        for run in _PASSES:
            run(graph)
        if self.then is not None:
            self.then(graph)

    def uuid(self) -> Any:
        # The compile cache keys on it: these files' contents, and the chained pass's own key (a pass
        # without one disables the cache, as it would on its own).
        if self.then is None:
            return get_hash_for_files(_FILES)
        then_uuid = self.then.uuid() if isinstance(self.then, CustomGraphPass) else None
        return None if then_uuid is None else (get_hash_for_files(_FILES), then_uuid)
