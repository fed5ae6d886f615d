"""What a graph knows about a node's value: dtype and shape, from whichever IR made the graph.

Dynamo puts a fake tensor in node.meta["example_value"], torch.export in node.meta["val"], ShapeProp
in node.meta["tensor_meta"]; get_attr nodes point at real tensors. A symbolic_trace graph without
propagation knows nothing, and then dtypes are carried as small expressions (`DtypeOf(node)`,
`Promote(a, b)`) that the rewriter can emit into the graph and evaluate at run time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

LOW = (torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class DtypeOf:
    """The dtype of `node`'s value, known only at run time."""

    node: fx.Node


@dataclasses.dataclass(frozen=True)
class Promote:
    """torch.promote_types(a, b) of two dtype expressions."""

    a: DtypeExpr
    b: DtypeExpr


DtypeExpr = torch.dtype | DtypeOf | Promote


def value(node: Any) -> Any:
    """The example value (real or fake tensor, SymInt, ...) a graph recorded for node, or None."""
    if not isinstance(node, fx.Node):
        return None
    for key in ("val", "example_value"):
        if key in node.meta:
            return node.meta[key]
    if node.op == "get_attr":
        try:
            return _get_attr(node)
        except AttributeError:
            return None
    return None


def _get_attr(node: fx.Node) -> Any:
    obj: Any = node.graph.owning_module
    for name in str(node.target).split("."):
        obj = getattr(obj, name)
    return obj


def dtype(node: Any) -> torch.dtype | None:
    v = value(node)
    if isinstance(v, torch.Tensor):
        return v.dtype
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(tm, "dtype", None)


def shape(node: Any) -> tuple | None:
    v = value(node)
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(tm.shape) if getattr(tm, "shape", None) is not None else None


def ndim(node: Any) -> int | None:
    s = shape(node)
    return None if s is None else len(s)


def is_tensor(node: Any) -> bool | None:
    """True/False when known, None when the graph does not say."""
    if not isinstance(node, fx.Node):
        return False
    v = value(node)
    if v is not None:
        return isinstance(v, torch.Tensor)
    if "tensor_meta" in node.meta:
        return True
    return None


def same_size(a: Any, b: Any) -> bool:
    """a == b provably (ints or SymInts), without adding guards."""
    if a is b:
        return True
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # an expression the shape env cannot decide
        return False


def same_shape(a: Sequence | None, b: Sequence | None) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(map(same_size, a, b))


def promote(a: DtypeExpr, b: DtypeExpr) -> DtypeExpr:
    """torch.promote_types as an expression, folded as far as the metadata allows."""
    ra, rb = resolve(a), resolve(b)
    if ra is not None and rb is not None:
        return torch.promote_types(ra, rb)
    if a == b or (isinstance(a, Promote) and b in (a.a, a.b)):
        return a
    return Promote(a, b)


def resolve(expr: DtypeExpr | None) -> torch.dtype | None:
    """The dtype an expression stands for, when the graph's metadata decides it."""
    if expr is None or isinstance(expr, torch.dtype):
        return expr
    if isinstance(expr, DtypeOf):
        return dtype(expr.node)
    a, b = resolve(expr.a), resolve(expr.b)
    return torch.promote_types(a, b) if a is not None and b is not None else None


def of(node: fx.Node) -> DtypeExpr:
    """node's dtype as an expression: the dtype when known, else DtypeOf(node)."""
    return dtype(node) or DtypeOf(node)


def accumulation_dtype(dt: torch.dtype | None) -> torch.dtype:
    return torch.float64 if dt == torch.float64 else torch.float32


def emit(graph: fx.Graph, expr: DtypeExpr) -> torch.dtype | fx.Node:
    """A graph argument for the dtype: a literal when known, else nodes computing it at run time."""
    known = resolve(expr)
    if known is not None:
        return known
    if isinstance(expr, DtypeOf):
        return graph.call_function(getattr, (expr.node, "dtype"))
    assert isinstance(expr, Promote)
    return graph.call_function(torch.promote_types, (emit(graph, expr.a), emit(graph, expr.b)))
