"""What every hand-written norm shares once its statistics are matched: the affine epilogue.

After `normalized = (x - mean) * rsqrt(var + eps)` a model may cast, multiply by a weight (or by
`1 + w`), add a bias and cast again, in any of the orders seen in PATTERNS.md. `finish` walks those
steps forward from the normalized value, one single-use node at a time, and stops at the first step
that is not one of them; whatever it stops on stays in the graph, so a normalized value that is also
used elsewhere is kept (the op then computes that value, without the affine part).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from normpass.passes import meta
from normpass.passes.canonical import Term
from normpass.passes.match import Matcher, NoMatch, Reject, Site, real_users


def dtype_expr(t: Any) -> meta.DtypeExpr:
    """The dtype of a term's value: from metadata, else from the cast or arithmetic that made it, else
    DtypeOf(node). (Only nodes the rewrite keeps may appear in it: inputs, weights.)"""
    if not isinstance(t, Term) or t.node is None:
        raise NoMatch
    known = meta.dtype(t.node)
    if known is not None:
        return known
    if t.op == "cast":
        return t.attrs["dtype"]
    if t.op == "alias":
        return dtype_expr(t.args[0])
    if t.op in ("add", "mul", "sub"):
        tensors = [a for a in t.args if isinstance(a, Term)]  # Python scalars do not promote floats
        out = dtype_expr(tensors[0])
        for a in tensors[1:]:
            out = meta.promote(out, dtype_expr(a))
        return out
    return meta.DtypeOf(t.node)


def check_dims(form: str, dims: tuple | None, keepdim: bool, x: Term) -> int:
    """k, when `dims` are the last k dims of x reduced with keepdim; else Reject with the reason."""
    ndim = meta.ndim(x.node) if x.node is not None else None
    k = Matcher.trailing_dims(dims, ndim)
    if k is None:
        norm = tuple(d % ndim for d in dims) if dims and ndim else dims
        if not dims:
            raise Reject(f"look-alike: {form}", "statistics over all dims, not the trailing dims")
        if norm and 0 in norm and ndim and ndim > 1:
            raise Reject(
                f"look-alike: {form}", f"statistics over dims {dims} include the batch dim 0 (BatchNorm-like)"
            )
        if norm == (1,) and ndim == 4:
            raise Reject(
                "L4 channels-first",
                "statistics over dim 1 of an NCHW tensor; normpass ops normalize "
                "trailing dims, and a movedim round trip would cost two copies",
            )
        raise Reject(f"look-alike: {form}", f"statistics over dims {dims}, not the trailing dims")
    if not keepdim:
        raise Reject(f"look-alike: {form}", "statistics reduced without keepdim broadcast over other dims")
    return k


def _weight(m: Matcher, t: Any, k: int, x: fx.Node, seen: set[fx.Node]) -> tuple[fx.Node, float, Any] | None:
    """A weight factor: w, an exact upcast of w, or `w + c` (Gemma's 1 + w) -> (w, c, factor term).

    A probe, as Matcher.param: nothing is recorded in m unless the factor is a weight.
    """
    probe = Matcher(m.view)
    factor = probe.unalias(t)
    offset, base = 0.0, factor
    if isinstance(factor, Term) and factor.op == "add" and factor.node is not None:
        a, b = factor.args
        if isinstance(b, (int, float)) and isinstance(a, Term):
            offset, base = float(b), a
        elif isinstance(a, (int, float)) and isinstance(b, Term):
            offset, base = float(a), b
    inner = Matcher(m.view)
    root = inner.upcast_root(base)
    found = inner.param(root, k, x, seen)
    if found is None and root is not base:  # an upcast we cannot prove exact: keep it as the weight
        found = inner.param(base, k, x, seen)
    if found is None:
        return None
    # `1 + w` and upcasts of w are weight-side: removed with the site when nothing else uses them.
    m.keep.update(probe.nodes | inner.keep | inner.nodes)
    if factor is not base:
        m.keep.update(factor.nodes)
    return found[0], offset, factor


def weight_inside(m: Matcher, t: Any, is_core: Callable[[Any], bool]) -> tuple[Any, Any]:
    """(t, None) when is_core(t); for t = a * b with is_core(a): (a, b), b a factor the model applied
    before normalizing (`w * x * rsqrt(...)`, `w * (x - u) / sqrt(...)`), which `finish` takes as the
    weight. Else NoMatch."""
    if is_core(t):
        return t, None
    if m.is_op(t, "mul"):
        mul = m.unalias(t)
        for a, b in (mul.args, mul.args[::-1]):
            if is_core(a):
                m.take(t, "mul")
                return a, b
    raise NoMatch


def finish(
    m: Matcher,
    *,
    kind: str,
    form: str,
    normalized: Term,
    x: Any,
    k: int,
    eps: float | fx.Node,
    core_dtype: meta.DtypeExpr,
    inner_weight: Any = None,
) -> Site:
    """The Site for a matched core `normalized` (a node) over input term `x`, with its epilogue.
    `inner_weight`: a factor of the core product (`weight_inside`); it must be a weight."""
    x = m.upcast_root(x)
    xnode = Matcher.node_of(x)
    cur = Matcher.node_of(normalized)
    dt: meta.DtypeExpr = core_dtype
    weight = bias = None
    offset = 0.0
    if inner_weight is not None:
        found = _weight(m, inner_weight, k, xnode, m.nodes | {xnode})
        if found is None:
            raise Reject(
                "look-alike: scaled input",
                "x is multiplied, before the statistics' scale, by a factor that is no weight of the "
                "normalized shape (or whose shape the graph does not record: pass example_inputs)",
            )
        weight, offset, factor = found
        dt = meta.promote(dt, dtype_expr(factor))
    while True:
        users = real_users(cur)
        if len(users) != 1:
            break
        t = m.view[users[0]]
        if t.op == "alias" or (t.op == "cast" and isinstance(t.attrs["dtype"], (torch.dtype, meta.DtypeOf))):
            if t.op == "cast":
                dt = t.attrs["dtype"]
        elif t.op in ("mul", "add") and len(t.args) == 2:
            others = [a for a in t.args if not (isinstance(a, Term) and a.node is cur)]
            if len(others) != 1:
                break
            seen = m.nodes | {users[0], xnode}  # the norm's own input is no parameter of it
            if t.op == "mul" and weight is None and bias is None:
                found = _weight(m, others[0], k, xnode, seen)
                if found is None:
                    break
                weight, offset, factor = found
                dt = meta.promote(dt, dtype_expr(factor))
            elif t.op == "add" and bias is None:
                found = m.param(others[0], k, xnode, seen)
                if found is None:
                    break
                bias, term = found
                dt = meta.promote(dt, dtype_expr(term))
            else:
                break
        else:
            break
        m.nodes.update(t.nodes)
        cur = users[0]
    out_dtype = meta.dtype(cur) or dt
    return Site(
        kind=kind,
        form=form,
        input=xnode,
        output=cur,
        weight=weight,
        bias=bias,
        eps=eps,
        normalized_ndim=k,
        out_dtype=out_dtype,
        nodes=set(m.nodes) | {cur},
        keep=set(m.keep),
        weight_offset=offset,
    )


def stat_and_eps(m: Matcher, rsqrt: Term) -> tuple[Term, float | fx.Node]:
    """(statistic, eps) from rsqrt(stat + eps) or rsqrt(stat): the root of both families."""
    arg = m.unalias(rsqrt.args[0])
    if isinstance(arg, Term) and arg.op == "add":
        a, b = arg.args
        for stat, eps in ((a, b), (b, a)):
            if isinstance(stat, Term) and m.is_op(stat, "mean", "var", "getitem"):
                try:
                    e = m.eps(eps)
                except NoMatch:
                    continue
                m.take(arg, "add")
                return stat, e
        raise NoMatch
    return arg, 0.0
