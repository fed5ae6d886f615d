"""Capturing a model in each IR, printing rewritten graphs compactly, and numerics vs float64."""

from __future__ import annotations

import copy
import operator
from collections import Counter

import torch
from torch import fx

import normpass  # noqa: F401  (registers the ops)
from normpass import api

# symbolic_trace, Dynamo, torch.export (pre-dispatch ATen) and its core-ATen decomposition (what AOT sees)
IRS = ("fx", "dynamo", "export", "aten")


def capture(model: torch.nn.Module, inputs: tuple, ir: str, *, dynamic: bool = False):
    """The model's graph in one IR: symbolic_trace, Dynamo (a recording backend) or torch.export."""
    if ir == "fx":
        return fx.symbolic_trace(model)
    if ir == "export":
        return torch.export.export(model, inputs)
    if ir == "aten":
        return torch.export.export(model, inputs).run_decompositions()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=record, fullgraph=True, dynamic=dynamic)(*inputs)
    assert len(graphs) == 1
    return graphs[0]


def graph_module(g) -> fx.GraphModule:
    return g.graph_module if isinstance(g, torch.export.ExportedProgram) else g


def op_counts(g) -> Counter:
    """How many of each normpass op, and of the torch/ATen norm calls, the graph calls."""
    counts: Counter = Counter()
    for node in graph_module(g).graph.nodes:
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            counts[f"{t.namespace}.{t.overloadpacket.__name__}"] += (
                t.namespace == "normpass" or "norm" in str(t)
            )
        elif node.op == "call_module":
            counts[f"module.{type(graph_module(g).get_submodule(t)).__name__}"] += 1
        elif callable(t) and "norm" in getattr(t, "__name__", ""):
            counts[f"torch.{t.__name__}"] += 1
    return +counts


def n_normpass(g) -> int:
    return sum(v for k, v in op_counts(g).items() if k.startswith("normpass."))


def _arg(a) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(map(_arg, a)) + "]"
    if isinstance(a, torch.dtype):
        return str(a).removeprefix("torch.")
    return repr(a)


def _target(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f".{t}"
    if node.op == "call_module":
        return f"{t}:{type(node.graph.owning_module.get_submodule(t)).__name__}"
    if isinstance(t, torch._ops.OpOverload):
        name = t.overloadpacket.__name__
        return f"{t.namespace}.{name}" if t.namespace != "aten" else f"aten.{name}"
    if t is operator.getitem:
        return "getitem"
    return getattr(t, "__name__", str(t))


def compact(g) -> str:
    """One line per computing node: `name = target(args, k=v)`; placeholders and output summarized."""
    gm = graph_module(g)
    lines = []
    for node in gm.graph.nodes:
        if node.op == "placeholder" or node.op == "get_attr":
            continue
        if node.op == "output":
            lines.append(f"return {_arg(node.args[0])}")
            continue
        if node.target is torch.ops.aten._assert_tensor_metadata.default:
            continue
        args = [_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()]
        lines.append(f"{node.name} = {_target(node)}({', '.join(args)})")
    return "\n".join(lines)


def rewrite_copy(g, policy: str = "fuse", **kw):
    """(rewritten copy, report); a GraphModule is copied first. (An ExportedProgram is rewritten in place:
    deepcopy renames a placeholder called `input` and breaks the program's signature.)"""
    if not isinstance(g, torch.export.ExportedProgram):
        g = copy.deepcopy(g)
    return api.rewrite(g, policy, report=True, **kw)


def rewritten_fn(model: torch.nn.Module, inputs: tuple, ir: str, policy: str = "fuse", **kw):
    """(callable, its parameters, report) for the model rewritten in one IR."""
    if ir == "dynamo":
        reports = []

        def backend(gm, example_inputs):
            gm, rep = api.rewrite(gm, policy, report=True, **kw)
            reports.append(rep)
            return gm.forward

        torch._dynamo.reset()
        fn = torch.compile(model, backend=backend, fullgraph=True)
        fn(*inputs)
        return fn, list(model.parameters()), reports[0]
    g, rep = api.rewrite(capture(model, inputs, ir), policy, report=True, **kw)
    if isinstance(g, torch.export.ExportedProgram):
        g.validate()
    mod = g.module() if isinstance(g, torch.export.ExportedProgram) else g
    return mod, list(mod.parameters()), rep


def _outputs(fn, inputs, params):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*xs)
    out = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(7)
    cot = [torch.randn(o.shape, generator=g) for o in out]
    loss = sum((o.float() * c).sum() for o, c in zip(out, cot, strict=True))
    wrt = xs + list(params)
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return [o.detach().double() for o in out] + [gr.double() if gr is not None else None for gr in grads]


def check_numerics(model: torch.nn.Module, inputs: tuple, ir: str, policy: str = "fuse"):
    """Outputs and gradients of the rewritten model are no further from float64 than the original's.

    Returns the report of the rewrite."""
    ref_model = copy.deepcopy(model).double()
    ref = _outputs(ref_model, tuple(x.double() for x in inputs), list(ref_model.parameters()))
    orig = _outputs(model, inputs, list(model.parameters()))
    fn, params, rep = rewritten_fn(model, inputs, ir, policy)
    new = _outputs(fn, inputs, params)
    dtype = inputs[0].dtype
    for i, (r, o, n) in enumerate(zip(ref, orig, new, strict=True)):
        if r is None:
            assert o is None and n is None, i
            continue
        assert n.dtype == o.dtype and n.shape == o.shape
        # a few ulp at the largest magnitude: fp32 kernels sum in another order than autograd
        margin = 4 * torch.finfo(dtype).eps * max(1.0, r.abs().max().item())
        err_orig = (o - r).abs().max().item()
        err_new = (n - r).abs().max().item()
        assert err_new <= err_orig + margin, (
            f"output/grad {i}: normpass err {err_new} > original {err_orig} + {margin}"
        )
    return rep
