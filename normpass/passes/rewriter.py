"""Replacing one matched site by the normpass op its policy picks."""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
from torch import fx

from normpass.passes import meta
from normpass.passes.match import Site, is_check, real_users

ops = torch.ops.normpass
POLICIES = ("fuse", "low_precision", "rmsnorm", "prmsnorm")
PRMS_P = 0.0625  # the "prmsnorm" policy's default partial fraction, the RMSNorm paper's


def check_policy(policy: str, p: float | None, who: str = "normpass") -> float:
    """The partial fraction `policy` uses (PRMS_P where p is None). ValueError for an unknown policy,
    a p outside (0, 1], or a p given to a policy other than "prmsnorm" (which would ignore it)."""
    if policy not in POLICIES:
        raise ValueError(f"{who}: unknown policy {policy!r}; valid policies are {POLICIES}")
    if p is None:
        return PRMS_P
    if policy != "prmsnorm":
        raise ValueError(f"{who}: p is the partial fraction of policy 'prmsnorm'; policy {policy!r} has none")
    if not (0 < p <= 1):
        raise ValueError(f"{who}: p must be in (0, 1], got {p}")
    return p


class RewriteFailed(Exception):
    """Building a site's replacement failed; what it added was erased, so the graph is as it was."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a site becomes: which op, with which p, and why that is allowed."""

    center: bool
    p: float
    low_precision: bool
    reason: str


def plan(site: Site, policy: str, p: float) -> Plan:
    layer = site.kind == "layer"
    if policy == "rmsnorm" and layer:
        return Plan(
            False,
            1.0,
            False,
            "policy rmsnorm: LayerNorm -> RMSNorm (no mean-centering; same weight and bias)",
        )
    if policy == "prmsnorm":
        what = "LayerNorm" if layer else "RMSNorm"
        return Plan(False, p, False, f"policy prmsnorm: {what} -> partial RMSNorm (p={p:g})")
    if policy == "low_precision" and site.low_precision_input is not None:
        dt = str(meta.dtype(site.low_precision_input)).removeprefix("torch.")
        return Plan(
            layer, 1.0, True, f"policy low_precision: autocast LayerNorm with {dt} IO instead of fp32"
        )
    return Plan(layer, site.p, False, "same function, fp32 accumulation")


def _default_out(input: fx.Node, out: meta.DtypeExpr) -> bool:
    """Whether the op's default output dtype (its input's) is `out`."""
    known_out, known_in = meta.resolve(out), meta.dtype(input)
    if known_out is not None and known_in is not None:
        return known_out == known_in
    return out == meta.DtypeOf(input)


def _fake(node: fx.Node, key: str) -> None:
    """Record the node's example value under `key`, computed with the graph's fake mode."""
    args = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
    vals = [meta.value(a) for a in args]
    if any(v is None for v in vals):
        return
    leaves = torch.utils._pytree.tree_leaves(vals)
    modes = {getattr(v, "fake_mode", None) for v in leaves if isinstance(v, torch.Tensor)}
    mode = modes.pop() if len(modes) == 1 else None
    if mode is None:
        return  # no single fake mode (e.g. real parameters next to fake activations): leave no value

    def val(a: Any) -> Any:
        return meta.value(a) if isinstance(a, fx.Node) else a

    with mode, torch.no_grad():  # metadata only: skip the ops' autograd wrapper
        node.meta[key] = node.target(
            *torch.fx.node.map_aggregate(node.args, val), **torch.fx.node.map_aggregate(node.kwargs, val)
        )


class Rewriter:
    """Applies sites to one graph, keeping the graph's node order known for the residual check."""

    def __init__(self, gm: fx.GraphModule, view, policy: str, p: float) -> None:
        self.graph, self.view, self.policy, self.p = gm.graph, view, policy, p
        self.order: dict[fx.Node, float] = {n: float(i) for i, n in enumerate(self.graph.nodes)}
        self.erased: set[fx.Node] = set()
        self.aten = any(
            isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "aten"
            for n in self.graph.nodes
        )

    def _insert(self, target, args, kwargs=None, *, like: fx.Node, key: str | None) -> fx.Node:
        node = self.graph.call_function(target, tuple(args), kwargs or {})
        self.order[node] = self.order[like] - 0.5
        for k in ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node"):
            if k in like.meta:
                node.meta[k] = like.meta[k]
        if key is not None:
            _fake(node, key)
        return node

    def apply(self, site: Site, replacement=None) -> str:
        """Rewrite the site; returns the name of the op now computing it.

        If building the replacement fails (a user replacement raising, an op's checks refusing its
        arguments), the nodes it added are erased and RewriteFailed is raised: the graph is as it was.
        A failed build that also changed nodes already in the graph cannot be undone: its error
        propagates as it is.
        """
        pl = plan(site, self.policy, self.p)
        key = next((k for k in ("val", "example_value") if k in site.output.meta), None)
        existing = set(self.graph.nodes)
        try:
            with self.graph.inserting_before(site.output):
                if replacement is not None:
                    new, total, name = self._build_custom(site, replacement, key)
                else:
                    new, total, name = self._build_op(site, pl, key)
        except Exception as e:
            self._undo_build(existing, e)
            raise RewriteFailed(repr(e)) from e
        if pl.low_precision and self.aten:
            self._keep_fp32_users(site, new, key)
        self._replace(site, new, total)
        return name

    def _build_custom(self, site: Site, replacement, key: str | None) -> tuple[fx.Node, None, str]:
        new = replacement(self.graph, site)
        self.order[new] = self.order[site.output] - 0.5
        if key is not None:
            _fake(new, key)
        return new, None, getattr(new.target, "__name__", str(new.target))

    def _build_op(self, site: Site, pl: Plan, key: str | None) -> tuple[fx.Node, fx.Node | None, str]:
        """The normpass op (its residual-add form where the add before the norm can be fused):
        (output node, node of the sum or None, op name)."""
        from normpass.patterns.residual import match_residual

        weight = self.graph.get_attr(site.weight) if isinstance(site.weight, str) else site.weight
        bias = self.graph.get_attr(site.bias) if isinstance(site.bias, str) else site.bias
        weight, bias = (self._normalized_shape(t, site, key) for t in (weight, bias))
        input = site.low_precision_input if pl.low_precision else site.input
        kw: dict[str, Any] = {}
        if site.normalized_ndim != 1:
            kw["normalized_ndim"] = site.normalized_ndim
        if site.weight_offset:
            kw["weight_offset"] = site.weight_offset
        if not pl.center and pl.p != 1.0:
            kw["p"] = pl.p
        if not pl.low_precision and not _default_out(input, site.out_dtype):
            kw["out_dtype"] = meta.emit(self.graph, site.out_dtype)
        # The schemas: layer_norm(x, weight, bias, eps), rms_norm(x, weight, eps, bias=None).
        if pl.center:
            params = (weight, bias, site.eps)
        else:
            params = (weight, site.eps) if bias is None else (weight, site.eps, bias)
        like = site.output
        residual = match_residual(site, self.view, self.order)
        if residual is None:
            target = ops.layer_norm.default if pl.center else ops.rms_norm.default
            new = self._insert(target, (input, *params), kw, like=like, key=key)
            return new, None, str(target.overloadpacket)
        target = ops.add_layer_norm.default if pl.center else ops.add_rms_norm.default
        fused = self._insert(target, (*residual, *params), kw, like=like, key=key)
        new = self._insert(operator.getitem, (fused, 0), like=like, key=key)
        total = self._insert(operator.getitem, (fused, 1), like=like, key=key)
        return new, total, str(target.overloadpacket)

    def _normalized_shape(self, param: fx.Node | None, site: Site, key: str | None) -> fx.Node | None:
        """param, reshaped to its last normalized_ndim dims when it has leading 1s (Matcher.param)."""
        shape = meta.shape(param) if param is not None else None
        if shape is None or len(shape) == site.normalized_ndim:
            return param
        trailing = list(shape[len(shape) - site.normalized_ndim :])
        return self._insert(torch.ops.aten.reshape.default, (param, trailing), like=site.output, key=key)

    def _undo_build(self, existing: set[fx.Node], error: Exception) -> None:
        """Erase the nodes a failed build added, newest first; re-raise `error` if the build also
        removed or rewired nodes that were there before (nothing to restore them from)."""
        added = [n for n in self.graph.nodes if n not in existing]
        new = set(added)
        removed = len(self.graph.nodes) - len(added) != len(existing)
        if removed or any(u not in new for n in added for u in n.users):
            raise error
        for node in reversed(added):
            self.graph.erase_node(node)
            self.order.pop(node, None)

    def _keep_fp32_users(self, site: Site, new: fx.Node, key: str | None) -> None:
        """ATen graphs spell dtypes out: users that cast to the low dtype take the op's output
        directly, others get it cast back to fp32 (the policy lowers the norm's IO, not theirs)."""
        low = meta.dtype(site.low_precision_input)
        up = None
        for user in list(real_users(site.output)):
            t = self.view[user]
            if t.op == "cast" and t.attrs["dtype"] == low:
                user.replace_all_uses_with(new)
                self._forget_users(new)
                site.nodes.add(user)
                continue
            if up is None:
                with self.graph.inserting_after(new):
                    up = self._insert(
                        torch.ops.aten._to_copy.default,
                        (new,),
                        {"dtype": torch.float32},
                        like=site.output,
                        key=key,
                    )
            user.replace_input_with(site.output, up)

    def _forget_users(self, node: fx.Node) -> None:
        for u in node.users:
            self.view.forget(u)

    def _replace(self, site: Site, new: fx.Node, total: fx.Node | None) -> None:
        for check in [u for u in site.output.users if is_check(u)]:  # the op's fake impl vouches for it
            self.graph.erase_node(check)
            self.erased.add(check)
        site.output.replace_all_uses_with(new)
        self._forget_users(new)
        if total is not None:
            from normpass.patterns.residual import aliases_of, later_uses

            aliases = aliases_of(site.input, self.view)
            uses = later_uses(site, aliases)
            x = total.args[0].args[0]
            dead = [site.input, *aliases]
            for node in dead:  # their checks precede `total`
                for check in [u for u in node.users if is_check(u)]:
                    self.graph.erase_node(check)
                    self.erased.add(check)
            for user, value in uses:
                # `h.dtype` reads x's (the same dtype, defined earlier); every other use reads `sum`.
                user.replace_input_with(value, x if self.view[user].op == "dtype_of" else total)
            # Terms built ahead (a site's epilogue probes its users) may embed h: build them again.
            self.view.forget_all()
            site.nodes.update(dead)
        self._erase_dead(site.nodes | site.keep)

    def _erase_dead(self, nodes: set[fx.Node]) -> None:
        for node in sorted(nodes, key=lambda n: self.order.get(n, 0.0), reverse=True):
            if node in self.erased or node.op in ("placeholder", "output", "get_attr"):
                continue
            for check in [u for u in node.users if is_check(u)]:
                self.graph.erase_node(check)
                self.erased.add(check)
            if not node.users:
                inputs = node.all_input_nodes
                self.graph.erase_node(node)
                self.erased.add(node)
                for a in inputs:  # `x.dtype` nodes that fed a removed cast (symbolic_trace)
                    if not a.users and self.view[a].op == "dtype_of":
                        self.graph.erase_node(a)
                        self.erased.add(a)
                self.view.forget(node)
