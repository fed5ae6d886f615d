"""User patterns written as plain torch functions (templates), matched over the canonical view.

The template is traced with symbolic_trace and canonicalized exactly like a graph, so it matches every
spelling of the same math. Its arguments `x`/`input`, `weight`, `bias` and `eps` bind to the site's
input, parameters and eps; any other argument binds to any value (consistently), which only a
custom replacement can use: without one, the template must compute exactly the normpass op.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from normpass import reference
from normpass.passes import meta
from normpass.passes.canonical import Term, View, strip
from normpass.passes.match import Matcher, NoMatch, Reject, Site
from normpass.passes.registry import Pattern

_COMMUTATIVE = ("add", "mul")
_IGNORED_ATTRS = ("target",)
_INPUT_NAMES = ("x", "input")


class _Template:
    def __init__(self, name: str, fn: Callable, kind: str) -> None:
        if kind not in ("rms", "layer"):
            raise ValueError(f"normpass.register_pattern: kind must be 'rms' or 'layer', got {kind!r}")
        params = list(inspect.signature(fn).parameters)
        if not any(p in params for p in _INPUT_NAMES):
            raise ValueError(
                f"normpass.register_pattern: template {name!r} needs an argument named x or input"
            )
        self.name, self.kind = name, kind
        self.gm = fx.symbolic_trace(fn)
        self.view = View(self.gm)
        out = next(n for n in self.gm.graph.nodes if n.op == "output")
        self.root = self.view[out.args[0]]
        if self.root.op == "leaf":
            raise ValueError(
                f"normpass.register_pattern: template {name!r} computes nothing normpass can match"
            )
        self.k = _reduced_ndim(self.root)

    def match(self, t: Term, m: Matcher) -> Site | None:
        binding: dict[str, Any] = {}
        if not _unify(self.root, t, binding, m, self.view):
            raise NoMatch
        x = next((binding[n] for n in _INPUT_NAMES if n in binding), None)
        x = m.upcast_root(x)
        xnode = Matcher.node_of(x)
        out = Matcher.node_of(t)
        out_dtype = meta.dtype(out)
        if out_dtype is None:
            raise Reject(self.name, "the graph does not record the output dtype; pass example_inputs")

        def param(name: str) -> fx.Node | None:
            if binding.get(name) is None:
                return None
            found = m.param(binding[name], self.k, xnode, {xnode})
            if found is None:
                raise Reject(self.name, f"its {name} is not a float tensor of the normalized shape")
            return found[0]

        eps = binding.get("eps", 0.0)
        return Site(
            kind=self.kind,
            form=self.name,
            input=xnode,
            output=out,
            weight=param("weight"),
            bias=param("bias"),
            eps=m.eps(eps),
            normalized_ndim=self.k,
            out_dtype=out_dtype,
            nodes=set(m.nodes) | {out},
            keep=set(m.keep),
        )


def _reduced_ndim(t: Any) -> int:
    stack, seen = [t], set()
    while stack:
        t = stack.pop()
        if not isinstance(t, Term) or id(t) in seen:
            continue
        seen.add(id(t))
        if t.op in ("mean", "var", "var_mean") and t.attrs.get("dims"):
            k = Matcher.trailing_dims(t.attrs["dims"], None)
            if k is None:
                raise ValueError(
                    "normpass.register_pattern: templates must reduce trailing dims, spelled negative"
                )
            return k
        stack.extend(t.args)
    raise ValueError("normpass.register_pattern: the template has no mean/var reduction over trailing dims")


def _placeholder(t: Term) -> str | None:
    return (
        t.node.target
        if t.op in ("leaf", "scalar") and t.node is not None and t.node.op == "placeholder"
        else None
    )


def _unify(tpl: Any, t: Any, binding: dict[str, Any], m: Matcher, tview: View) -> bool:
    """Whether the graph's term t computes the template's term tpl (`tview` is the template's view),
    extending `binding` (template argument -> graph value) and `m`'s nodes."""
    if isinstance(tpl, Term):
        name = _placeholder(tpl)
        if name is not None:
            t = m.unalias(t)
            if name in binding:
                return binding[name] is t or (not isinstance(t, Term) and binding[name] == t)
            if name == "eps":
                try:
                    m.eps(t)
                except NoMatch:
                    return False
            binding[name] = t
            return True
        t = m.unalias(t)
        tpl = strip(tpl)
        if tpl.op == "leaf":
            return _unify_leaf(tpl, t, binding, m, tview)
        if not isinstance(t, Term) or t.op != tpl.op or len(t.args) != len(tpl.args):
            return False
        if not _same_attrs(tpl, t, binding):
            return False
        orders = [t.args]
        if tpl.op in _COMMUTATIVE:
            orders.append(t.args[::-1])
        for args in orders:
            trial, sub = dict(binding), Matcher(m.view)
            if all(_unify(a, b, trial, sub, tview) for a, b in zip(tpl.args, args, strict=True)):
                binding.update(trial)
                m.nodes.update(sub.nodes | set(t.nodes))
                m.keep.update(sub.keep)
                return True
        return False
    if isinstance(tpl, (int, float)) and isinstance(t, (int, float)):
        return float(tpl) == float(t)
    return tpl == t


def _call_name(node: fx.Node) -> str | None:
    """An op's name across spellings (`x.abs()`, `torch.abs(x)`, `aten.abs.default`), or None."""
    if node.op == "call_method":
        return node.target
    if node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        target = target.overloadpacket
    return getattr(target, "__name__", None)


def _unify_leaf(tpl: Term, t: Any, binding: dict[str, Any], m: Matcher, tview: View) -> bool:
    """An op the canonical form does not know (a leaf term: no arguments of its own): the graph's
    node must call the same op, on arguments that unify with the template's."""
    a = tpl.node
    b = t.node if isinstance(t, Term) and t.op == "leaf" else None
    if b is None or _call_name(a) is None or _call_name(a) != _call_name(b):
        return False
    if len(a.args) != len(b.args) or a.kwargs.keys() != b.kwargs.keys():
        return False
    pairs = [*zip(a.args, b.args, strict=True), *((a.kwargs[k], b.kwargs[k]) for k in a.kwargs)]
    trial, sub = dict(binding), Matcher(m.view)
    for x, y in pairs:
        x = tview[x] if isinstance(x, fx.Node) else x
        y = m.view[y] if isinstance(y, fx.Node) else y
        if not _unify(x, y, trial, sub, tview):
            return False
    binding.update(trial)
    m.nodes.update(sub.nodes | {b})
    m.keep.update(sub.keep)
    return True


def _same_attrs(tpl: Term, t: Term, binding: dict[str, Any]) -> bool:
    for key, want in tpl.attrs.items():
        if key in _IGNORED_ATTRS:
            continue
        got = t.attrs.get(key)
        if key == "dtype" and isinstance(want, meta.DtypeOf):
            bound = binding.get(want.node.target)
            if not isinstance(bound, Term) or bound.node is None:
                return False
            if not (
                got == meta.DtypeOf(bound.node) or meta.resolve(got) == meta.dtype(bound.node) is not None
            ):
                return False
        elif key == "dims" and want is not None and got is not None:
            ndim = (
                meta.ndim(t.args[0].node)
                if isinstance(t.args[0], Term) and t.args[0].node is not None
                else None
            )
            if Matcher.trailing_dims(want, None) != Matcher.trailing_dims(got, ndim):
                return False
        elif want != got:
            return False
    return True


def _check_computes_the_op(tpl: _Template, fn: Callable) -> None:
    """Without a replacement a site becomes the plain normpass op, so the template must compute exactly
    that op: anything more (a literal eps, `1 + weight`, an extra factor or argument) would be dropped
    silently. Checked when the template is registered, on random inputs."""
    where = f"normpass.register_pattern: template {tpl.name!r}"
    params = list(inspect.signature(fn).parameters)
    unbound = [p for p in params if p not in (*_INPUT_NAMES, "weight", "bias", "eps")]
    if unbound:
        raise ValueError(
            f"{where} has argument(s) {unbound} the normpass op has no place for; give a replacement"
        )
    if "eps" not in params:
        raise ValueError(
            f"{where} needs an argument named eps (the site's eps binds to it), or a replacement"
        )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, *[6] * tpl.k, generator=g) * 2 + 0.5
    shape = x.shape[1:]
    weight, bias = torch.randn(shape, generator=g) + 1, torch.randn(shape, generator=g)
    center = tpl.kind == "layer"
    # At three scales of x (variance about 4 s^2) with an eps of its order: a literal added next to
    # eps (`+ eps + 1e-5`) is lost at one scale but not at all three.
    for scale, eps in ((1.0, 0.5), (1e-3, 1e-7), (1e-6, 1e-13)):
        values = {"weight": weight, "bias": bias, "eps": eps}
        args = {p: x * scale if p in _INPUT_NAMES else values[p] for p in params}
        try:
            got = fn(**args)
        except Exception as e:
            raise ValueError(f"{where} failed on example inputs: {e!r}") from e
        if not isinstance(got, torch.Tensor) or not got.dtype.is_floating_point:
            raise ValueError(
                f"{where} returns {getattr(got, 'dtype', type(got).__name__)}, not a float tensor"
            )
        # At the template's own output dtype (one may end in a cast to bf16): within a few of its ulps.
        want = reference.norm(
            x * scale,
            args.get("weight"),
            args.get("bias"),
            eps,
            center=center,
            normalized_ndim=tpl.k,
            out_dtype=got.dtype,
        )
        tol = max(1e-4, 4 * torch.finfo(got.dtype).eps)
        if not (got.shape == want.shape and torch.allclose(got.float(), want.float(), tol, tol)):
            what = "LayerNorm" if center else "RMSNorm"
            raise ValueError(
                f"{where} does not compute {what} of x with its weight and bias (checked on random "
                "inputs), so the normpass op would change the results; fix the template or give a "
                "replacement"
            )


_TEMPLATES: dict[tuple, _Template] = {}


def template_pattern(
    name: str, fn: Callable, *, kind: str, checks: tuple = (), replacement: Any = None
) -> Pattern:
    """A Pattern matching the math of `fn` (see module docstring). The same (name, fn, kind) gives an equal
    Pattern, so registering it twice is a no-op."""
    key = (name, fn, kind)
    tpl = _TEMPLATES.get(key)
    if tpl is None:
        tpl = _TEMPLATES[key] = _Template(name, fn, kind)
    if replacement is None:
        _check_computes_the_op(tpl, fn)
    return Pattern(name, tpl.match, (tpl.root.op,), "user", checks, replacement)
