"""Where one normpass kernel's warps wait: a workload for Nsight Compute, and a reading of its samples.

Per instruction, ncu's source page counts the warp-state samples taken there and why each warp was
stalled; the few instructions that hold most of the samples say which load or barrier the kernel
waits on (benchmarks/NOTES.md, twelfth stop: LayerNorm waited for its shift, then for its row).

    ncu --clock-control none --kernel-name regex:norm_fwd --launch-skip 2 --launch-count 1 \\
        --section WarpStateStats --section SourceCounters -o /tmp/ln \\
        python benchmarks/ncu_kernel.py run layer_norm 1024
    ncu -i /tmp/ln.ncu-rep --page source --csv --print-source sass > ln.csv
    python benchmarks/ncu_kernel.py stalls ln.csv
"""

from __future__ import annotations

import argparse
import csv
import sys

ELEMS = 1 << 26
SAMPLES = "Warp Stall Sampling (All Samples)"


def run(norm: str, n: int, dtype: str, backward: bool = False, calls: int = 3) -> None:
    """Calls the forward op, or the backward op with the forward's statistics as training runs it,
    `calls` times on (2^26 / n, n) rows: ncu skips the first ones."""
    import torch

    import normpass  # noqa: F401  (registers torch.ops.normpass)

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    x, dy = (torch.randn(ELEMS // n, n, device="cuda", dtype=dt) for _ in range(2))
    w, b = (torch.randn(n, device="cuda", dtype=dt) for _ in range(2))
    center = norm == "layer_norm"
    ops = torch.ops.normpass
    if backward:
        stats = ops.norm_with_stats(x, None, w, b if center else None, 1e-6, center=center)[2]
        op = ops.layer_norm_backward if center else ops.rms_norm_backward
        args = (dy, x, w, None, 1e-6, None, stats)
        kw = dict(has_bias=center, normalized_ndim=1, weight_offset=0.0, **({} if center else {"p": 1.0}))
    else:
        op, args, kw = (ops.layer_norm, (x, w, b, 1e-6), {}) if center else (ops.rms_norm, (x, w, 1e-6), {})
    for _ in range(calls):
        op(*args, **kw)
    torch.cuda.synchronize()


def stalls(lines, top: int = 12) -> str:
    """The stall reasons' shares of all samples, then the `top` instructions by samples (in address
    order, with their index, share and three main reasons)."""
    rows = list(csv.reader(lines))
    header = next(i for i, r in enumerate(rows) if SAMPLES in r)
    names, data = rows[header], rows[header + 1 :]
    col = {name: i for i, name in enumerate(names)}
    reasons = [n for n in names if n.startswith("stall_") and "Not Issued" not in n]

    def num(row, name):
        return float(row[col[name]] or 0)

    total = sum(num(r, SAMPLES) for r in data)
    if total == 0:
        raise ValueError("no samples: was SourceCounters collected?")
    shares = sorted(((sum(num(r, n) for r in data) / total, n[6:]) for n in reasons), reverse=True)
    out = [f"{total:.0f} samples; " + ", ".join(f"{n} {100 * s:.1f}%" for s, n in shares if s >= 0.01)]
    ranked = sorted(range(len(data)), key=lambda j: -num(data[j], SAMPLES))[:top]
    for j in sorted(ranked):
        r = data[j]
        why = sorted(((num(r, n), n[6:]) for n in reasons), reverse=True)[:3]
        why_text = " ".join(f"{n}:{v:.0f}" for v, n in why if v)
        out.append(f"{j:5d} {100 * num(r, SAMPLES) / total:5.1f}%  {r[col['Source']].strip():48s} {why_text}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the workload ncu wraps")
    r.add_argument("norm", choices=["rms_norm", "layer_norm"])
    r.add_argument("n", type=int)
    r.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    r.add_argument("--backward", action="store_true", help="the backward op (ncu: regex:norm_bwd)")
    s = sub.add_parser("stalls", help="read ncu's source page (--csv --print-source sass)")
    s.add_argument("csv")
    s.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        run(args.norm, args.n, args.dtype, args.backward)
    else:
        with open(args.csv, newline="") as f:
            print(stalls(f, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
