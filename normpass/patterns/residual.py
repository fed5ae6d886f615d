"""The fused residual add (PATTERNS.md): h = x + r; y = norm(h); h used again downstream.

Any site whose input is such an add becomes add_rms_norm / add_layer_norm(x, r, ...) -> (y, sum), and
every other use of h takes `sum`. It needs the graph's metadata: x, r and h must provably have the
same shape (no broadcasting) and dtype, but for autocast's fp32 + 16-bit -> fp32 (the op widens the
16-bit operand as the promotion does), and no other use of h may come before the norm.
"""

from __future__ import annotations

import torch
from torch import fx

from normpass import reference
from normpass.passes import meta
from normpass.passes.canonical import Term, View
from normpass.passes.match import Site, real_users


def aliases_of(h: fx.Node, view: View) -> list[fx.Node]:
    """h's no-op aliases, and theirs: ATen keeps `h.to(h.dtype)` and routes later uses of h through it
    (Mamba, fp32: the stream cast to the norm's dtype, the norm's `.to(float32)` of that, then the
    residual's `.to(float32)` of that). Only aliases of h's shape: an `expand` is a use of h."""
    shape = meta.shape(h)
    found: list[fx.Node] = []
    todo = [h]
    while todo:
        for u in real_users(todo.pop()):
            same = shape is not None and meta.same_shape(meta.shape(u), shape)
            if view[u].op == "alias" and same and u not in found:
                found.append(u)
                todo.append(u)
    return found


def later_uses(site: Site, aliases: list[fx.Node]) -> list[tuple[fx.Node, fx.Node]]:
    """(user, value) for each use of h = site.input, or of one of its `aliases` (aliases_of), that
    outlives the site: the fused op's `sum` replaces the value there. Uses that go away with the site
    are not listed: its own nodes, the aliases themselves, and input-side casts only the site uses."""
    values = [site.input, *aliases]
    known: dict[fx.Node, bool] = {}

    def dies(u: fx.Node) -> bool:
        # An input-side node dies when all its users do (a cast of h that a later norm also reads
        # through an alias of its own does not).
        if u not in known:
            known[u] = u in site.nodes or u in aliases or (u in site.keep and all(map(dies, real_users(u))))
        return known[u]

    return [(u, v) for v in values for u in real_users(v) if not dies(u)]


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
    dtypes = (meta.dtype(x), meta.dtype(r), meta.dtype(h))
    if None in dtypes:
        return None
    if len(set(dtypes)) != 1:
        # Autocast's residual add: the fp32 stream plus a 16-bit projection, promoted to fp32. The op
        # takes the fp32 operand as its input and widens the other exactly, as the promotion does.
        if meta.dtype(r) == torch.float32:
            x, r = r, x
        if not (meta.dtype(h) == meta.dtype(x) and reference.is_16_bit_of_fp32(meta.dtype(x), meta.dtype(r))):
            return None
    if not (meta.same_shape(meta.shape(x), meta.shape(h)) and meta.same_shape(meta.shape(r), meta.shape(h))):
        return None
    # h's surviving uses will read the op's `sum`, so they must come after the op (an `h.dtype` read
    # will read x's instead, the same dtype, wherever it is).
    at = order[site.output]
    uses = later_uses(site, aliases_of(h, view))
    if any(view[u].op != "dtype_of" and order.get(u, at) < at for u, _ in uses):
        return None
    return x, r
