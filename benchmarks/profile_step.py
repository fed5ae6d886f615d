"""Where a training step's GPU time goes: torch.profiler tables for eager and normpass variants.

python benchmarks/profile_step.py --model gpt2 --variants eager,normpass+eager
python benchmarks/profile_step.py --model llama --amp --variants inductor,normpass+inductor
"""

from __future__ import annotations

import argparse
import sys

import torch
from bench_e2e import ATTENTION, build, variants
from torch.profiler import ProfilerActivity, profile


def train_step(fn, model, ids, amp: bool = False) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        loss = fn(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--variants", default="eager,normpass+eager")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--attention", default="sdpa", choices=ATTENTION)
    ap.add_argument("--grep", default="", help="comma-separated words: list the kernels named with one")
    ap.add_argument("--amp", action="store_true", help="fp32 weights, the step under bf16 autocast")
    args = ap.parse_args(argv)

    dtype = torch.float32 if args.amp else torch.bfloat16
    model = build(args.model, tiny=False, device="cuda", dtype=dtype, attention=args.attention)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device="cuda")
    for name in args.variants.split(","):
        backend = variants()[name]
        torch._dynamo.reset()
        fn = model if backend is None else torch.compile(model, backend=backend)

        for _ in range(3):
            train_step(fn, model, ids, args.amp)
        torch.cuda.synchronize()
        # record_shapes: a strided or misaligned operand sends normpass's kernels down their scalar
        # path, which the kernel table alone does not show.
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            train_step(fn, model, ids, args.amp)
            torch.cuda.synchronize()
        print(f"\n===== {args.model} / {name} =====")
        if backend is not None and getattr(backend, "reports", None):
            print(backend.reports[-1])
        averages = prof.key_averages()
        table = averages.table(sort_by="device_time_total", row_limit=args.rows, max_name_column_width=60)
        print(table)
        calls: dict[str, int] = {}
        for e in prof.events():
            if e.name.startswith("normpass::"):
                strides = getattr(e, "structured_input_strides", None)  # torch >= 2.13
                key = f"{e.name} {e.input_shapes}" + (f" strides {strides}" if strides else "")
                calls[key] = calls.get(key, 0) + 1
        for call, count in calls.items():
            print(f"{count:3d} x {call}")
        if args.grep:
            words = args.grep.split(",")
            kernels = [e for e in averages if e.device_type.name == "CUDA" and any(w in e.key for w in words)]
            total = sum(e.device_time_total for e in kernels)
            print(f"kernels matching {args.grep!r}: {total / 1e3:.3f} ms")
            for e in sorted(kernels, key=lambda e: -e.device_time_total):
                print(f"  {e.count:3d} x {e.device_time_total / e.count:8.1f} us  {e.key[:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
