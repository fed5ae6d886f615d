"""normpass's public graph API: rewrite(), explain(), register_pattern().

Example:
    >>> gm = normpass.rewrite(torch.fx.symbolic_trace(model))            # FX convention: in place, returns gm
    >>> gm, report = normpass.rewrite(gm, report=True)   # what the torch.compile backend calls
    >>> print(normpass.explain(model, x))                                 # every site, what was done, why
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

import torch
from torch import fx

from normpass import ops as _ops  # noqa: F401  (registers torch.ops.normpass)
from normpass.passes import manager
from normpass.passes.match import Matcher, NoMatch, Reject, Site
from normpass.passes.registry import CheckFn, Pattern, PatternRegistry, ReplaceFn, current_registry
from normpass.passes.report import Report, Row
from normpass.passes.rewriter import POLICIES
from normpass.passes.template import template_pattern

__all__ = [
    "POLICIES",
    "Matcher",
    "NoMatch",
    "Pattern",
    "PatternRegistry",
    "Reject",
    "Report",
    "Row",
    "Site",
    "explain",
    "register_pattern",
    "rewrite",
]

GraphLike = fx.GraphModule | torch.export.ExportedProgram


@overload
def rewrite(
    gm: GraphLike,
    policy: str = ...,
    *,
    p: float | None = ...,
    registry: PatternRegistry | None = ...,
    example_inputs: Sequence[Any] | None = ...,
) -> GraphLike: ...
@overload
def rewrite(
    gm: GraphLike,
    policy: str = ...,
    *,
    p: float | None = ...,
    registry: PatternRegistry | None = ...,
    example_inputs: Sequence[Any] | None = ...,
    report: bool,
) -> Any: ...


def rewrite(
    gm: GraphLike,
    policy: str = "fuse",
    *,
    p: float | None = None,
    registry: PatternRegistry | None = None,
    example_inputs: Sequence[Any] | None = None,
    report: bool = False,
) -> Any:
    """Rewrite every normalization in `gm` into normpass ops, as `policy` allows.

    gm: an fx.GraphModule from torch.fx.symbolic_trace, from Dynamo (a backend's graph) or from
        torch.export (ATen IR), or an ExportedProgram (its graph module is rewritten; the returned
        program runs and survives torch.export.save/load, the ops being registered in C++).
    policy: "fuse" (same function, fp32 accumulation), "low_precision" (autocast LayerNorm keeps its
        half/bf16 IO), "rmsnorm" (LayerNorm -> RMSNorm), "prmsnorm" (-> partial RMSNorm with `p`).
    p: the partial fraction of policy "prmsnorm" (default 0.0625, the RMSNorm paper's); other
        policies take none.
    registry: the patterns to use; default: the innermost `with PatternRegistry():` or the global one.
    example_inputs: for graphs without metadata (plain symbolic_trace), fake-propagated first so that
        dtypes and shapes are known; without them dtypes are computed at run time where needed.
    report: also return the Report: `(gm, report)`. The torch.compile backend calls
        `normpass.api.rewrite(gm, policy=..., p=..., registry=..., report=True)`.

    Rewrites in place and returns gm (FX convention), or (gm, Report) with report=True.

    Example:
        >>> gm = normpass.rewrite(torch.fx.symbolic_trace(model))
        >>> gm(x)   # now calls torch.ops.normpass.rms_norm / layer_norm
    """
    registry = registry if registry is not None else current_registry()
    if isinstance(gm, torch.export.ExportedProgram):
        if example_inputs is not None:
            raise ValueError(
                "normpass.rewrite: an ExportedProgram records its shapes and dtypes; "
                "example_inputs are for graphs without metadata"
            )
        result = _rewrite_exported(gm, policy, p, registry)
        return result if report else result[0]
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(
            f"normpass.rewrite: expected a torch.fx.GraphModule or ExportedProgram, got {type(gm).__name__}"
            " (for an nn.Module, use torch.fx.symbolic_trace, torch.export or torch.compile first)"
        )
    if example_inputs is not None:
        _propagate(gm, example_inputs)
    rep = manager.run(gm, policy, p, registry)
    return (gm, rep) if report else gm


def _propagate(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    # get_attr parameters stay real tensors; the example inputs are converted.
    FakeTensorProp(gm, mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_inputs)


def _rewrite_exported(
    ep: torch.export.ExportedProgram, policy: str, p: float | None, registry: PatternRegistry
):
    gm = ep.graph_module
    rep = manager.run(gm, policy, p, registry)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    names = [a.name if isinstance(a, fx.Node) else a for a in out.args[0]]
    # The program keeps its graph module (rewritten in place); only outputs that now come from a new
    # node need their signature entry renamed.
    for spec, name in zip(ep.graph_signature.output_specs, names, strict=True):
        if hasattr(spec.arg, "name") and isinstance(name, str) and spec.arg.name != name:
            spec.arg = type(spec.arg)(name=name)
    ep.validate()
    return ep, rep


def explain(
    model_or_gm: torch.nn.Module | GraphLike,
    *example_inputs: Any,
    policy: str = "fuse",
    p: float | None = None,
    registry: PatternRegistry | None = None,
    **example_kwargs: Any,
) -> Report:
    """Every normalization site normpass finds, what `policy` would do with it, and why. Changes nothing.

    An nn.Module is captured with torch.export (non-strict): ATen IR with each node's module path and
    source line, and no compile cost. A GraphModule or ExportedProgram is copied first; a GraphModule
    without metadata is fake-propagated with the example inputs when they are given.

    Example:
        >>> print(normpass.explain(model, x))
        >>> [row.form for row in normpass.explain(model, x).rows if not row.rewritten]
    """
    if isinstance(model_or_gm, torch.export.ExportedProgram):
        gm = copy.deepcopy(model_or_gm.graph_module)
    elif isinstance(model_or_gm, fx.GraphModule):
        gm = copy.deepcopy(model_or_gm)
        if example_inputs and not _has_meta(gm):
            _propagate(gm, example_inputs)
    elif isinstance(model_or_gm, torch.nn.Module):
        missing = [] if example_inputs or example_kwargs else _required_args(model_or_gm)
        if missing:
            raise TypeError(
                "normpass.explain: an nn.Module is captured with torch.export, which runs it on example "
                f"inputs: give them, as in explain(model, {', '.join(missing)})"
            )
        ep = torch.export.export(
            model_or_gm, tuple(example_inputs), kwargs=example_kwargs or None, strict=False
        )
        gm = ep.graph_module
    else:
        raise TypeError(
            f"normpass.explain: expected an nn.Module, GraphModule or ExportedProgram, got "
            f"{type(model_or_gm).__name__}"
        )
    _, rep = rewrite(gm, policy, p=p, registry=registry, report=True)
    return rep


def _required_args(module: torch.nn.Module) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = inspect.signature(module.forward).parameters.values()
    return [q.name for q in params if q.kind in kinds and q.default is inspect.Parameter.empty]


def _has_meta(gm: fx.GraphModule) -> bool:
    return any(k in n.meta for n in gm.graph.nodes for k in ("val", "example_value", "tensor_meta"))


def register_pattern(
    name: str,
    match: Callable | None = None,
    *,
    anchors: Sequence[str] | None = None,
    kind: Literal["rms", "layer"] | None = None,
    checks: Sequence[CheckFn] = (),
    replacement: ReplaceFn | None = None,
    registry: PatternRegistry | None = None,
    replace: bool = False,
) -> Pattern:
    """Teach normpass a normalization form. Idempotent; scoped to `registry` or the current one.

    Two ways to say what to find:
    - a template: `match` is a plain function of tensors written with torch ops, e.g.
      `lambda x, weight, eps: x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight`, and
      `kind` is "rms" or "layer". Its arguments named `x` (or `input`), `weight`, `bias` and `eps` bind
      to the site's input, parameters and eps; it is canonicalized like the graph, so spellings that
      mean the same (x*x vs pow, casts, div vs mul) match. The site becomes the normpass op the policy
      picks, unless `replacement` is given.
    - a search function: `match(term, matcher) -> Site | None` over the canonical view (see
      normpass.passes.canonical, normpass.passes.match), raising `Reject(form, reason)` for a
      look-alike to report; `anchors` lists the canonical ops it starts from.
    checks: functions `(site) -> reason or None`; a reason leaves the site alone (and is reported).
    replacement: `(graph, site) -> node` building the replacement before site.output.

    Example:
        >>> with normpass.PatternRegistry() as reg:
        ...     normpass.register_pattern("scaled_rms", lambda x, weight, eps:
        ...         x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight * 2.0, kind="rms",
        ...         replacement=lambda g, site: ...)
    """
    registry = registry if registry is not None else current_registry()
    if match is None:
        raise TypeError("normpass.register_pattern: give a template function or a search function as `match`")
    if kind is not None:
        pattern = template_pattern(name, match, kind=kind, checks=tuple(checks), replacement=replacement)
    else:
        if not anchors:
            raise TypeError(
                "normpass.register_pattern: a search function needs `anchors` (canonical op names); "
                "for a template function pass kind='rms' or kind='layer'"
            )
        pattern = Pattern(name, match, tuple(anchors), "user", tuple(checks), replacement)
    return registry.register(pattern, replace=replace)
