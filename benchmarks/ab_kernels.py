"""A/B of normpass's CUDA kernels across builds, in one run on one machine.

Each variant is a source tree (built in place, all trees in parallel) plus optional environment
settings. `bench_kernels.py --providers "normpass(ops)"` runs for every variant in turn, round after
round, so that drift of the machine hits all variants alike. Prints, per dtype, norm and N, forward
and forward+backward TB/s of each variant in each round (the fused residual add: forward only).

    # two trees: git archive <rev> | tar -x -C .snap/base, then
    python benchmarks/ab_kernels.py --build --rounds 2 base=.snap/base new=.
    # one build, a runtime switch:
    python benchmarks/ab_kernels.py new=. new-off=.:NORMPASS_STAGED=0
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

BENCH = os.path.join("benchmarks", "bench_kernels.py")


@dataclass
class Variant:
    name: str
    tree: str
    env: dict[str, str] = field(default_factory=dict)


def parse_variant(spec: str) -> Variant:
    """`name=tree[:VAR=value,...]`, e.g. `off=.:NORMPASS_STAGED=0`."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"variant {spec!r}: expected name=tree[:VAR=value,...]")
    tree, _, settings = rest.partition(":")
    env = {}
    for item in filter(None, settings.split(",")):
        var, eq, value = item.partition("=")
        if not eq or not var:
            raise argparse.ArgumentTypeError(f"variant {spec!r}: setting {item!r} is not VAR=value")
        env[var] = value
    return Variant(name, os.path.abspath(tree), env)


def build(trees: list[str]) -> None:
    """`setup.py build_ext --inplace` in every tree at once, the cores shared between them."""
    jobs = max(1, (os.cpu_count() or 2) // len(trees))
    env = {**os.environ, "MAX_JOBS": str(jobs)}
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    start = time.time()
    procs = []
    for tree in trees:
        log = open(os.path.join(tempfile.gettempdir(), f"ab_build_{len(procs)}.log"), "w")
        cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
        procs.append(
            (tree, log, subprocess.Popen(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT))
        )
    for tree, log, proc in procs:
        proc.wait()
        log.close()
        if proc.returncode != 0:
            tail = open(log.name).read()[-3000:]
            raise SystemExit(f"build failed in {tree} (log {log.name}):\n{tail}")
    print(f"built {len(trees)} tree(s) in {time.time() - start:.0f} s ({jobs} jobs each)", flush=True)


def read_cells(path: str) -> dict[tuple[str, str, int], tuple[str, str]]:
    """bench.csv's normpass cells: (dtype, norm, N) -> (forward, forward+backward)."""
    cells = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["provider"].startswith("normpass"):
                cells[(row["dtype"], row["norm"], int(row["n"]))] = (row["fwd"], row["fwdbwd"])
    return cells


def short(v: str) -> str:
    try:
        return f"{float(v):.2f}"
    except ValueError:
        return "-" if not v else "err"


def table(runs: list[tuple[str, int, dict]]) -> str:
    """One markdown table: a column per (variant, round), `fwd / fwd+bwd` in each cell."""
    keys = list(dict.fromkeys(k for _, _, cells in runs for k in cells))
    head = "| dtype | norm | N | " + " | ".join(f"{name} r{r}" for name, r, _ in runs) + " |"
    lines = [head, "|---" * (3 + len(runs)) + "|"]
    for key in keys:
        vals = []
        for _, _, cells in runs:
            fwd, fb = cells.get(key, ("", ""))
            vals.append(short(fwd) if not fb else f"{short(fwd)} / {short(fb)}")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", type=parse_variant, help="name=tree[:VAR=value,...]")
    ap.add_argument("--build", action="store_true", help="build every tree in place first")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--ns", default=None, help="passed to bench_kernels.py")
    ap.add_argument("--timer", default=None, help="passed to bench_kernels.py (trees from e845459 on)")
    ap.add_argument("--out", default=None, help="folder for ab.md")
    args = ap.parse_args()
    if len({v.name for v in args.variants}) != len(args.variants):
        ap.error("variant names must differ")
    if args.build:
        build(list(dict.fromkeys(v.tree for v in args.variants)))

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(1, args.rounds + 1):
            for v in args.variants:
                out = os.path.join(tmp, f"{v.name}_{r}")
                cmd = [sys.executable, BENCH, "--providers", "normpass(ops)", "--compile-budget", "0"]
                cmd += ["--dtypes", args.dtypes, "--out", out] + (["--ns", args.ns] if args.ns else [])
                cmd += ["--timer", args.timer] if args.timer else []
                path = os.pathsep.join(filter(None, [v.tree, os.environ.get("PYTHONPATH")]))
                env = {**os.environ, **v.env, "PYTHONPATH": path}  # this tree's normpass first
                start = time.time()
                done = subprocess.run(cmd, cwd=v.tree, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(
                        f"{v.name} round {r} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
                    )
                ceiling = next((ln for ln in done.stdout.splitlines() if "ceiling" in ln), "")
                print(f"round {r} {v.name}: {time.time() - start:.0f} s; {ceiling}", flush=True)
                runs.append((v.name, r, read_cells(os.path.join(out, "bench.csv"))))
                # The table so far after every run, so that a call cut short still reports.
                if args.out:
                    os.makedirs(args.out, exist_ok=True)
                    with open(os.path.join(args.out, "ab.md"), "w") as f:
                        f.write(table(runs) + "\n")
            print("\n" + table(runs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
