"""A canonical view of an FX graph, so that each normalization pattern is written once.

Every node gets one `Term`: an op name from a small vocabulary plus canonical arguments. The many
spellings the three IRs use collapse onto it:

- methods, torch functions, operators and ATen overloads: `x.mean(-1, keepdim=True)`,
  `torch.mean(x, dim=-1, keepdim=True)`, `aten.mean.dim(x, [-1], True)` -> mean(x, dims=(-1,), keepdim=True)
- casts: `.to(dt)`, `.to(dtype=dt)`, `.float()`, `.type_as(y)`, `aten._to_copy(dtype=)`, ... -> cast(x, dtype)
  (a cast to the dtype the tensor already has is an `alias`: Dynamo keeps it, ATen drops it)
- `x * x`, `x.pow(2)`, `x ** 2`, `torch.square(x)` -> square(x)
- `a / b` -> mul(a, reciprocal(b)); `reciprocal(sqrt(v))`, `v ** -0.5` -> rsqrt(v); `1 / v` -> reciprocal(v);
  `x * 1` (an integer 1) -> alias(x)
- `sum(x, d) / n` -> mean(x, d) when n is the size of the reduced dims
- nn.LayerNorm / nn.RMSNorm call_module nodes -> layer_norm / rms_norm with their parameters

A term made for a sub-expression that has no node of its own (the reciprocal in `a / b`) is virtual:
`nodes` lists the fx nodes a term stands for, so a match knows exactly which nodes it consumed.
Unknown nodes become opaque `leaf` terms. Views are built lazily, one node at a time, so a pass over
the graph costs time linear in its size.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from normpass.modules import why_not_plain
from normpass.passes import meta

aten = torch.ops.aten


@dataclasses.dataclass(eq=False)
class Term:
    """One canonical operation. `args` are Terms or constants; `attrs` hold the op's options."""

    op: str
    args: tuple = ()
    attrs: dict = dataclasses.field(default_factory=dict)
    node: fx.Node | None = None  # the node computing this value (None for a virtual term)
    nodes: tuple[fx.Node, ...] = ()  # the nodes this term stands for (its own, not its args')

    def __repr__(self) -> str:
        name = self.node.name if self.node is not None else "virtual"
        return f"{self.op}[{name}]"


def strip(t: Any, ops: tuple[str, ...] = ("alias",)) -> Any:
    """t without the wrapping terms whose op is in `ops` (aliases: views that keep the value)."""
    while isinstance(t, Term) and t.op in ops:
        t = t.args[0]
    return t


def leaf(node: fx.Node) -> Term:
    return Term("leaf", node=node, nodes=(node,))


class View:
    """Lazily built canonical terms of a graph's nodes. `forget(node)` after rewriting around it."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self._terms: dict[fx.Node, Term] = {}

    def __getitem__(self, node: fx.Node) -> Term:
        term = self._terms.get(node)
        if term is None:
            term = self._terms[node] = _canonicalize(self, node)
        return term

    def arg(self, a: Any) -> Any:
        return self[a] if isinstance(a, fx.Node) else a

    def forget(self, node: fx.Node) -> None:
        self._terms.pop(node, None)

    def forget_all(self) -> None:
        """After a rewrite that moved uses of a node the rest of the graph may read (the terms of
        nodes downstream embed their arguments' terms)."""
        self._terms.clear()


# ---- argument binding ----------------------------------------------------------------------------------


def _bind(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: dict | None = None) -> dict:
    bound = dict(defaults or {})
    bound.update(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound


def _dims(d: Any) -> tuple | None:
    if d is None:
        return None
    if isinstance(d, (list, tuple)):
        return tuple(d)
    return (d,)


def _correction(b: dict) -> Any:
    if b.get("correction") is not None:
        return b["correction"]
    unbiased = b.get("unbiased", True)
    return 1 if unbiased else 0


def _number(a: Any) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


# ---- the vocabulary ------------------------------------------------------------------------------------
# Each builder gets (view, node, args, kwargs) with `self` first for methods, and returns a Term or None
# (None: not one of ours, the node is a leaf).


def _cast_to(view: View, node: fx.Node, x: Any, dt: Any) -> Term | None:
    if isinstance(dt, fx.Node):
        t = view[dt]
        if t.op == "dtype_of":
            dt = meta.DtypeOf(t.args[0].node) if t.args[0].node is not None else None
        else:
            dt = meta.value(dt) if isinstance(meta.value(dt), torch.dtype) else None
        if dt is None:
            return None
    if not isinstance(dt, (torch.dtype, meta.DtypeOf)):
        return None
    if isinstance(dt, torch.dtype) and not dt.is_floating_point:
        return None
    src = meta.dtype(x)
    target = meta.resolve(dt)
    if src is not None and target == src:
        return Term("alias", (view.arg(x),), {"cast": True}, node=node, nodes=(node,))
    return Term("cast", (view.arg(x),), {"dtype": target or dt}, node=node, nodes=(node,))


def _to(view, node, args, kwargs):
    x, rest = args[0], args[1:]
    dt = kwargs.get("dtype")
    for a in rest:
        if isinstance(a, torch.dtype):
            dt = a
        elif isinstance(a, fx.Node):
            t = view[a]
            if t.op == "dtype_of" or isinstance(meta.value(a), torch.dtype):
                dt = a
            elif meta.is_tensor(a):  # x.to(other): other's dtype (and device)
                dt = meta.DtypeOf(a) if meta.dtype(a) is None else meta.dtype(a)
            else:
                return None
        elif isinstance(a, (str, torch.device)):
            continue  # a device move keeps values; only the dtype matters here
        else:
            return None
    if dt is None:
        return None
    return _cast_to(view, node, x, dt)


def _method_cast(dt):
    return lambda view, node, args, kwargs: _cast_to(view, node, args[0], dt) if len(args) == 1 else None


def _type_as(view, node, args, kwargs):
    other = args[1]
    return _cast_to(view, node, args[0], meta.dtype(other) or meta.DtypeOf(other))


def _type(view, node, args, kwargs):
    dt = args[1] if len(args) > 1 else kwargs.get("dtype")
    return _cast_to(view, node, args[0], dt) if isinstance(dt, torch.dtype) else None


def _to_copy(view, node, args, kwargs):
    if "dtype" not in kwargs or kwargs.get("memory_format") not in (None, torch.preserve_format):
        return None
    return _cast_to(view, node, args[0], kwargs["dtype"])


def _convert_element_type(view, node, args, kwargs):
    return _cast_to(view, node, args[0], args[1])


def _binary(op: str):
    def build(view, node, args, kwargs):
        # Any other keyword set (div's rounding_mode, out=) changes the math: not this op.
        others = {k for k, v in kwargs.items() if k != "alpha" and v is not None}
        if len(args) != 2 or others or kwargs.get("alpha", 1) != 1:
            return None
        a, b = (view.arg(x) for x in args)
        if op == "mul" and isinstance(a, Term) and a is b:
            return Term("square", (a,), node=node, nodes=(node,))
        if op == "mul" and _times_one(a, b):  # export spells `1 / v` as reciprocal(v) * 1
            return Term("alias", (a if isinstance(a, Term) else b,), node=node, nodes=(node,))
        if op == "div":
            return _div(view, node, a, b)
        return Term(op, (a, b), node=node, nodes=(node,))

    return build


def _times_one(a: Any, b: Any) -> bool:
    """a * b is the tensor operand itself: one side the integer 1 (which keeps any dtype)."""
    for t, n in ((a, b), (b, a)):
        if isinstance(t, Term) and type(n) is int and n == 1:
            dt = meta.dtype(t.node) if t.node is not None else None
            return dt is None or dt.is_floating_point  # (bool * 1 is an integer tensor)
    return False


def _div(view: View, node: fx.Node, a: Any, b: Any) -> Term:
    if _number(a) and a == 1 and isinstance(b, Term):
        return _reciprocal_of(b, node)
    if isinstance(b, Term):
        return Term("mul", (a, _reciprocal_of(b, None)), node=node, nodes=(node,))
    if isinstance(a, Term) and a.op == "sum" and _number(b) and _reduced_size(a) == b:
        return Term("mean", a.args, a.attrs, node=node, nodes=(node, *a.nodes))
    return Term("div", (a, b), node=node, nodes=(node,))


def _reduced_size(t: Term) -> int | None:
    """How many elements a reduction over t's dims averages, when the input's shape is static."""
    x = t.args[0]
    shape = meta.shape(x.node) if isinstance(x, Term) and x.node is not None else None
    if shape is None or t.attrs["dims"] is None:
        return None
    sizes = [shape[d] for d in t.attrs["dims"]]
    return math.prod(sizes) if all(isinstance(s, int) for s in sizes) else None


def _reciprocal_of(b: Term, node: fx.Node | None) -> Term:
    own = (node,) if node is not None else ()
    if b.op == "sqrt":  # 1 / sqrt(v) == rsqrt(v)
        return Term("rsqrt", b.args, node=node, nodes=own + b.nodes)
    return Term("reciprocal", (b,), node=node, nodes=own)


def _unary(op: str):
    def build(view, node, args, kwargs):
        if len(args) != 1 or kwargs:
            return None
        x = view.arg(args[0])
        if op == "reciprocal" and isinstance(x, Term):
            return _reciprocal_of(x, node)
        return Term(op, (x,), node=node, nodes=(node,))

    return build


def _pow(view, node, args, kwargs):
    b = _bind(args, kwargs, ("input", "exponent"))
    x, e = view.arg(b["input"]), b["exponent"]
    if not isinstance(x, Term) or not _number(e):
        return None
    op = {2: "square", 0.5: "sqrt", -0.5: "rsqrt", -1: "reciprocal"}.get(e)
    if op == "reciprocal":
        return _reciprocal_of(x, node)
    return Term(op, (x,), node=node, nodes=(node,)) if op else None


def _reduction(op: str):
    def build(view, node, args, kwargs):
        b = _bind(args, kwargs, ("input", "dim", "keepdim", "dtype"), {"dim": None, "keepdim": False})
        if b.get("dtype") is not None:
            return None
        return Term(
            op,
            (view.arg(b["input"]),),
            {"dims": _dims(b["dim"]), "keepdim": bool(b["keepdim"])},
            node=node,
            nodes=(node,),
        )

    return build


def _moments(op: str, positional: tuple[str, ...]):
    """var / std / var_mean in their torch, method and ATen (dim and correction) spellings."""

    def build(view, node, args, kwargs):
        b = _bind(args, kwargs, positional, {"dim": None, "keepdim": False})
        if not isinstance(b.get("unbiased", True), bool):
            return None
        attrs = {"dims": _dims(b["dim"]), "keepdim": bool(b["keepdim"]), "correction": _correction(b)}
        return Term(op, (view.arg(b["input"]),), attrs, node=node, nodes=(node,))

    return build


def _getitem(view, node, args, kwargs):
    src, i = args
    if not isinstance(src, fx.Node) or not isinstance(i, int):
        return None
    return Term("getitem", (view[src],), {"index": i}, node=node, nodes=(node,))


def _norm_call(op: str, names: tuple[str, ...]):
    """layer_norm / rms_norm calls; `names` binds positional args (weight/bias/eps may be absent)."""

    def build(view, node, args, kwargs):
        b = _bind(args, kwargs, names, {"weight": None, "bias": None, "eps": None})
        attrs = {"normalized_shape": tuple(b["normalized_shape"]), "eps": b["eps"], "target": node.target}
        if op == "layer_norm" and b["eps"] is None:
            attrs["eps"] = 1e-5
        if op == "layer_norm" or op == "native_layer_norm":
            params = (view.arg(b["weight"]), view.arg(b["bias"]))
        else:
            params = (view.arg(b["weight"]), None)
        return Term(op, (view.arg(b["input"]), *params), attrs, node=node, nodes=(node,))

    return build


def _norm_module(view: View, node: fx.Node) -> Term | None:
    mod = view.gm.get_submodule(str(node.target))
    if len(node.args) != 1 or node.kwargs:
        return None
    x = view.arg(node.args[0])

    def param(name):
        return f"{node.target}.{name}" if getattr(mod, name, None) is not None else None

    if not isinstance(mod, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
        return None
    attrs = {"normalized_shape": tuple(mod.normalized_shape), "eps": mod.eps, "target": type(mod)}
    # A subclass's forward, hooks or a parametrization: the call computes more than the norm.
    attrs["not_plain"] = why_not_plain(mod)
    if isinstance(mod, torch.nn.LayerNorm):
        return Term("layer_norm", (x, param("weight"), param("bias")), attrs, node=node, nodes=(node,))
    return Term("rms_norm", (x, param("weight"), None), attrs, node=node, nodes=(node,))


def _normalize(view, node, args, kwargs):
    b = _bind(args, kwargs, ("input", "p", "dim", "eps"), {"p": 2.0, "dim": 1, "eps": 1e-12})
    return Term(
        "normalize", (view.arg(b["input"]),), {"dims": _dims(b["dim"]), "p": b["p"]}, node=node, nodes=(node,)
    )


def _vector_norm(view, node, args, kwargs):
    b = _bind(args, kwargs, ("input", "ord", "dim", "keepdim"), {"ord": 2, "dim": None, "keepdim": False})
    attrs = {"ord": b["ord"], "dims": _dims(b["dim"]), "keepdim": b["keepdim"]}
    return Term("vector_norm", (view.arg(b["input"]),), attrs, node=node, nodes=(node,))


def _clamp_min(view, node, args, kwargs):
    b = _bind(args, kwargs, ("input", "min", "max"), {"min": None, "max": None})
    if b["max"] is not None or not _number(b["min"]):
        return None
    return Term("clamp_min", (view.arg(b["input"]), b["min"]), node=node, nodes=(node,))


def _alias(view, node, args, kwargs):
    """Value-preserving views (contiguous) and, through _expand, broadcasting spellings (expand_as
    before a div)."""
    return Term("alias", (view.arg(args[0]),), node=node, nodes=(node,))


def _expand(view, node, args, kwargs):
    """An expand seen through as a view only where the graph records shapes: it may broadcast the
    norm's input or operands to another shape, which the pass then checks (manager._reshaped)."""
    if meta.shape(node) is None or not isinstance(args[0], fx.Node) or meta.shape(args[0]) is None:
        return None
    return _alias(view, node, args, kwargs)


def _item(view, node, args, kwargs):
    return Term("scalar", node=node, nodes=(node,))


def _dtype_attr(view, node, args, kwargs):
    if len(args) == 2 and args[1] == "dtype" and isinstance(args[0], fx.Node):
        return Term("dtype_of", (view[args[0]],), node=node, nodes=(node,))
    return None


Builder = Callable[..., "Term | None"]

_FUNCTIONS: dict[Any, Builder] = {
    operator.add: _binary("add"),
    torch.add: _binary("add"),
    aten.add.Tensor: _binary("add"),
    aten.add.Scalar: _binary("add"),
    operator.sub: _binary("sub"),
    torch.sub: _binary("sub"),
    aten.sub.Tensor: _binary("sub"),
    operator.mul: _binary("mul"),
    torch.mul: _binary("mul"),
    aten.mul.Tensor: _binary("mul"),
    aten.mul.Scalar: _binary("mul"),
    operator.truediv: _binary("div"),
    torch.div: _binary("div"),
    aten.div.Tensor: _binary("div"),
    aten.div.Tensor_mode: _binary("div"),  # true division only when rounding_mode is None
    aten.div.Scalar: _binary("div"),
    operator.pow: _pow,
    torch.pow: _pow,
    aten.pow.Tensor_Scalar: _pow,
    torch.square: _unary("square"),
    aten.square.default: _unary("square"),
    torch.sqrt: _unary("sqrt"),
    aten.sqrt.default: _unary("sqrt"),
    torch.rsqrt: _unary("rsqrt"),
    aten.rsqrt.default: _unary("rsqrt"),
    torch.reciprocal: _unary("reciprocal"),
    aten.reciprocal.default: _unary("reciprocal"),
    torch.mean: _reduction("mean"),
    aten.mean.dim: _reduction("mean"),
    torch.sum: _reduction("sum"),
    aten.sum.dim_IntList: _reduction("sum"),
    torch.var: _moments("var", ("input", "dim", "unbiased", "keepdim")),
    aten.var.correction: _moments("var", ("input", "dim")),
    aten.var.dim: _moments("var", ("input", "dim", "unbiased", "keepdim")),
    torch.std: _moments("std", ("input", "dim", "unbiased", "keepdim")),
    aten.std.correction: _moments("std", ("input", "dim")),
    aten.std.dim: _moments("std", ("input", "dim", "unbiased", "keepdim")),
    torch.var_mean: _moments("var_mean", ("input", "dim", "unbiased", "keepdim")),
    aten.var_mean.correction: _moments("var_mean", ("input", "dim")),
    aten.var_mean.dim: _moments("var_mean", ("input", "dim", "unbiased", "keepdim")),
    operator.getitem: _getitem,
    aten.to.dtype: lambda v, n, a, k: _cast_to(v, n, a[0], a[1] if len(a) > 1 else k.get("dtype")),
    aten.to.dtype_layout: _to_copy,
    aten._to_copy.default: _to_copy,
    torch.ops.prims.convert_element_type.default: _convert_element_type,
    aten.type_as.default: _type_as,
    F.layer_norm: _norm_call("layer_norm", ("input", "normalized_shape", "weight", "bias", "eps")),
    torch.layer_norm: _norm_call("layer_norm", ("input", "normalized_shape", "weight", "bias", "eps")),
    aten.layer_norm.default: _norm_call("layer_norm", ("input", "normalized_shape", "weight", "bias", "eps")),
    aten.native_layer_norm.default: _norm_call(
        "native_layer_norm", ("input", "normalized_shape", "weight", "bias", "eps")
    ),
    torch.native_layer_norm: _norm_call(
        "native_layer_norm", ("input", "normalized_shape", "weight", "bias", "eps")
    ),
    F.rms_norm: _norm_call("rms_norm", ("input", "normalized_shape", "weight", "eps")),
    torch.rms_norm: _norm_call("rms_norm", ("input", "normalized_shape", "weight", "eps")),
    aten.rms_norm.default: _norm_call("rms_norm", ("input", "normalized_shape", "weight", "eps")),
    F.normalize: _normalize,
    torch.linalg.vector_norm: _vector_norm,
    aten.linalg_vector_norm.default: _vector_norm,
    torch.clamp_min: _clamp_min,
    aten.clamp_min.default: _clamp_min,
    torch.clamp: _clamp_min,
    aten.clamp.default: _clamp_min,
    aten.expand_as.default: _expand,
    aten.expand.default: _expand,
    aten.contiguous.default: _alias,
    aten._local_scalar_dense.default: _item,
    getattr: _dtype_attr,
}
if hasattr(aten, "_fused_rms_norm"):
    _FUNCTIONS[aten._fused_rms_norm.default] = _norm_call(
        "fused_rms_norm", ("input", "normalized_shape", "weight", "eps")
    )

_METHODS: dict[str, Builder] = {
    "add": _binary("add"),
    "sub": _binary("sub"),
    "mul": _binary("mul"),
    "div": _binary("div"),
    "pow": _pow,
    "square": _unary("square"),
    "sqrt": _unary("sqrt"),
    "rsqrt": _unary("rsqrt"),
    "reciprocal": _unary("reciprocal"),
    "mean": _reduction("mean"),
    "sum": _reduction("sum"),
    "var": _moments("var", ("input", "dim", "unbiased", "keepdim")),
    "std": _moments("std", ("input", "dim", "unbiased", "keepdim")),
    "to": _to,
    "type_as": _type_as,
    "type": _type,
    "float": _method_cast(torch.float32),
    "half": _method_cast(torch.float16),
    "bfloat16": _method_cast(torch.bfloat16),
    "double": _method_cast(torch.float64),
    "expand_as": _expand,
    "contiguous": _alias,
    "item": _item,
    "clamp_min": _clamp_min,
    "clamp": _clamp_min,
}


_INPLACE_OPERATORS = {
    operator.setitem,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.iand,
    operator.ior,
    operator.ixor,
}


def writes_in_place(node: fx.Node) -> bool:
    """Whether the node may write a tensor in place: an in-place method or function (`add_`,
    `x[i] = v`), an op whose schema mutates an argument, an `out=` or `inplace=True` argument, or an
    `inplace` module."""
    target = node.target
    if node.op == "call_module":
        return bool(getattr(node.graph.owning_module.get_submodule(target), "inplace", False))
    if node.op not in ("call_method", "call_function"):
        return False
    kw = node.kwargs
    if target in _INPLACE_OPERATORS or kw.get("out") is not None or kw.get("inplace") is True:
        return True
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return schema.is_mutable
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return name == "__setitem__" or (name.endswith("_") and not name.endswith("__"))


def _canonicalize(view: View, node: fx.Node) -> Term:
    term = None
    if writes_in_place(node):  # not a value a rewrite may take away (`mean(x, out=buf)`)
        pass
    elif node.op == "call_function":
        builder = _FUNCTIONS.get(node.target)
        if builder is None and isinstance(node.target, torch._ops.OpOverloadPacket):
            builder = _FUNCTIONS.get(getattr(node.target, "default", None))
        if builder is not None:
            try:
                term = builder(view, node, node.args, dict(node.kwargs))
            except (KeyError, IndexError, TypeError, ValueError):
                term = None  # a spelling we do not understand stays opaque
    elif node.op == "call_method":
        builder = _METHODS.get(str(node.target))
        if builder is not None:
            try:
                term = builder(view, node, node.args, dict(node.kwargs))
            except (KeyError, IndexError, TypeError, ValueError):
                term = None
    elif node.op == "call_module":
        term = _norm_module(view, node)
    elif node.op == "placeholder" and isinstance(meta.value(node), (torch.SymFloat, float)):
        term = Term("scalar", node=node, nodes=(node,))
    return term if term is not None else leaf(node)
