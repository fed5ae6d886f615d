"""What a pattern returns: a `Site` (a norm normpass can replace) or a `Reject` (a norm-like
subgraph left alone, with the reason), and the `Matcher` that patterns walk the canonical view with.

A pattern is a function `(term, matcher) -> Site | None` that raises `Reject(form, reason)` for a
look-alike. The matcher records which fx nodes the walk consumed, so the pass knows what the rewrite
removes and can check that none of those intermediates is used elsewhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import fx

from normpass.passes import meta
from normpass.passes.canonical import Term, View, strip

# Users that only check a value (torch.export inserts them after casts); they never keep a node alive.
_CHECKS = {torch.ops.aten._assert_tensor_metadata.default}


def is_check(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _CHECKS


def real_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not is_check(u)]


class NoMatch(Exception):
    """Raised inside a pattern: this anchor is not that pattern (nothing to report)."""


class Reject(Exception):
    """Raised inside a pattern: a norm-like subgraph that must be left alone; becomes a report row."""

    def __init__(self, form: str, reason: str) -> None:
        super().__init__(f"{form}: {reason}")
        self.form, self.reason = form, reason


Param = fx.Node | str | None  # a node, a get_attr qualified name to insert, or absent


@dataclasses.dataclass
class Site:
    """A normalization a normpass op computes: y = norm(input) * (weight + weight_offset) + bias.

    kind: "rms" (no mean-centering) or "layer". `output` is the node whose uses the op's result takes
    over; `nodes` are the nodes the op replaces (removed when dead; none may be used outside the site
    except `output`); `keep` are input-side nodes (an upcast of the input) that may stay for other users.
    out_dtype: the dtype of `output` (an expression when the graph has no metadata).
    low_precision_input: for a LayerNorm call that autocast runs in fp32 on a half/bf16 input, that
    input; the "low_precision" policy normalizes it with half/bf16 output.
    """

    kind: Literal["rms", "layer"]
    form: str
    input: fx.Node
    output: fx.Node
    weight: Param
    bias: Param
    eps: float | fx.Node
    normalized_ndim: int
    out_dtype: meta.DtypeExpr
    nodes: set[fx.Node]
    keep: set[fx.Node] = dataclasses.field(default_factory=set)
    weight_offset: float = 0.0
    p: float = 1.0
    low_precision_input: fx.Node | None = None

    def __post_init__(self) -> None:
        self.nodes = set(self.nodes) - set(self.keep)  # input-side nodes may outlive the site


class Matcher:
    """Walks terms for one match attempt, recording the nodes it consumes."""

    def __init__(self, view: View) -> None:
        self.view = view
        self.nodes: set[fx.Node] = set()
        self.keep: set[fx.Node] = set()

    # -- taking terms ---------------------------------------------------------------------------------

    def unalias(self, t: Any) -> Any:
        while isinstance(t, Term) and t.op == "alias":
            self.nodes.update(t.nodes)
            t = t.args[0]
        return t

    def take(self, t: Any, *ops: str) -> Term:
        """t (through aliases) if its op is one of `ops`; records its nodes. Else NoMatch."""
        t = self.unalias(t)
        if not isinstance(t, Term) or t.op not in ops:
            raise NoMatch
        self.nodes.update(t.nodes)
        return t

    def is_op(self, t: Any, *ops: str) -> bool:
        t = strip(t)
        return isinstance(t, Term) and t.op in ops

    def split(self, t: Term, first: str | tuple[str, ...]) -> tuple[Term, Any]:
        """For a commutative binary term: (the arg whose op is in `first`, the other one)."""
        ops = (first,) if isinstance(first, str) else first
        a, b = t.args
        if self.is_op(a, *ops):
            return self.take(a, *ops), b
        if self.is_op(b, *ops):
            return self.take(b, *ops), a
        raise NoMatch

    def upcast_root(self, t: Any) -> Any:
        """t without aliases and exact upcasts to the accumulation dtype (the ops upcast internally).

        Nodes skipped here are input-side: removed only if nothing else uses them.
        """
        while isinstance(t, Term) and t.op in ("alias", "cast"):
            if t.op == "cast":
                src = t.args[0]
                src_dtype = meta.dtype(src.node) if isinstance(src, Term) and src.node is not None else None
                target = t.attrs["dtype"]
                if src_dtype is not None:
                    exact = src_dtype.is_floating_point and target == meta.accumulation_dtype(src_dtype)
                else:  # unknown source: a float32 upcast (a wrong guess fails loudly in the op's checks)
                    exact = target == torch.float32
                if not exact:
                    break
            self.keep.update(t.nodes)
            t = t.args[0]
        return t

    @staticmethod
    def is_cast(t: Any) -> bool:
        """t is spelled as a cast (a real one, or one to the dtype the tensor already has)."""
        return isinstance(t, Term) and (t.op == "cast" or (t.op == "alias" and t.attrs.get("cast", False)))

    def param(self, t: Any, k: int, x: fx.Node, seen: set[fx.Node]) -> tuple[fx.Node, Term] | None:
        """(node, term) when t is a weight/bias of x's normalized shape (its last k dims), else None.

        A probe: the aliases in front of t are recorded (as parameter-side, in self.keep) only when t
        is one, so a candidate that is not (a residual added to the norm's output) leaves the site as
        it was. `seen`: nodes that cannot be the parameter (the norm's own input).
        """
        probe = Matcher(self.view)
        t = probe.unalias(t)
        if not isinstance(t, Term) or t.node is None or t.node in seen or meta.is_tensor(t.node) is False:
            return None
        dt = meta.dtype(t.node)
        if dt is not None and not dt.is_floating_point:
            return None
        shape, xshape = meta.shape(t.node), meta.shape(x)
        if shape is None or len(shape) < k:
            return None
        if xshape is not None:
            # Leading 1s broadcast to the same output (a (1, 1, n) weight of (b, t, n) rows; the
            # rewrite reshapes it), as long as they add no dims to x's.
            lead = shape[: len(shape) - k]
            if len(shape) > len(xshape) or any(s != 1 for s in lead):
                return None
            if not meta.same_shape(shape[len(shape) - k :], xshape[len(xshape) - k :]):
                return None
        elif len(shape) != k or not all(isinstance(s, int) and s > 1 for s in shape):
            return None  # no metadata: the op checks at run time
        self.keep.update(probe.nodes)
        return t.node, t

    # -- facts about values ---------------------------------------------------------------------------

    @staticmethod
    def node_of(t: Any) -> fx.Node:
        if not isinstance(t, Term) or t.node is None:
            raise NoMatch
        return t.node

    def eps(self, e: Any) -> float | fx.Node:
        """A literal or a runtime scalar (Dynamo's `.item()` of a float attribute)."""
        e = self.unalias(e)
        if isinstance(e, (int, float)) and not isinstance(e, bool):
            if e < 0:
                raise NoMatch
            return float(e)
        if isinstance(e, Term) and e.op == "scalar":
            return e.node
        raise NoMatch

    @staticmethod
    def trailing_dims(dims: tuple | None, ndim: int | None) -> int | None:
        """k if dims are exactly the last k dims (any spelling), else None."""
        if not dims:
            return None
        if any(d >= 0 for d in dims):
            if ndim is None:
                return None
            dims = tuple(d - ndim if d >= 0 else d for d in dims)
        k = len(dims)
        return k if sorted(dims) == list(range(-k, 0)) else None
