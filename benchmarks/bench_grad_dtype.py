"""Norms whose output dtype is not their input's: bf16 rows with an fp32 gradient, and fp32 rows
whose output autocast casts to bf16.

A Llama-form RMSNorm of bf16 rows with an fp32 weight (Qwen3's q/k norms under autocast) has an fp32
output, so the gradient that reaches normpass's backward is fp32. The kernels read it as it is
(2 + 4 bytes in, 2 out per element); before, the front end widened x to fp32 and narrowed dx back
(three more passes). Both are timed here, with the bf16 gradient for scale, on M*N = 2^26 elements,
the backward reading the statistics its forward saved (as under autograd). TB/s counts the bytes
the call must move (x, dy and dx), against the copy ceiling of the same run. Also timed: the bf16
call with the weight frozen (LoRA, BitFit: `weight_grad=False`, no dweight partials).

fp32 rows under autocast (a Llama's residual stream): `normpass.fold_casts` folds the cast of the
output into the forward (`out_dtype=bfloat16`: 4 bytes in, 2 out) and passes the backward the
16-bit gradient before its widening cast (4 + 2 in, 4 out); each is timed against the cast kernel
plus the fp32 call it replaces. A norm output read by three projections (q, k, v) has three such
terms, which the kernel sums as it loads them (4 + 3 x 2 in, 4 out), timed against the three
widened first.

    python benchmarks/bench_grad_dtype.py
"""

from __future__ import annotations

import argparse
import sys

import torch
from bench_kernels import bench_ms, ceiling_header

import normpass  # noqa: F401  (registers torch.ops.normpass)

EPS = 1e-6
ELEMS = 1 << 26


def calls(n: int, center: bool):
    """(name, bytes per element, fn) for one row width."""
    ops = torch.ops.normpass
    x = torch.randn(ELEMS // n, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, device="cuda")  # fp32, as autocast leaves it
    dy32 = torch.randn_like(x, dtype=torch.float32)
    dy16 = dy32.to(torch.bfloat16)
    op = ops.layer_norm_backward if center else ops.rms_norm_backward
    kw = dict(has_bias=center, normalized_ndim=1, weight_offset=0.0, **({} if center else {"p": 1.0}))
    stats = ops.norm_with_stats(x, None, w, None, EPS, center=center)[2]

    def widened():  # the front end's path before the kernels read fp32 gradients
        dx, dw, db = op(dy32, x.float(), w, None, EPS, None, stats, **kw)
        return dx.to(torch.bfloat16), dw, db

    yield "bf16 dy", 6, lambda: op(dy16, x, w, None, EPS, None, stats, **kw)
    frozen = dict(kw, has_bias=False, weight_grad=False)
    yield "bf16 dy, frozen weight", 6, lambda: op(dy16, x, w, None, EPS, None, stats, **frozen)
    yield "fp32 dy", 8, lambda: op(dy32, x, w, None, EPS, None, stats, **kw)
    yield "fp32 dy, x widened", 8, widened


def cast_calls(n: int, center: bool):
    """(name, bytes per element, fn) for fp32 rows whose output is cast to bf16."""
    ops = torch.ops.normpass
    x, w = torch.randn(ELEMS // n, n, device="cuda"), torch.randn(n, device="cuda")
    dy16, *more16 = (torch.randn_like(x).to(torch.bfloat16) for _ in range(3))
    op = ops.layer_norm_backward if center else ops.rms_norm_backward
    kw = dict(has_bias=center, normalized_ndim=1, weight_offset=0.0, **({} if center else {"p": 1.0}))
    stats = ops.norm_with_stats(x, None, w, None, EPS, center=center)[2]

    def forward(**kw):
        return ops.layer_norm(x, w, None, EPS, **kw) if center else ops.rms_norm(x, w, EPS, **kw)

    yield "fp32 x, bf16 out", 6, lambda: forward(out_dtype=torch.bfloat16)
    yield "fp32 x, fp32 out cast", 6, lambda: forward().to(torch.bfloat16)
    yield "fp32 x, bf16 dy", 10, lambda: op(dy16, x, w, None, EPS, None, stats, **kw)
    yield "fp32 x, bf16 dy widened", 10, lambda: op(dy16.float(), x, w, None, EPS, None, stats, **kw)

    def three_widened():  # the front end's path before the kernels summed 16-bit terms
        return op(dy16.float(), x, w, None, EPS, [t.float() for t in more16], stats, **kw)

    yield "fp32 x, 3 bf16 dy terms", 14, lambda: op(dy16, x, w, None, EPS, more16, stats, **kw)
    yield "fp32 x, 3 bf16 dy terms widened", 14, three_widened


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 65536])
    args = parser.parse_args(argv)
    ceiling = ceiling_header("bench_grad_dtype")
    if ceiling is None:
        return 1
    print("| norm | N | call | µs | TB/s | % of ceiling |")
    print("|---|---|---|---|---|---|")
    for center in (False, True):
        for n in args.ns:
            for name, per_elem, fn in [*calls(n, center), *cast_calls(n, center)]:
                fn()  # first call: build the plan, allocate
                ms = bench_ms(fn, 100)
                tbs = per_elem * ELEMS / ms / 1e9
                norm = "layer_norm" if center else "rms_norm"
                print(f"| {norm} | {n} | {name} | {1e3 * ms:.1f} | {tbs:.2f} | {100 * tbs / ceiling:.0f}% |")
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
