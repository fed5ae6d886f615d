"""The pass: one walk over each graph, trying the patterns anchored at each node's canonical op.

Matching and rewriting interleave: a site is rewritten as soon as it is found, so later anchors see
the graph as it now is (the nodes a rewrite removed are gone, the view forgets what changed). Each node
is canonicalized once and each pattern looks at a bounded neighbourhood of its anchor, so the pass
is linear in the graph's size.
"""

from __future__ import annotations

import warnings

from torch import fx

from normpass.passes import meta
from normpass.passes.canonical import View, writes_in_place
from normpass.passes.match import Matcher, NoMatch, Reject, Site, is_check, real_users
from normpass.passes.registry import PatternRegistry
from normpass.passes.report import Report, Row, locate
from normpass.passes.rewriter import RewriteFailed, Rewriter, check_policy, plan


def _escape(site: Site) -> str | None:
    """Why the site cannot be replaced: an intermediate it removes is used elsewhere, or None."""
    inside = site.nodes | site.keep
    for node in site.nodes:
        if node is site.output or node in site.keep:
            continue
        for user in real_users(node):
            if user not in inside:
                return (
                    f"intermediate {node.name} is also used by {user.name}; the fused op would not produce it"
                )
    for arg in (site.input, site.weight, site.bias, site.eps, site.low_precision_input):
        if isinstance(arg, fx.Node) and arg in site.nodes:
            return f"{arg.name} is both an input of the norm and part of it"
    return None


def _reshaped(site: Site) -> str | None:
    """Why the site cannot be replaced: its output has another shape than its input (an `expand` of
    the input seen through as a view, or a weight that broadcasts to more dims), or None. The ops
    keep their input's shape."""
    before, after = meta.shape(site.input), meta.shape(site.output)
    if before is None or after is None or meta.same_shape(before, after):
        return None
    return f"the output's shape {tuple(after)} is not the input's {tuple(before)} (a broadcast operand)"


def _mutated(site: Site) -> str | None:
    """Why the site cannot be replaced: a node between its first computation and its output writes
    a tensor in place (the op goes in at the output, so it would read what the write left), or None."""
    pending = {n for n in site.nodes | site.keep if n.op.startswith("call_")} - {site.output}
    node = site.output.prev
    while pending and node.op != "root":
        pending.discard(node)
        if node not in site.nodes and writes_in_place(node):
            return f"{node.name} writes a tensor in place inside the norm; the fused op would read it after"
        node = node.prev
    return None


def _graphs(gm: fx.GraphModule) -> list[tuple[str, fx.GraphModule]]:
    """The root graph and subgraphs (higher-order ops such as export's autocast regions)."""
    return [(name, mod) for name, mod in gm.named_modules() if isinstance(mod, fx.GraphModule)]


def run(gm: fx.GraphModule, policy: str, p: float | None, registry: PatternRegistry) -> Report:
    p = check_policy(policy, p)
    report = Report(policy)
    for name, sub in _graphs(gm):
        _run_graph(sub, policy, p, registry, report, prefix=f"{name}/" if name else "")
        sub.recompile()
    return report


def _run_graph(
    gm: fx.GraphModule, policy: str, p: float, registry: PatternRegistry, report: Report, prefix: str
) -> None:
    view = View(gm)
    rewriter = Rewriter(gm, view, policy, p)
    for node in list(gm.graph.nodes):
        if node in rewriter.erased or node.op in ("placeholder", "output", "get_attr") or is_check(node):
            continue
        term = view[node]
        rejected: Reject | None = None
        for pattern in registry.for_anchor(term.op):
            m = Matcher(view)
            try:
                site = pattern.match(term, m)
            except NoMatch:
                continue
            except Reject as r:
                rejected = rejected or r
                continue
            except Exception as e:  # a broken pattern must not break the user's compile: skip, and say so
                msg = f"normpass: pattern {pattern.name!r} failed on node {node.name}: {e!r}"
                warnings.warn(msg, stacklevel=2)
                rejected = rejected or Reject(pattern.name, f"the pattern failed: {e!r}")
                continue
            if site is None:
                continue
            where, source = locate(site.output, prefix)
            checks = (_escape, _reshaped, _mutated, *pattern.checks)
            reason = next((r for c in checks if (r := c(site))), None)
            if reason is not None:
                report.rows.append(Row(where, source, site.form, "left alone", None, reason, node.name))
                break
            try:
                op = rewriter.apply(site, pattern.replacement)
            except RewriteFailed as e:  # nor a failing replacement: the graph is as it was; the row says why
                warnings.warn(f"normpass: rewriting {site.form!r} at {node.name} failed: {e}", stacklevel=2)
                reason = f"the rewrite failed: {e}"
                report.rows.append(Row(where, source, site.form, "left alone", None, reason, node.name))
                break
            why = "custom replacement" if pattern.replacement else _why(site, op, policy, p)
            report.rows.append(Row(where, source, site.form, "rewritten", op, why, node.name))
            break
        else:
            if rejected is not None:
                where, source = locate(node, prefix)
                report.rows.append(
                    Row(where, source, rejected.form, "left alone", None, rejected.reason, node.name)
                )


def _why(site: Site, op: str, policy: str, p: float) -> str:
    reason = plan(site, policy, p).reason
    if op.startswith("normpass.add_"):
        reason += "; residual add fused (h = x + r used downstream takes the op's sum)"
    if not isinstance(site.eps, float):
        reason += "; eps passed through as a runtime scalar"
    if meta.resolve(site.out_dtype) is None and site.out_dtype != meta.DtypeOf(site.input):
        reason += "; output dtype computed at run time"
    return reason
