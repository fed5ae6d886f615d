"""Hand-written LayerNorm (PATTERNS.md L1-L4), one pattern over the canonical view.

    y = (x - mean(x)) * rsqrt(var(x) + eps)     [then casts, weight, bias; or w * (x - mean(x)) * ...]

where the biased variance is spelled `mean((x - u)^2)` (L1), `var_mean(..., correction=0)` (L2) or
`var(..., unbiased=False)` (L3). Mean and variance must reduce the same trailing dims; an unbiased
variance, or statistics over other dims (L4 channels-first, BatchNorm-like), are left alone with the
reason.

L4 (ConvNeXt's LayerNorm2d, statistics over dim 1 of NCHW) is a LayerNorm, but normpass ops normalize
the trailing dims: the rewrite would be movedim(1, -1) -> op -> movedim(-1, 1) with the weight's
[:, None, None] view undone, two transposing copies around a memory-bound op. It is left alone, and
the report says so.
"""

from __future__ import annotations

from typing import Any

from normpass.passes import meta
from normpass.passes.canonical import Term, strip
from normpass.passes.match import Matcher, NoMatch, Reject, Site
from normpass.patterns.common import check_dims, dtype_expr, finish, stat_and_eps, weight_inside


def _same(m: Matcher, a: Any, b: Any) -> bool:
    """Same value, up to exact upcasts and repeated `x - u` nodes."""
    a, b = m.upcast_root(a), m.upcast_root(b)
    if a is b:
        return True
    if isinstance(a, Term) and isinstance(b, Term) and a.op == b.op == "sub":
        m.nodes.update(a.nodes + b.nodes)
        return _same(m, a.args[0], b.args[0]) and _same_mean(m, a.args[1], b.args[1])
    return False


def _same_mean(m: Matcher, a: Any, b: Any) -> bool:
    """The same node, or repeated `x.mean(...)` nodes of the same value (no casts between: a mean of
    an upcast x is another value)."""
    a, b = m.unalias(a), m.unalias(b)
    if a is b:
        return True
    if not (isinstance(a, Term) and isinstance(b, Term) and a.op == b.op == "mean"):
        return False
    if not _same_mean(m, a.args[0], b.args[0]):
        return False
    same = _same_dims(a.attrs["dims"], b.attrs["dims"], m.unalias(a.args[0])) and (
        a.attrs["keepdim"] == b.attrs["keepdim"]
    )
    means = " and ".join(f"over dims {t.attrs['dims']} (keepdim={t.attrs['keepdim']})" for t in (a, b))
    if same is None:
        raise Reject(
            "L1 two-pass",
            f"x is centered by two means ({means}); the graph does not record the input's rank to "
            "tell whether they are the same; pass example_inputs",
        )
    if not same:
        raise Reject("look-alike: mismatched dims", f"x is centered by two different means of it: {means}")
    m.nodes.update(a.nodes + b.nodes)
    return True


def match_layernorm(t: Term, m: Matcher) -> Site | None:
    """Anchor: mul(x - u, rsqrt(var + eps)) with u the mean and var the biased variance of x."""
    rsqrt, centered = m.split(t, "rsqrt")

    # x - u with u a mean (or var_mean's): of two differences in a product, the centered one
    def is_centered(a: Any) -> bool:
        return m.is_op(a, "sub") and m.is_op(strip(a).args[1], "mean", "getitem")

    centered, inner = weight_inside(m, centered, is_centered)
    centered = m.take(centered, "sub")
    h, u = centered.args
    stat, eps = stat_and_eps(m, rsqrt)
    stat = m.unalias(stat)
    if stat.op == "getitem":  # L2: var_mean(h)[0], and u = var_mean(h)[1]
        vm = m.take(m.take(stat, "getitem").args[0], "var_mean")
        if stat.attrs["index"] != 0 or not (m.is_op(u, "getitem") and m.unalias(u).args[0] is vm):
            raise NoMatch
        m.take(u, "getitem")
        form, hv, dims, keepdim, correction = (
            "L2 var_mean",
            vm.args[0],
            vm.attrs["dims"],
            vm.attrs["keepdim"],
            vm.attrs["correction"],
        )
        mean_dims = dims
    else:
        mean = m.take(u, "mean")
        mean_dims = mean.attrs["dims"]
        if not _same(m, mean.args[0], h):
            raise NoMatch
        if not mean.attrs["keepdim"]:
            raise Reject("look-alike: mean without keepdim", "the mean is reduced without keepdim")
        if stat.op == "var":  # L3
            m.take(stat, "var")
            form, hv, dims, keepdim, correction = (
                "L3 var",
                stat.args[0],
                stat.attrs["dims"],
                stat.attrs["keepdim"],
                stat.attrs["correction"],
            )
        else:  # L1: mean((h - u)^2)
            var = m.take(stat, "mean")
            sq = m.take(var.args[0], "square")
            if not _same(m, sq.args[0], centered):
                raise NoMatch
            form, hv, dims, keepdim, correction = "L1 two-pass", h, var.attrs["dims"], var.attrs["keepdim"], 0
    if not _same(m, hv, h):
        raise NoMatch
    if correction != 0:
        raise Reject(
            "look-alike: unbiased var",
            f"unbiased variance (correction={correction:g}); LayerNorm divides by n, not n - 1",
        )
    same = _same_dims(mean_dims, dims, m.unalias(h))
    if same is None:
        raise Reject(
            form,
            f"mean over dims {mean_dims}, variance over dims {dims}: the graph does not record the "
            "input's rank to tell whether they are the same; pass example_inputs",
        )
    if not same:
        raise Reject(
            "look-alike: mismatched dims", f"mean over dims {mean_dims} but variance over dims {dims}"
        )
    k = check_dims(form, dims, keepdim, m.unalias(h))
    m.nodes.add(t.node)
    core = dtype_expr(m.unalias(h))  # (x - u) has x's dtype
    return finish(
        m, kind="layer", form=form, normalized=t, x=h, k=k, eps=eps, core_dtype=core, inner_weight=inner
    )


def _same_dims(a: tuple | None, b: tuple | None, x: Term) -> bool | None:
    """Whether reductions over dims a and b of x reduce the same dims; None when only x's rank,
    which the graph does not record, could tell (-1 and 2, say)."""
    if a is None or b is None:
        return a == b
    if set(a) == set(b):
        return True
    ndim = meta.ndim(x.node) if x.node is not None else None
    if ndim is None:
        mixed = any(d >= 0 for d in (*a, *b)) and any(d < 0 for d in (*a, *b))
        return None if mixed and len(set(a)) == len(set(b)) else False
    return {d % ndim for d in a} == {d % ndim for d in b}
