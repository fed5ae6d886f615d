"""Inductor post-grad pass: the gradient sums that feed normpass's backward ops go into the ops.

When a norm's output is read by several ops (Llama's q/k/v projections, its gate/up projections),
the output's gradient is the sum of theirs. AOT autograd writes that sum as `aten.add` nodes before
the backward op. Inductor would fuse such adds into its own norm backward, but normpass's backward
op is opaque to it, so the sum became a separate kernel whose result the op read back. This pass
hands the addends to the op instead (`extra_grad_outs`), which adds them as it loads them: the same
order, dtype and rounding as the adds it replaces, so the same bits.

Example:
    >>> count = fold_grad_sums(gm.graph)  # on a post-grad (ATen) graph
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Graph, Node

import normpass.ops  # noqa: F401  (registers the ops)

BACKWARD_OPS = (torch.ops.normpass.rms_norm_backward.default, torch.ops.normpass.layer_norm_backward.default)
_ADD = torch.ops.aten.add.Tensor


def fake_value(node: Any) -> torch.Tensor | None:
    """The fake tensor a node stands for (meta['val']), or None."""
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _addends(grad: Node, like: torch.Tensor) -> list[Node]:
    """The terms of `grad` as a left-nested chain of plain adds (((a + b) + c) -> [a, b, c]).

    A term stops the chain where folding could change the result or duplicate work: an add with
    other users, an alpha, or an operand whose shape or dtype is not the input's.
    """

    def same(node: Any) -> bool:
        val = fake_value(node)
        return val is not None and val.shape == like.shape and val.dtype == like.dtype

    if not (
        grad.op == "call_function"
        and grad.target is _ADD
        and not grad.kwargs
        and len(grad.users) == 1
        and all(same(a) for a in (grad, *grad.args))
    ):
        return [grad]
    left, right = grad.args
    return [*_addends(left, like), right]


# Where the backward ops take their further output-gradient terms (the same in both schemas).
EXTRA = next(i for i, a in enumerate(BACKWARD_OPS[0]._schema.arguments) if a.name == "extra_grad_outs")
assert all(op._schema.arguments[EXTRA].name == "extra_grad_outs" for op in BACKWARD_OPS)


def with_terms(args: tuple, terms: list) -> tuple:
    """A backward call's positional args with grad_out = terms[0] and extra_grad_outs = the rest (None
    for none); the arguments after those (stats), when passed, stay."""
    return (terms[0], *args[1:EXTRA], terms[1:] or None, *args[EXTRA + 1 :])


def fold_grad_sums(graph: Graph) -> int:
    """Pass the addends of each normpass backward op's grad_out to the op; returns how many ops."""
    folded = 0
    backward_ops = [n for op in BACKWARD_OPS for n in graph.find_nodes(op="call_function", target=op)]
    for node in backward_ops:
        args, like = node.args, fake_value(node.args[1])
        if like is None or (len(args) > EXTRA and args[EXTRA]):  # no metadata, or terms already given
            continue
        terms = _addends(args[0], like)
        if len(terms) < 2:
            continue
        node.args = with_terms(args, terms)
        # Inductor lays out a custom op's inputs as the eager call had them: record the new call.
        if "eager_input_vals" in node.meta:
            fake_args, fake_kwargs = node.meta["eager_input_vals"]
            fake_terms = [fake_value(t) for t in terms]
            node.meta["eager_input_vals"] = (with_terms(fake_args, fake_terms), fake_kwargs)
        folded += 1
    if folded:
        graph.eliminate_dead_code()
    return folded
