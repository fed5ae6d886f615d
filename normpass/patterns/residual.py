"""The fused residual add (PATTERNS.md): h = x + r; y = norm(h); h used again downstream.

Any site whose input is such an add becomes add_rms_norm / add_layer_norm(x, r, ...) -> (y, sum), and
every other use of h takes `sum`. It needs the graph's metadata: x, r and h must provably have the
same shape and dtype (no broadcasting, no promotion), and no other use of h may come before the norm.
"""

from __future__ import annotations

from torch import fx

from normpass.passes import meta
from normpass.passes.canonical import Term, View
from normpass.passes.match import Site, real_users


def match_residual(site: Site, view: View, order: dict[fx.Node, float]) -> tuple[fx.Node, fx.Node] | None:
    """(x, r) when site.input is a fusable x + r, else None."""
    h = site.input
    t = view[h]
    if t.op != "add" or t.node is not h:
        return None
    a, b = t.args
    if not all(isinstance(v, Term) and v.node is not None for v in (a, b)):
        return None
    x, r = a.node, b.node
    dtypes = {meta.dtype(x), meta.dtype(r), meta.dtype(h)}
    if None in dtypes or len(dtypes) != 1:
        return None
    if not (meta.same_shape(meta.shape(x), meta.shape(h)) and meta.same_shape(meta.shape(r), meta.shape(h))):
        return None
    at = order[site.output]
    inside = site.nodes | site.keep

    def removed(u: fx.Node) -> bool:
        # Goes away with the site (part of it, or an input-side cast only it used), or is retargeted by
        # the rewriter: a no-op alias of h (ATen keeps `h.to(h.dtype)` and routes h's later uses through
        # it) now reads `sum`, and an `h.dtype` read now reads x's (the same dtype).
        if u in site.nodes or view[u].op in ("alias", "dtype_of"):
            return True
        return u in site.keep and all(v in inside for v in real_users(u))

    # h's surviving uses will read the op's `sum`, so they must come after the op.
    if any(not removed(u) and order.get(u, at) < at for u in real_users(h)):
        return None
    return x, r
