"""Where one normpass kernel's warps wait: a workload for Nsight Compute, and a reading of its samples.

Per instruction, ncu's source page counts the warp-state samples taken there and why each warp was
stalled; the few instructions that hold most of the samples say which load or barrier the kernel
waits on (benchmarks/NOTES.md, twelfth stop: LayerNorm waited for its shift, then for its row).

    ncu --clock-control none --kernel-name regex:norm_fwd --launch-skip 2 --launch-count 1 \\
        --section WarpStateStats --section SourceCounters -o /tmp/ln \\
        python benchmarks/ncu_kernel.py run layer_norm 1024
    ncu -i /tmp/ln.ncu-rep --page source --csv --print-source sass > ln.csv
    python benchmarks/ncu_kernel.py stalls ln.csv

Against a peer's kernel at the same shape (`--provider liger` or `inductor`, forward only), the
profiled calls run inside an NVTX range after warm-up (inductor compiles there), and `summary` reads
the details page of each provider's run into one table:

    for p in normpass liger inductor; do
      ncu --clock-control none --nvtx --nvtx-include "profile/" --section SpeedOfLight \
          --section Occupancy --section LaunchStats --section WarpStateStats --csv \
          python benchmarks/ncu_kernel.py run rms_norm 16384 --provider $p > $p.csv
    done
    python benchmarks/ncu_kernel.py summary normpass.csv liger.csv inductor.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

ELEMS = 1 << 26
SAMPLES = "Warp Stall Sampling (All Samples)"


PROVIDERS = ("normpass", "liger", "inductor")


def forward_fn(provider: str, center: bool):
    """f(x, w, b) -> y for a peer's forward (bench_kernels.py's contenders)."""
    import bench_kernels as bk

    if provider == "liger":
        return bk.liger(center)
    return bk.compiled(bk.hand_ln if center else bk.hand_rms)


def run(
    norm: str, n: int, dtype: str, backward: bool = False, calls: int = 3, provider: str = "normpass"
) -> None:
    """Calls the forward op, or the backward op with the forward's statistics as training runs it,
    `calls` times on (2^26 / n, n) rows, inside an NVTX range "profile": ncu skips the first ones,
    or profiles the range. A peer (`provider`) runs its forward once before the range."""
    import torch

    import normpass  # noqa: F401  (registers torch.ops.normpass)

    if provider not in PROVIDERS:
        raise ValueError(f"provider {provider!r}: one of {', '.join(PROVIDERS)}")
    if backward and provider != "normpass":
        raise ValueError("--backward profiles normpass's backward op only")
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    x, dy = (torch.randn(ELEMS // n, n, device="cuda", dtype=dt) for _ in range(2))
    w, b = (torch.randn(n, device="cuda", dtype=dt) for _ in range(2))
    center = norm == "layer_norm"
    ops = torch.ops.normpass
    if provider != "normpass":
        f = forward_fn(provider, center)
        op, args, kw = f, (x, w, b), {}
        op(*args)  # compiles (inductor), autotunes (Liger): outside the range
    elif backward:
        stats = ops.norm_with_stats(x, None, w, b if center else None, 1e-6, center=center)[2]
        op = ops.layer_norm_backward if center else ops.rms_norm_backward
        args = (dy, x, w, None, 1e-6, None, stats)
        kw = dict(has_bias=center, normalized_ndim=1, weight_offset=0.0, **({} if center else {"p": 1.0}))
    else:
        op, args, kw = (ops.layer_norm, (x, w, b, 1e-6), {}) if center else (ops.rms_norm, (x, w, 1e-6), {})
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("profile")
    for _ in range(calls):
        op(*args, **kw)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()


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


# The details page's metrics that `summary` shows (by name: each is in one section), and their titles.
SUMMARY = {
    "Duration": "time",
    "DRAM Throughput": "DRAM %",
    "Compute (SM) Throughput": "SM %",
    "Registers Per Thread": "regs",
    "Block Size": "block",
    "Grid Size": "grid",
    "Theoretical Occupancy": "occ %",
    "Achieved Occupancy": "achieved %",
    "Warp Cycles Per Issued Instruction": "cyc/issue",
}


def md_row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def summary(runs: dict[str, list[str]]) -> str:
    """A markdown row per provider and kernel (its run's last launch, from ncu's details page,
    `--csv`): time, DRAM and SM throughput, registers, launch shape, occupancy, cycles per issue."""
    titles = list(SUMMARY.values())
    out = [md_row(["provider", "kernel", *titles]), md_row(["---"] * (2 + len(titles)))]
    for provider, lines in runs.items():
        start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
        if start is None:
            raise ValueError(f"{provider}: no ncu details page (--csv) in its output")
        last: dict[str, dict[str, str]] = {}  # kernel -> column -> value, the last launch's
        launch: dict[str, str] = {}
        for row in csv.DictReader(lines[start:]):
            name = row["Kernel Name"]
            if launch.get(name) != row["ID"]:
                launch[name], last[name] = row["ID"], {}
            title = SUMMARY.get(row["Metric Name"])
            if title:
                unit = row["Metric Unit"]
                last[name][title] = row["Metric Value"] + (f" {unit}" if unit and title == "time" else "")
        if not last:
            raise ValueError(f"{provider}: no kernel launches in its ncu output")
        for name, cols in last.items():
            short = name if len(name) <= 40 else name[:37] + "..."
            out.append(md_row([provider, short, *(cols.get(t, "") for t in titles)]))
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the workload ncu wraps")
    r.add_argument("norm", choices=["rms_norm", "layer_norm"])
    r.add_argument("n", type=int)
    r.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    r.add_argument("--backward", action="store_true", help="the backward op (ncu: regex:norm_bwd)")
    r.add_argument("--provider", default="normpass", choices=PROVIDERS, help="a peer's forward instead")
    s = sub.add_parser("stalls", help="read ncu's source page (--csv --print-source sass)")
    s.add_argument("csv")
    s.add_argument("--top", type=int, default=12)
    m = sub.add_parser("summary", help="read providers' details pages (--csv): one table")
    m.add_argument("csv", nargs="+", help="one ncu --csv output per provider, named by its file")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        run(args.norm, args.n, args.dtype, args.backward, provider=args.provider)
    elif args.cmd == "stalls":
        with open(args.csv, newline="") as f:
            print(stalls(f, args.top))
    else:
        runs = {}
        for path in args.csv:
            with open(path, newline="") as f:
                runs[os.path.splitext(os.path.basename(path))[0]] = f.read().splitlines()
        print(summary(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
