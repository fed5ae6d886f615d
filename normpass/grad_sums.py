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
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx import Graph, Node

import normpass.ops  # noqa: F401  (registers the ops)

_BACKWARD_OPS = (torch.ops.normpass.rms_norm_backward.default, torch.ops.normpass.layer_norm_backward.default)
_ADD = torch.ops.aten.add.Tensor


def _val(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _addends(grad: Node, like: torch.Tensor) -> list[Node]:
    """The terms of `grad` as a left-nested chain of plain adds (((a + b) + c) -> [a, b, c]).

    A term stops the chain where folding could change the result or duplicate work: an add with
    other users, an alpha, or an operand whose shape or dtype is not the input's.
    """

    def same(node: Any) -> bool:
        val = _val(node)
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
_EXTRA = next(i for i, a in enumerate(_BACKWARD_OPS[0]._schema.arguments) if a.name == "extra_grad_outs")
assert all(op._schema.arguments[_EXTRA].name == "extra_grad_outs" for op in _BACKWARD_OPS)


def _with_terms(args: tuple, terms: list) -> tuple:
    """A backward call's positional args with grad_out = terms[0] and extra_grad_outs = the rest; the
    arguments after those (stats), when passed, stay."""
    return (terms[0], *args[1:_EXTRA], terms[1:], *args[_EXTRA + 1 :])


def fold_grad_sums(graph: Graph) -> int:
    """Pass the addends of each normpass backward op's grad_out to the op; returns how many ops."""
    folded = 0
    backward_ops = [n for op in _BACKWARD_OPS for n in graph.find_nodes(op="call_function", target=op)]
    for node in backward_ops:
        args, like = node.args, _val(node.args[1])
        if like is None or (len(args) > _EXTRA and args[_EXTRA]):  # no metadata, or terms already given
            continue
        terms = _addends(args[0], like)
        if len(terms) < 2:
            continue
        node.args = _with_terms(args, terms)
        # Inductor lays out a custom op's inputs as the eager call had them: record the new call.
        if "eager_input_vals" in node.meta:
            fake_args, fake_kwargs = node.meta["eager_input_vals"]
            fake_terms = [_val(t) for t in terms]
            node.meta["eager_input_vals"] = (_with_terms(fake_args, fake_terms), fake_kwargs)
        folded += 1
    if folded:
        graph.eliminate_dead_code()
    return folded


class FoldGradSums(CustomGraphPass):
    """`fold_grad_sums` as inductor's `post_grad_custom_post_pass`, run before `then` (a pass that
    was already in that slot, which is a single global one)."""

    def __init__(self, then: Any = None) -> None:
        self.then = then

    def __call__(self, graph: Graph) -> None:
        fold_grad_sums(graph)
        if self.then is not None:
            self.then(graph)

    def uuid(self) -> Any:
        # The compile cache keys on it: this file's contents, and the chained pass's own key (a pass
        # without one disables the cache, as it would on its own).
        if self.then is None:
            return get_hash_for_files((__file__,))
        then_uuid = self.then.uuid() if isinstance(self.then, CustomGraphPass) else None
        return None if then_uuid is None else (get_hash_for_files((__file__,)), then_uuid)
