"""Norm look-alikes that are not the same function (PATTERNS.md), found so the report can say why
they were left alone. Their statistics-side cousins (unbiased variance, other dims, keepdim) are
refused inside the RMSNorm/LayerNorm patterns themselves.
"""

from __future__ import annotations

from normpass.passes.canonical import Term, strip
from normpass.passes.match import Matcher, NoMatch, Reject, Site


def match_eps_outside(t: Term, m: Matcher) -> Site | None:
    """Anchor: x * reciprocal(root + eps), the root being sqrt(...), std(...) or a vector norm."""
    recip, _ = m.split(t, "reciprocal")
    denom = m.unalias(recip.args[0])
    if m.is_op(denom, "clamp_min") and m.is_op(m.unalias(denom).args[0], "vector_norm"):
        raise Reject(
            "look-alike: F.normalize",
            "divides by max(||x||, eps): the norm is clamped at eps, not computed with eps inside the root",
        )
    if not m.is_op(denom, "add"):
        raise NoMatch
    for root in denom.args:
        root = strip(root, ("alias", "cast"))  # decomposed graphs cast around it
        if m.is_op(root, "sqrt", "std", "vector_norm"):
            extra = ""
            moments = root if root.op == "std" else m.unalias(root.args[0]) if root.args else None
            if (
                isinstance(moments, Term)
                and moments.op in ("std", "var")
                and moments.attrs["correction"] != 0
            ):
                extra = f", and the std is unbiased (correction={moments.attrs['correction']:g})"
            raise Reject(
                "look-alike: eps outside the root",
                f"divides by ({root.op} + eps): eps is added outside the root, not inside it{extra}",
            )
    raise NoMatch


def match_normalize_call(t: Term, m: Matcher) -> Site | None:
    """Anchor: F.normalize(x, dim=-1) (usually then * sqrt(n) * w)."""
    raise Reject(
        "look-alike: F.normalize",
        "divides by max(||x||, eps): the norm is clamped at eps, not computed with eps inside the root",
    )
