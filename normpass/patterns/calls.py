"""Norm calls, in every IR: nn.LayerNorm / nn.RMSNorm modules (symbolic_trace), F.layer_norm,
torch.layer_norm, F.rms_norm (Dynamo), aten.layer_norm, aten.native_layer_norm, aten.rms_norm and
aten._fused_rms_norm (torch.export). The canonical view gives them one shape:
layer_norm(x, w, b) / rms_norm(x, w) with normalized_shape and eps.

A LayerNorm call whose input is half/bf16 but whose output is fp32 is autocast at work (Dynamo shows
it in the dtypes; ATen graphs show an explicit fp32 cast of the input). The site then records that
low-precision input, for the "low_precision" policy.
"""

from __future__ import annotations

import torch

from normpass.passes import meta
from normpass.passes.canonical import Term
from normpass.passes.match import Matcher, NoMatch, Reject, Site, real_users
from normpass.patterns.common import dtype_expr

_NAMES = {
    "layer_norm": "layer_norm",
    "native_layer_norm": "native_layer_norm",
    "rms_norm": "rms_norm",
    "fused_rms_norm": "_fused_rms_norm",
}


def _call_name(t: Term) -> str:
    target = t.attrs["target"]
    if isinstance(target, type):
        return f"call:nn.{target.__name__}"
    if isinstance(target, torch._ops.OpOverload):
        return f"call:aten.{target.overloadpacket.__name__}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"call:aten.{target.__name__}"
    module = getattr(target, "__module__", "") or ""
    prefix = "F." if "functional" in module else "torch."
    return f"call:{prefix}{getattr(target, '__name__', _NAMES[t.op])}"


def _param(t: Term | str | None) -> torch.fx.Node | str | None:
    if t is None or isinstance(t, str):
        return t
    if isinstance(t, Term) and t.node is not None:
        return t.node
    raise NoMatch


def _output(t: Term, m: Matcher, form: str, extra: str) -> torch.fx.Node:
    """For ops returning (out, stats...): the getitem(0) node, if the other outputs are unused."""
    out = None
    for user in real_users(t.node):
        if user.op != "call_function" or user.args[1:] == () or not isinstance(user.args[1], int):
            raise Reject(form, f"its tuple result is used whole by {user.name}")
        if user.args[1] == 0:
            out = user
        elif real_users(user):
            raise Reject(
                form,
                f"its {extra} output is used by {real_users(user)[0].name}; normpass ops do not return it",
            )
        m.nodes.add(user)
    if out is None:
        raise NoMatch
    return out


def match_call(t: Term, m: Matcher) -> Site | None:
    """Anchor: any norm call."""
    form = _call_name(t)
    if t.attrs.get("not_plain"):
        raise Reject(form, f"the layer may compute more than its norm: {t.attrs['not_plain']}")
    m.nodes.update(t.nodes)
    output = t.node
    if t.op == "native_layer_norm":
        output = _output(t, m, form, "mean/rstd")
    elif t.op == "fused_rms_norm":
        output = _output(t, m, form, "rstd")
    kind = "layer" if "layer" in t.op else "rms"
    x_term, w, b = t.args
    x = m.upcast_root(x_term)
    xnode = Matcher.node_of(x)
    eps = t.attrs["eps"]
    if eps is None:
        dt = meta.dtype(Matcher.node_of(x_term))
        if dt is None:
            raise Reject(
                form,
                "eps=None means the machine epsilon of the input's accumulation dtype, and this "
                "graph does not record the input dtype",
            )
        eps = torch.finfo(meta.accumulation_dtype(dt)).eps  # ATen's: fp32's for bf16/fp16 inputs
    eps = m.eps(m.view.arg(eps))
    # Without metadata the call keeps its input's dtype (outside autocast): that is x, or an upcast of it.
    unaliased = m.unalias(x_term)
    out_dtype = meta.dtype(output) or (dtype_expr(unaliased) if unaliased.op == "cast" else meta.of(xnode))
    site = Site(
        kind=kind,
        form=form,
        input=xnode,
        output=output,
        weight=_param(w),
        bias=_param(b),
        eps=eps,
        normalized_ndim=len(t.attrs["normalized_shape"]),
        out_dtype=out_dtype,
        nodes=set(m.nodes) | {output},
        keep=set(m.keep),
    )
    if kind == "layer" and meta.dtype(xnode) in meta.LOW and meta.resolve(out_dtype) == torch.float32:
        site.low_precision_input = xnode
    return site
