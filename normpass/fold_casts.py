"""Inductor post-grad pass: the casts around a norm go into normpass's ops.

Under autocast the residual stream stays fp32, so a Llama step's norms are fp32 norms whose output
each projection casts to bf16, and whose backward reads that cast's gradient widened back to fp32.
Inductor fuses such casts into its own norm kernels; normpass's ops are opaque to it, so each cast
became a kernel of its own. Both fold exactly:

- forward: an fp32 output read only through casts to one 16-bit dtype is written in that dtype
  (`out_dtype`): the op computes the same fp32 value and rounds it once, as the cast did;
- backward: gradient terms that are casts from one 16-bit dtype to fp32 x's dtype are passed before
  the cast: the op widens them itself and sums them in fp32, and a widening cast loses nothing.

Example:
    >>> count = fold_casts(gm.graph)  # on a post-grad (ATen) graph
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Graph, Node

import normpass.ops  # noqa: F401  (registers the ops)
from normpass.grad_sums import BACKWARD_OPS, EXTRA, fake_value, with_terms
from normpass.reference import is_16_bit_of_fp32

_CAST = torch.ops.prims.convert_element_type.default
# The forward ops, each with the position of its output among the op's results (None: the only one).
_FORWARD_OPS = {
    torch.ops.normpass.rms_norm.default: None,
    torch.ops.normpass.layer_norm.default: None,
    torch.ops.normpass.add_rms_norm.default: 0,
    torch.ops.normpass.add_layer_norm.default: 0,
    torch.ops.normpass.norm_with_stats.default: 0,
}


def _cast_to(node: Any) -> torch.dtype | None:
    """The target dtype of a cast node, or None for any other node."""
    if isinstance(node, Node) and node.op == "call_function" and node.target is _CAST:
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("dtype")
    return None


def _output(op: Node, index: int | None) -> Node | None:
    """The node holding the op's normalized output (the op itself, or its getitem)."""
    if index is None:
        return op
    getitems = [u for u in op.users if u.target is operator.getitem and u.args[1] == index]
    return getitems[0] if len(getitems) == 1 else None


def _fold_output_cast(op: Node, index: int | None) -> bool:
    out = _output(op, index)
    out_val = fake_value(out)
    if out_val is None or out_val.dtype != torch.float32 or not out.users:
        return False
    casts = list(out.users)
    targets = {_cast_to(c) for c in casts}
    new_val = fake_value(casts[0])
    if len(targets) != 1 or not is_16_bit_of_fp32(out_val.dtype, dtype := targets.pop()) or new_val is None:
        return False
    op.kwargs = {**op.kwargs, "out_dtype": dtype}
    out.meta["val"] = new_val
    if index is not None:
        vals = list(op.meta["val"])
        vals[index] = new_val
        op.meta["val"] = tuple(vals)
    else:
        op.meta["val"] = new_val
    # Inductor lays out a custom op's outputs from its call as the eager one had it: record it.
    if "eager_input_vals" in op.meta:
        fake_args, fake_kwargs = op.meta["eager_input_vals"]
        op.meta["eager_input_vals"] = (fake_args, {**fake_kwargs, "out_dtype": dtype})
    for cast in casts:
        cast.replace_all_uses_with(out)
    return True


def _fold_grad_casts(op: Node) -> bool:
    x = fake_value(op.args[1])
    extra = op.args[EXTRA] if len(op.args) > EXTRA and op.args[EXTRA] else []
    terms = [op.args[0], *extra]
    # fp32 x only: a cast from 16 bits to fp32 is exact, and the op sums the terms in fp32.
    if x is None or x.dtype != torch.float32 or any(_cast_to(t) != torch.float32 for t in terms):
        return False
    sources = [t.args[0] for t in terms]
    dtypes = {getattr(fake_value(s), "dtype", None) for s in sources}
    if len(dtypes) != 1 or not is_16_bit_of_fp32(x.dtype, dtypes.pop()):
        return False
    op.args = with_terms(op.args, sources)
    if "eager_input_vals" in op.meta:
        fake_args, fake_kwargs = op.meta["eager_input_vals"]
        op.meta["eager_input_vals"] = (with_terms(fake_args, [fake_value(s) for s in sources]), fake_kwargs)
    return True


def fold_casts(graph: Graph) -> int:
    """Fold the casts around normpass's ops into them (see the module docstring); returns how many
    ops took casts."""
    folded = 0
    for target, index in _FORWARD_OPS.items():
        for node in graph.find_nodes(op="call_function", target=target):
            folded += _fold_output_cast(node, index)
    for target in BACKWARD_OPS:
        for node in graph.find_nodes(op="call_function", target=target):
            folded += _fold_grad_casts(node)
    if folded:
        graph.eliminate_dead_code()
    return folded
