"""normpass's ops at a transformer step's shape, with the gradient terms a training graph hands them.

In a Llama step each norm's backward also reads the residual's gradient (grad_sum) and, after
normpass's gradient-sum pass, one or two further terms of dy (the gate/up or q/k/v readers of the
norm's output). bench_kernels.py times the plain ops on 2^26 elements; this times those calls at the
step's own size. TB/s counts every tensor read and written, against the copy ceiling of the same run.

    python benchmarks/bench_step_shapes.py                 # Llama's 4 x 2048 tokens, hidden 2048
    python benchmarks/bench_step_shapes.py --rows 8192 32768 --cols 4096
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton.testing
from bench_kernels import ceiling_header

import normpass  # noqa: F401  (registers torch.ops.normpass)

EPS = 1e-6


def bench_us(fn) -> float:
    return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def cases(rows: int, cols: int, device: str = "cuda", weight_dtype: torch.dtype = torch.bfloat16):
    """(name, tensors moved, fn) for each call; every tensor is rows x cols bf16 (the weight: weight_dtype,
    fp32 as under autocast)."""
    ops = torch.ops.normpass
    x = torch.randn(rows, cols, device=device, dtype=torch.bfloat16)
    r, dy, gsum, t1, t2 = (torch.randn_like(x) for _ in range(5))
    w = torch.randn(cols, device=device, dtype=weight_dtype)
    yield "rms_norm", 2, lambda: ops.rms_norm(x, w, EPS)
    yield "add_rms_norm", 4, lambda: ops.add_rms_norm(x, r, w, EPS)
    # (backward op, its own keyword arguments, the term counts to time): the terms are Llama's
    # gate/up (1) and q/k/v (2) readers.
    # Each backward reads the row statistics its forward saved, as under autograd.
    backwards = (
        ("rms_norm_backward", dict(has_bias=False, p=1.0), ([], [t1], [t1, t2]), False),
        ("layer_norm_backward", dict(has_bias=True), ([], [t1, t2]), True),
    )
    for op_name, kw, term_sets, center in backwards:
        stats = ops.norm_with_stats(x, None, w, None, EPS, center=center)[2]
        op = getattr(ops, op_name)
        for terms in term_sets:
            for gs in (None, gsum):
                name = f"{op_name}, {len(terms)} extra terms" + (", grad_sum" if gs is not None else "")
                yield (
                    name,
                    3 + len(terms) + (gs is not None),
                    lambda op=op, kw=kw, gs=gs, terms=terms, stats=stats: op(
                        dy, x, w, gs, EPS, terms or None, stats, normalized_ndim=1, weight_offset=0.0, **kw
                    ),
                )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[8192])
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--weight-dtype", choices=["bf16", "fp32"], default="bf16")
    args = ap.parse_args(argv)
    weight_dtype = torch.float32 if args.weight_dtype == "fp32" else torch.bfloat16
    ceiling = ceiling_header("bench_step_shapes", f"; {args.weight_dtype} weights")
    if ceiling is None:
        return 2
    print("| rows x cols | call | µs | TB/s | % of ceiling |\n|---|---|---|---|---|")
    for rows in args.rows:
        for name, tensors, fn in cases(rows, args.cols, weight_dtype=weight_dtype):
            us = bench_us(fn)
            tbs = tensors * rows * args.cols * 2 / us / 1e6
            print(
                f"| {rows} x {args.cols} | {name} | {us:.1f} | {tbs:.2f} | {100 * tbs / ceiling:.0f}% |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
