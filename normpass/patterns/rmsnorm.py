"""Hand-written RMSNorm (PATTERNS.md R1-R6), one pattern over the canonical view.

    y = x * rsqrt(mean(x^2, trailing dims, keepdim) + eps)     [then casts, weight or (1 + w), bias]

(the weight may also come first: `w * x * rsqrt(...)`).

The canonical view already folds the spellings (pow/square/x*x, sqrt+div vs rsqrt+mul, .to/.float/
.type_as, methods vs functions), so R1 (Llama upcast/downcast), R2 (T5: statistics on the fp32 copy,
product with the original), R3 (Gemma's 1 + w in fp32), R4 (no casts), R5 (no weight, or a bias) and
R6 (per-head norms on a view) are all this one walk; the form label says which one was seen.
"""

from __future__ import annotations

from normpass.passes import meta
from normpass.passes.canonical import Term
from normpass.passes.match import Matcher, Site
from normpass.patterns.common import check_dims, dtype_expr, finish, stat_and_eps, weight_inside


def match_rmsnorm(t: Term, m: Matcher) -> Site | None:
    """Anchor: mul(h, rsqrt(mean(square(h)) + eps))."""
    rsqrt, h = m.split(t, "rsqrt")
    stat, eps = stat_and_eps(m, rsqrt)
    mean = m.take(stat, "mean")
    sq = m.take(mean.args[0], "square")
    hs = sq.args[0]

    def is_core(a: object) -> bool:  # h itself; a centered h is the LayerNorm pattern's
        return isinstance(a, Term) and not m.is_op(a, "sub") and m.upcast_root(a) is m.upcast_root(hs)

    h, inner = weight_inside(m, h, is_core)
    upcast_h, upcast_stats = m.is_cast(h), m.is_cast(hs)
    core = meta.promote(dtype_expr(m.unalias(h)), dtype_expr(m.unalias(hs)))
    k = check_dims("RMS-like", mean.attrs["dims"], mean.attrs["keepdim"], m.unalias(hs))
    m.nodes.add(t.node)
    site = finish(
        m, kind="rms", form="", normalized=t, x=hs, k=k, eps=eps, core_dtype=core, inner_weight=inner
    )
    site.form = _form(site, upcast_h=upcast_h, upcast_stats=upcast_stats)
    return site


def _form(site: Site, *, upcast_h: bool, upcast_stats: bool) -> str:
    if site.weight is not None and site.weight_offset:
        return "R3 gemma 1+w"
    if upcast_stats and not upcast_h:
        return "R2 t5 fp32 stats"
    if site.bias is not None:
        return "R5 weight+bias"
    if upcast_stats:
        return "R1 llama upcast"
    return "R4 no casts" if site.weight is not None else "R5 no weight"
