"""The norm backward of a Llama step, normpass's op against what inductor compiles for it.

In a Llama step the RMSNorm's output has two readers (gate/up) or three (q/k/v), and its input also
feeds the residual, so the backward gets dy plus one or two further terms, and adds the residual's
gradient (grad_sum) into dx. Inductor compiles that backward from the hand-written norm; normpass
calls one op. Both are timed as the sum of their GPU kernels' time per call (torch.profiler), so the
compiled backward's host time does not count against it.

    python benchmarks/bench_step_inductor.py --rows 8192 --cols 2048
"""

from __future__ import annotations

import argparse
import sys

import torch
from bench_kernels import ceiling_header, hand_rms
from torch.profiler import ProfilerActivity, profile

import normpass  # noqa: F401  (registers torch.ops.normpass)

EPS = 1e-6


def kernel_us(fn, calls: int = 20) -> tuple[float, list[str]]:
    """GPU kernel time per call of fn (µs) and the kernels' names."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.device_time_total > 0]
    total = sum(e.device_time_total for e in kernels) / calls
    return total, sorted({e.key[:60] for e in kernels})


def step_norm(terms: int):
    """h = x + r; y = RMSNorm(h) read by 1 + terms readers; returns (h, y * s0, y * s1, ...).

    Each reader is an op of its own (a multiply by a one-valued 0-dim tensor, which no pass folds),
    as the projections are in a model: so the compiled backward gets one gradient per reader and
    sums them in its own kernel. Returning y itself several times would have autograd add the
    gradients before the compiled backward sees them, in kernels of their own."""

    def f(x, r, w, scales):
        h = x + r
        y = hand_rms(h, w, None)
        return (h, *(y * s for s in scales[: 1 + terms]))

    return f


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=2048)
    args = ap.parse_args(argv)
    ceiling = ceiling_header("bench_step_inductor")
    if ceiling is None:
        return 2
    print("| rows x cols | call | inductor µs | normpass µs | normpass TB/s |\n|---|---|---|---|---|")
    rows, cols = args.rows, args.cols
    dt = torch.bfloat16
    x = torch.randn(rows, cols, device="cuda", dtype=dt, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    w = torch.randn(cols, device="cuda", dtype=dt, requires_grad=True)
    gsum, dy, t1, t2 = (torch.randn(rows, cols, device="cuda", dtype=dt) for _ in range(4))
    scales = list(torch.ones(3, device="cuda", dtype=dt).unbind())
    ops = torch.ops.normpass
    for terms in (1, 2):
        extra = [t1, t2][:terms]
        outs = torch.compile(step_norm(terms), backend="inductor")(x, r, w, scales)
        grads = [gsum, dy, *extra]

        def inductor_bwd(outs=outs, grads=grads):
            torch.autograd.grad(outs, (x, w), grads, retain_graph=True)

        h = (x + r).detach()
        stats = ops.norm_with_stats(h, None, w.detach(), None, EPS, center=False)[2]

        def normpass_bwd(h=h, stats=stats, extra=extra):
            ops.rms_norm_backward(
                dy, h, w.detach(), gsum, EPS, extra, stats,
                normalized_ndim=1, weight_offset=0.0, has_bias=False, p=1.0,
            )  # fmt: skip

        ind_us, ind_kernels = kernel_us(inductor_bwd)
        np_us, _ = kernel_us(normpass_bwd)
        tbs = (4 + terms) * rows * cols * 2 / np_us / 1e6
        print(
            f"| {rows} x {cols} | {terms} extra term(s), grad_sum | {ind_us:.1f} | {np_us:.1f} | {tbs:.2f} |",
            flush=True,
        )
        print(f"  inductor kernels: {ind_kernels}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
