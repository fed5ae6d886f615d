"""CPU normalization benchmark: normpass's C++ kernels against torch's own paths.

Shapes hold 4M elements; weight (and bias for LayerNorm) in the input dtype; eps 1e-6. Each cell is
the lowest of 3 medians of `torch.utils.benchmark.Timer.blocked_autorange`, in ms, with all threads;
"fwd+bwd" is `y = f(x, w[, b]); torch.autograd.grad(y, (x, w[, b]), dy)`. Prints a markdown table with
the machine.

    python benchmarks/bench_cpu.py                 # all shapes, fp32 and bf16
    python benchmarks/bench_cpu.py --no-inductor --min-time 0.1
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import normpass  # noqa: F401  (registers the ops)

ops = torch.ops.normpass
SHAPES = [(4096, 1024), (1024, 4096), (256, 16384)]
DTYPES = [torch.float32, torch.bfloat16]
EPS = 1e-6


def llama_rms_norm(x, w):
    """The hand-written RMSNorm of Llama-style models."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return w * h.to(x.dtype)


def candidates(inductor: bool):
    """(family, name, fn(x, w, b)) for every implementation timed."""
    rows = [
        ("rms", "normpass rms_norm", lambda x, w, b: ops.rms_norm(x, w, EPS)),
        ("rms", "F.rms_norm", lambda x, w, b: F.rms_norm(x, x.shape[-1:], w, EPS)),
        ("rms", "hand-written (Llama)", lambda x, w, b: llama_rms_norm(x, w)),
    ]
    if inductor:
        # One graph per shape, dtype and grad mode: more than dynamo's default recompile limit.
        torch._dynamo.config.recompile_limit = 64
        compiled = torch.compile(llama_rms_norm, dynamic=False)
        rows.append(("rms", "inductor on hand-written", lambda x, w, b: compiled(x, w)))
    rows += [
        ("ln", "normpass layer_norm", lambda x, w, b: ops.layer_norm(x, w, b, EPS)),
        ("ln", "F.layer_norm", lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, EPS)),
    ]
    return rows


def time_ms(fn, min_time: float, rounds: int = 3) -> float:
    """The lowest of `rounds` medians: on a shared machine a round can land on someone else's burst."""
    return min(_median_ms(fn, min_time) for _ in range(rounds))


def _median_ms(fn, min_time: float) -> float:
    # Timer defaults to one thread; time with all of them, as the models run.
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_time).median * 1e3


def measure(fn, family, shape, dtype, min_time):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    w = torch.randn(shape[-1], generator=g).to(dtype)
    b = torch.randn(shape[-1], generator=g).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    with torch.no_grad():
        fn(x, w, b)  # warm up (and compile)
        fwd = time_ms(lambda: fn(x, w, b), min_time)
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    wrt = (xg, wg, bg) if family == "ln" else (xg, wg)

    def step():
        torch.autograd.grad(fn(xg, wg, bg), wrt, dy)

    step()
    return fwd, time_ms(step, min_time)


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return (
        f"{model}, {torch.get_num_threads()} threads, torch {torch.__version__} "
        f"(ATen CPU capability {torch.backends.cpu.get_cpu_capability()}), {datetime.date.today()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per median (default 0.2)")
    parser.add_argument(
        "--no-inductor", action="store_true", help="skip torch.compile of the hand-written form"
    )
    args = parser.parse_args()

    rows = candidates(inductor=not args.no_inductor)
    print(f"Machine: {machine()}\n")
    print("Forward / forward+backward, ms (lowest of 3 medians); in brackets: normpass's speedup.\n")
    header = "| dtype | shape | " + " | ".join(name for _, name, _ in rows) + " |"
    print(header)
    print("|" + "---|" * (len(rows) + 2))
    for dtype in DTYPES:
        for shape in SHAPES:
            times = {name: measure(fn, fam, shape, dtype, args.min_time) for fam, name, fn in rows}
            base = {"rms": times["normpass rms_norm"], "ln": times["normpass layer_norm"]}
            cells = []
            for fam, name, _ in rows:
                (f, fb), (nf, nfb) = times[name], base[fam]
                ratio = "" if name.startswith("normpass") else f" ({f / nf:.1f}x / {fb / nfb:.1f}x)"
                cells.append(f"{f:.2f} / {fb:.2f}{ratio}")
            dt = str(dtype).removeprefix("torch.")
            print(f"| {dt} | {shape[0]}x{shape[1]} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
