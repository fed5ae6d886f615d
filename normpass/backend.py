"""The torch.compile backend "normpass".

Dynamo hands the backend a torch-level graph, before autograd. normpass rewrites its norms into the
fused ops there, so AOT autograd later derives the backward graph from the ops' autograd formulas and
the backward runs the fused backward kernels. The rewritten graph then goes to an inner compiler:
inductor by default, or any other registered backend ("eager", "aot_eager", ...).

Example:
    >>> model = torch.compile(model, backend="normpass")  # no `import normpass` needed
    >>> model = torch.compile(model, backend="normpass", options={"policy": "low_precision"})
    >>> model = torch.compile(model, backend=normpass.backend(compiler="eager"))
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from normpass.passes.rewriter import check_policy

log = logging.getLogger("normpass")


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """What `options={...}` (or `normpass.backend(...)`) may set.

    policy: which rewrites are allowed (see normpass.rewrite).
    p: the partial fraction of the "prmsnorm" policy (default: the RMSNorm paper's 0.0625).
    compiler: the inner compiler, "inductor" or any registered backend name or callable.
    registry: a PatternRegistry with user patterns, or None for the default one.
    inductor_options: inductor config patches (only with compiler="inductor").
    """

    policy: str = "fuse"
    p: float | None = None
    compiler: str | Callable = "inductor"
    registry: Any = None
    inductor_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None, base: BackendOptions | None = None) -> BackendOptions:
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"normpass backend: unknown option(s) {unknown}; valid options are {valid}")
        result = dataclasses.replace(base or cls(), **options)
        check_policy(result.policy, result.p, "normpass backend")
        if result.inductor_options and result.compiler != "inductor":
            raise ValueError("normpass backend: inductor_options need compiler='inductor'")
        return result


class NormpassBackend:
    """A torch.compile backend: rewrite the norms, then compile with the inner compiler.

    Each compiled graph's rewrite report is kept in `reports` (and logged at INFO level on the
    "normpass" logger).
    """

    def __init__(self, **options: Any) -> None:
        self.options = BackendOptions.from_dict(options)
        self.reports: list[Any] = []

    def __repr__(self) -> str:
        return f"normpass.backend({self.options})"

    def __call__(
        self,
        gm: torch.fx.GraphModule,
        example_inputs: Sequence[Any],
        *,
        mode: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> Callable:
        from normpass import api

        opts = BackendOptions.from_dict(options, base=self.options)
        gm, report = api.rewrite(gm, policy=opts.policy, p=opts.p, registry=opts.registry, report=True)
        self.reports.append(report)
        log.info("normpass rewrite (policy=%s):\n%s", opts.policy, report)
        return _inner_compile(gm, example_inputs, opts, mode)


def _inner_compile(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], opts: BackendOptions, mode):
    if opts.compiler == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        from normpass.post_grad import PostGradPasses

        patches = {**(list_mode_options(mode) if mode else {}), **opts.inductor_options}
        # The ops take their gradient sums and the casts around them (grad_sums.py, fold_casts.py).
        then = patches.get("post_grad_custom_post_pass", torch._inductor.config.post_grad_custom_post_pass)
        patches["post_grad_custom_post_pass"] = PostGradPasses(then)
        return compile_fx(gm, example_inputs, config_patches=patches)
    if mode not in (None, "default"):
        raise ValueError(
            f"normpass backend: mode={mode!r} is an inductor setting, but compiler={opts.compiler!r}"
        )
    if opts.compiler == "eager":
        return gm.forward
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend(opts.compiler)(gm, example_inputs)


def backend(**options: Any) -> NormpassBackend:
    """A configured normpass backend for `torch.compile`.

    Example:
        >>> be = normpass.backend(policy="fuse", compiler="eager")
        >>> y = torch.compile(model, backend=be)(x)
        >>> print(be.reports[-1])
    """
    return NormpassBackend(**options)


# The object behind `backend="normpass"` (the torch_dynamo_backends entry point).
normpass_backend = NormpassBackend()
