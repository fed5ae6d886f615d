"""Effective bandwidth of normpass's CUDA norm kernels against torch, inductor, Liger and apex.

Counting as in ANCHORS.md: forward moves 2*M*N*elt bytes (read x, write y), forward+backward
5*M*N*elt (timed as y = f(x, w); torch.autograd.grad(y, (x, w), dy)); the fused residual add
4*M*N*elt (read x and r, write sum and y). M*N = 2^26. Median of triton.testing.do_bench, or of
do_bench_cudagraph with `--timer cudagraph`. The ceiling is a 1 GiB device-to-device copy measured
in the same run, by the same timer.

    python benchmarks/bench_kernels.py --out bench_out
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
import traceback

import targets  # benchmarks/targets.py, beside this script
import torch
import torch.nn.functional as F
import triton.testing

import normpass  # noqa: F401  (registers torch.ops.normpass with autograd)

EPS = 1e-6
ELEMS = 1 << 26
NS = [256, 1024, 2048, 4096, 8192, 16384, 65536, 262144]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# "events": do_bench, L2 flushed before each call and each call timed by CUDA events around it, so
# a host slower than the GPU shows in calls that launch their kernels from Python (the peers' cells
# moved by up to 2x between runs, benchmarks/NOTES.md). "cudagraph": the calls replayed from one
# CUDA graph, no host in the timing, L2 not flushed, so a call may find its inputs left in L2 by the
# one before (Liger's bf16 RMSNorm 2048 forward read 3.07 TB/s on an H100, above that size's copy at
# 2.965). "cudagraph-flush": the graph replays an L2 flush before each call, as do_bench flushes,
# and the flushes' own time is taken off: no host and no reuse across calls.
TIMERS = ("events", "cudagraph", "cudagraph-flush")
timer = "events"
_l2_flush_buffer: torch.Tensor | None = None


def bench_ms(fn, rep_ms: int) -> float:
    """Median milliseconds per call of fn, by the chosen timer."""
    if timer == "cudagraph":
        return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
    if timer == "cudagraph-flush":
        global _l2_flush_buffer
        if _l2_flush_buffer is None:  # do_bench's flush: 256 MiB written, several times any L2
            _l2_flush_buffer = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
        flush = _l2_flush_buffer.zero_

        def flushed():
            flush()
            fn()

        both = triton.testing.do_bench_cudagraph(flushed, rep=rep_ms, return_mode="median")
        return both - triton.testing.do_bench_cudagraph(flush, rep=rep_ms, return_mode="median")
    return triton.testing.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median")


def copy_ceiling(nbytes: int = 1 << 30) -> float:
    """TB/s (read + written) of a device-to-device copy of nbytes; 1 GiB is ANCHORS.md's ceiling."""
    src = torch.empty(nbytes // 2, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    # Captured in a CUDA graph, copy_ becomes a memcpy node, which the copy engines run (2.77 TB/s on
    # the H200 against 4.24 from the SMs): the graph timer copies with an elementwise kernel. The
    # default timer keeps copy_, the ceiling ANCHORS.md measured.
    graph = timer.startswith("cudagraph")
    copy = (lambda: torch.bitwise_or(src, 0, out=dst)) if graph else (lambda: dst.copy_(src))
    ms = bench_ms(copy, 200)
    return 2 * src.numel() * src.element_size() / ms / 1e9  # TB/s


def ceiling_header(script: str, note: str = "") -> float | None:
    """A GPU benchmark's start: None (and a message) without a CUDA device; else the copy ceiling,
    measured now and printed with the device and torch's version (and `note`)."""
    if not torch.cuda.is_available():
        print(f"{script}: needs a CUDA device", file=sys.stderr)
        return None
    ceiling = copy_ceiling()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy ceiling {ceiling:.3f} TB/s{note}")
    return ceiling


# ---------------------------------------------------------------------------
# The contenders. Each factory takes (n, dtype, center) and returns f(x, w, b) -> y, or raises.


def hand_rms(x, w, b):
    """Llama-style RMSNorm: upcast, x * rsqrt(mean(x^2) + eps), downcast, times w."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return w * h.to(x.dtype)


def hand_ln(x, w, b):
    h = x.float()
    mean = h.mean(-1, keepdim=True)
    var = (h - mean).pow(2).mean(-1, keepdim=True)
    return ((h - mean) * torch.rsqrt(var + EPS)).to(x.dtype) * w + b


def native(center):
    if center:
        return lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, EPS)
    return lambda x, w, b: F.rms_norm(x, (x.shape[-1],), w, EPS)


def normpass_fn(center):
    if center:
        return lambda x, w, b: torch.ops.normpass.layer_norm(x, w, b, EPS)
    return lambda x, w, b: torch.ops.normpass.rms_norm(x, w, EPS)


def compiled(fn):
    return torch.compile(fn, dynamic=False)


def liger(center):
    if center:
        from liger_kernel.transformers.functional import liger_layer_norm

        return lambda x, w, b: liger_layer_norm(x, w, b, EPS)
    from liger_kernel.transformers.functional import liger_rms_norm

    return lambda x, w, b: liger_rms_norm(x, w, EPS)


def apex_fn(center):
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine, fused_rms_norm_affine

    if center:
        return lambda x, w, b: fused_layer_norm_affine(x, w, b, (x.shape[-1],), EPS)
    return lambda x, w, b: fused_rms_norm_affine(x, w, (x.shape[-1],), EPS)


class DirectOps:
    """normpass's forward and backward ops called directly (no autograd): the kernels alone."""

    def __init__(self, center):
        self.center = center


PROVIDERS = {
    "normpass": (normpass_fn, False),
    "normpass(ops)": (DirectOps, False),
    "torch": (native, False),
    "inductor(hand)": (lambda c: compiled(hand_ln if c else hand_rms), True),
    "inductor(native)": (lambda c: compiled(native(c)), True),
    "liger": (liger, False),
    "apex": (apex_fn, False),
}


class Budget:
    """Caps the time spent compiling, so that the whole run stays within a few minutes."""

    def __init__(self, seconds: float):
        self.left = seconds

    def ok(self) -> bool:
        return self.left > 0


def measure(fn, x, w, b, dy, rep_ms: int):
    """(forward ms, forward+backward ms) for y = fn(x, w, b)."""
    if isinstance(fn, DirectOps):
        return measure_direct(fn.center, x.detach(), w.detach(), b, dy, rep_ms)
    params = [t for t in (w, b) if t is not None]
    fwd = bench_ms(lambda: fn(x, w, b), rep_ms)

    def step():
        y = fn(x, w, b)
        torch.autograd.grad(y, (x, *params), dy)

    return fwd, bench_ms(step, rep_ms)


def measure_direct(center, x, w, b, dy, rep_ms: int):
    """The forward op alone; then the ops autograd runs: norm_with_stats and the backward reading its
    statistics."""
    ops = torch.ops.normpass
    b = b.detach() if center else None
    kw = dict(has_bias=center, normalized_ndim=1, weight_offset=0.0, **({} if center else {"p": 1.0}))
    backward = ops.layer_norm_backward if center else ops.rms_norm_backward

    def fwd():
        return ops.layer_norm(x, w, b, EPS) if center else ops.rms_norm(x, w, EPS)

    def step():
        stats = ops.norm_with_stats(x, None, w, b, EPS, center=center)[2]
        backward(dy, x, w, None, EPS, None, stats, **kw)

    return bench_ms(fwd, rep_ms), bench_ms(step, rep_ms)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--rep", type=int, default=40, help="do_bench rep in ms per cell")
    ap.add_argument("--ns", default=",".join(map(str, NS)))
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--compile-budget", type=float, default=150, help="seconds of compiling, then skip")
    ap.add_argument("--timer", choices=TIMERS, default="events", help="see TIMERS; the ceiling too")
    args = ap.parse_args()
    global timer
    timer = args.timer
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    start = time.time()

    dev = torch.cuda.get_device_name()
    ceiling = copy_ceiling()
    # The same copy at one table tensor's size (2^26 elements): how much of the gap to the ceiling
    # any kernel of the tables pays for its size and the timer (benchmarks/NOTES.md, fifteenth stop).
    dnames = args.dtypes.split(",")
    small = {d: copy_ceiling(ELEMS * torch.finfo(DTYPES[d]).bits // 8) for d in dnames}
    small_text = ", ".join(f"{d} {v:.3f} TB/s ({100 * v / ceiling:.0f}%)" for d, v in small.items())
    print(f"device {dev}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    print(
        f"copy ceiling (1 GiB d2d, read+write): {ceiling:.3f} TB/s; 2^26 elements: {small_text}", flush=True
    )
    budget = Budget(args.compile_budget)
    rows = []  # dict(dtype, norm, n, provider, fwd, fwdbwd) in TB/s, or error strings

    ns = [int(n) for n in args.ns.split(",")]
    providers = args.providers.split(",")
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        elt = torch.finfo(dtype).bits // 8
        for center in (False, True):
            norm = "layer_norm" if center else "rms_norm"
            for n in ns:
                m = ELEMS // n
                x = torch.randn(m, n, device="cuda", dtype=dtype, requires_grad=True)
                dy = torch.randn(m, n, device="cuda", dtype=dtype)
                w = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
                b = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True) if center else None
                for prov in providers:
                    factory, is_compiled = PROVIDERS[prov]
                    row = dict(dtype=dname, norm=norm, n=n, provider=prov, fwd="", fwdbwd="")
                    if is_compiled and not budget.ok():
                        row["fwd"] = row["fwdbwd"] = "skipped (compile budget)"
                        rows.append(row)
                        continue
                    t0 = time.time()
                    try:
                        fn = factory(center)
                        fwd_ms, step_ms = measure(fn, x, w, b, dy, args.rep)
                        row["fwd"] = 2 * m * n * elt / fwd_ms / 1e9
                        row["fwdbwd"] = 5 * m * n * elt / step_ms / 1e9
                    except ImportError as e:
                        row["fwd"] = row["fwdbwd"] = f"n/a ({e.name or 'import'})"
                    except Exception as e:  # report per cell, keep going
                        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
                        row["fwd"] = row["fwdbwd"] = f"error {msg}"
                        traceback.print_exc(limit=2, file=sys.stdout)
                    if is_compiled:
                        budget.left -= time.time() - t0
                        torch._dynamo.reset()
                    rows.append(row)
                    print(
                        f"{dname} {norm:10s} N={n:6d} {prov:16s} fwd {fmt(row['fwd'])} "
                        f"fwd+bwd {fmt(row['fwdbwd'])} ({time.time() - start:.0f}s)",
                        flush=True,
                    )
                del x, dy, w, b
                torch.cuda.empty_cache()

    residual_rows = bench_residual(ns, args.rep, budget)
    write_outputs(args.out, dev, ceiling, small_text, rows, residual_rows)
    print(f"total {time.time() - start:.0f}s", flush=True)
    return 0


def bench_residual(ns, rep_ms, budget):
    """add_rms_norm (x + r -> sum, norm(sum)) fused vs add then norm, bf16 forward: 4*M*N*elt bytes."""
    out = []

    def eager(x, r, w):
        s = x + r
        return F.rms_norm(s, (x.shape[-1],), w, EPS), s

    for n in ns:
        variants = {
            "normpass add_rms_norm": lambda x, r, w: torch.ops.normpass.add_rms_norm(x, r, w, EPS),
            "eager add + F.rms_norm": eager,
            "inductor(add + F.rms_norm)": compiled(eager),
        }
        m = ELEMS // n
        xrw = (
            torch.randn(m, n, device="cuda", dtype=torch.bfloat16),
            torch.randn(m, n, device="cuda", dtype=torch.bfloat16),
            torch.randn(n, device="cuda", dtype=torch.bfloat16),
        )
        for name, fn in variants.items():
            if name.startswith("inductor") and not budget.ok():
                out.append((n, name, "skipped (compile budget)"))
                continue
            t0 = time.time()
            try:
                ms = bench_ms(lambda fn=fn, xrw=xrw: fn(*xrw), rep_ms)
                val = 4 * m * n * 2 / ms / 1e9
            except Exception as e:
                val = f"error {type(e).__name__}"
            if name.startswith("inductor"):
                budget.left -= time.time() - t0
                torch._dynamo.reset()
            out.append((n, name, val))
            print(f"residual N={n:6d} {name:28s} {fmt(val)}", flush=True)
        del xrw
    return out


def fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def write_outputs(out_dir, dev, ceiling, small_text, rows, residual_rows):
    date = time.strftime("%Y-%m-%d")
    with open(os.path.join(out_dir, "bench.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["dtype", "norm", "n", "provider", "fwd", "fwdbwd"])
        wr.writeheader()
        wr.writerows(rows)
        for n, name, val in residual_rows:
            wr.writerow(dict(dtype="bf16", norm="add_rms_norm", n=n, provider=name, fwd=val, fwdbwd=""))

    lines = [
        f"Device: {dev}; torch {torch.__version__}, triton {triton.__version__}; {date}.",
        f"Copy ceiling (1 GiB device-to-device, read + write): **{ceiling:.2f} TB/s**. Timer: {timer}.",
        f"The same copy of one 2^26-element tensor: {small_text}.",
        "",
        "TB/s, forward / forward+backward (M*N = 2^26; bytes 2*M*N*elt and 5*M*N*elt). "
        "Percent: normpass against the ceiling.",
    ]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    for dname in dict.fromkeys(r["dtype"] for r in rows):
        for norm in ("rms_norm", "layer_norm"):
            sel = [r for r in rows if r["dtype"] == dname and r["norm"] == norm]
            if not sel:
                continue
            lines += ["", f"### {norm}, {dname}", ""]
            lines.append("| N | " + " | ".join(providers) + " | normpass % of ceiling |")
            lines.append("|---" * (len(providers) + 2) + "|")
            for n in dict.fromkeys(r["n"] for r in sel):
                cells, pct = [], ""
                for p in providers:
                    r = next((r for r in sel if r["n"] == n and r["provider"] == p), None)
                    cells.append(f"{fmt(r['fwd'])} / {fmt(r['fwdbwd'])}" if r else "")
                    if r and not pct and p.startswith("normpass") and isinstance(r["fwd"], float):
                        pct = f"{100 * r['fwd'] / ceiling:.0f}% / {100 * r['fwdbwd'] / ceiling:.0f}%"
                lines.append(f"| {n} | " + " | ".join(cells) + f" | {pct} |")
    if residual_rows:
        names = list(dict.fromkeys(name for _, name, _ in residual_rows))
        lines += ["", "### Fused residual add + RMSNorm, bf16 forward, TB/s (bytes 4*M*N*elt)", ""]
        lines.append("| N | " + " | ".join(names) + " |")
        lines.append("|---" * (len(names) + 1) + "|")
        for n in dict.fromkeys(n for n, _, _ in residual_rows):
            vals = {name: val for nn, name, val in residual_rows if nn == n}
            lines.append(f"| {n} | " + " | ".join(fmt(vals.get(name, "")) for name in names) + " |")
    text = "\n".join(lines) + "\n\n" + targets.verdict(rows, ceiling)
    with open(os.path.join(out_dir, "bench.md"), "w") as f:
        f.write(text)
    print("\n" + text, flush=True)
    for dname in dict.fromkeys(r["dtype"] for r in rows):
        plot(os.path.join(out_dir, f"kernels_{dname}.png"), dname, dev, ceiling, rows)


def plot(path, dname, dev, ceiling, rows):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", flush=True)
        return
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True, sharey=True)
    for i, norm in enumerate(("rms_norm", "layer_norm")):
        for j, (key, label) in enumerate((("fwd", "forward"), ("fwdbwd", "forward+backward"))):
            ax = axes[i][j]
            sel = [r for r in rows if r["dtype"] == dname and r["norm"] == norm]
            for p in dict.fromkeys(r["provider"] for r in sel):
                pts = [(r["n"], r[key]) for r in sel if r["provider"] == p and isinstance(r[key], float)]
                if pts:
                    lw = 2.5 if p.startswith("normpass") else 1.2
                    ax.plot(*zip(*pts, strict=True), marker="o", label=p, lw=lw)
            ax.axhline(ceiling, color="k", ls="--", lw=1, label="copy ceiling")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{norm} {dname} {label}", fontsize=10)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("TB/s")
            if i == 1:
                ax.set_xlabel("N (M*N = 2^26)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{dev}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
