"""End-to-end training step: eager vs inductor vs normpass (over inductor and over eager).

bf16 forward + backward of transformers models with random weights (ANCHORS.md's two models by
default), or with `--amp` fp32 weights under bf16 autocast. Prints tokens/s, peak memory and compile
time, and writes a markdown table.

    python benchmarks/bench_e2e.py --out results/          # GPU, the ANCHORS.md sizes
    python benchmarks/bench_e2e.py --models llama --amp    # fp32 weights, bf16 autocast
    python benchmarks/bench_e2e.py --tiny --device cpu     # a quick check that it runs
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from typing import Any

import torch

import normpass

MODELS = {
    # name: (config class, full-size kwargs, tiny kwargs)
    "llama": (
        "LlamaConfig",
        dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=8,
            num_attention_heads=16,
            num_key_value_heads=16,
            vocab_size=32000,
            max_position_embeddings=4096,
        ),
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=256,
            max_position_embeddings=256,
        ),
    ),
    "gpt2": (
        "GPT2Config",
        dict(n_embd=1280, n_layer=12, n_head=20, n_positions=4096, vocab_size=50257),
        dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=256),
    ),
}


# "sdpa-causal": transformers' SDPA attention, with the causal mask left to SDPA's is_causal whenever
# the mask would be plain causal (no padding, no offset, no window), in eager and under Dynamo alike.
# Plain "sdpa" under Dynamo builds an explicit mask tensor instead with some versions (measured:
# transformers 5.17 on torch 2.11; not transformers 5.23 on torch 2.13), which moves cuDNN attention to
# a 2-3x slower kernel in every compiled variant: a cost of the tracing, not of any compiler.
ATTENTION = ("sdpa", "sdpa-causal")


def _register_sdpa_causal() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

    def mask(**kwargs):
        plain_causal = (
            kwargs.get("attention_mask") is None
            and kwargs.get("allow_is_causal_skip", True)
            and kwargs["q_length"] == kwargs["kv_length"]
            and kwargs.get("q_offset", 0) == 0
            and kwargs.get("kv_offset", 0) == 0
            and kwargs.get("local_size") is None
            and kwargs.get("mask_function", causal_mask_function) is causal_mask_function
        )
        return None if plain_causal else sdpa_mask(**kwargs)  # None: SDPA's own is_causal=True

    AttentionInterface.register("sdpa-causal", sdpa_attention_forward)
    AttentionMaskInterface.register("sdpa-causal", mask)


def build(name: str, tiny: bool, device: str, dtype: torch.dtype, attention: str = "sdpa") -> torch.nn.Module:
    import transformers

    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    if attention == "sdpa-causal":
        _register_sdpa_causal()
    cls_name, full, small = MODELS[name]
    config = getattr(transformers, cls_name)(**(small if tiny else full))
    config._attn_implementation = attention
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype)


def variants() -> dict[str, object]:
    return {
        "eager": None,
        # Dynamo's graph run eagerly: the baseline of normpass+eager (Dynamo alone changes some
        # kernels, e.g. transformers passes SDPA an explicit causal mask while tracing).
        "dynamo+eager": "eager",
        "inductor": "inductor",
        "normpass+inductor": normpass.backend(compiler="inductor"),
        "normpass+eager": normpass.backend(compiler="eager"),
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_variants(
    model, backends: dict[str, Any], ids, device: str, steps: int, warmup: int, amp: bool = False
) -> dict[str, dict[str, float]]:
    """Each variant's first call (it compiles), `warmup` rounds, then `steps` timed rounds that run
    every variant once, so that the machine's drift falls on all alike (timed one after the other,
    the GEMMs of the variant run second once ran 3.5% slower). A variant that fails is reported on
    stderr and dropped; the others go on."""
    torch._dynamo.reset()

    def training_step(fn):
        def step():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
                loss = fn(input_ids=ids, labels=ids).loss
            loss.backward()
            for p in model.parameters():
                p.grad = None

        return step

    running = {
        name: training_step(model if backend is None else torch.compile(model, backend=backend))
        for name, backend in backends.items()
    }
    first: dict[str, float] = {}
    times: dict[str, list[float]] = {name: [] for name in running}
    peak: dict[str, int] = {}
    for i in range(1 + warmup + steps):
        what = "first call" if i == 0 else "warm-up" if i <= warmup else f"round {i - warmup}/{steps}"
        print(f"[{what}]", end=" ", file=sys.stderr, flush=True)
        for name, step in list(running.items()):
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                t0 = time.perf_counter()
                step()
                sync(device)
            except Exception as e:  # report the variant, keep benchmarking the rest
                print(f"\n{name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                del running[name], times[name]
                continue
            dt = time.perf_counter() - t0
            if device == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated())
            if i == 0:
                first[name] = dt
            elif i > warmup:
                times[name].append(dt)
        print("", file=sys.stderr, flush=True)
    results = {}
    for name, t in times.items():
        step_s = statistics.median(t)
        results[name] = {
            "step_ms": step_s * 1e3,
            "tokens_per_s": ids.numel() / step_s,
            "peak_gib": peak[name] / 2**30 if device == "cuda" else float("nan"),
            "compile_s": max(0.0, first[name] - step_s) if backends[name] is not None else 0.0,
        }
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama,gpt2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny models and shapes, for a quick check")
    ap.add_argument("--variants", default=",".join(variants()))
    ap.add_argument("--attention", default="sdpa", choices=ATTENTION, help="see ATTENTION above")
    ap.add_argument("--amp", action="store_true", help="fp32 weights, the step under bf16 autocast")
    ap.add_argument("--out", default=None, help="folder for e2e.md")
    args = ap.parse_args(argv)
    if args.tiny:
        args.batch, args.seq, args.steps, args.warmup = 2, 64, 3, 1
    dtype = torch.float32 if args.amp else torch.bfloat16

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    precision = "fp32 weights, bf16 autocast" if args.amp else "bf16"
    header = (
        f"{device_name}, torch {torch.__version__}, normpass {normpass.__version__}, "
        f"{datetime.date.today()}; {precision} training step, batch {args.batch} x {args.seq} tokens, "
        f"attention {args.attention}"
    )
    print(header, flush=True)
    lines = [
        header,
        "",
        "| model | variant | step ms | tokens/s | vs eager | vs dynamo+eager | vs inductor | peak GiB "
        "| compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    chosen = {k: v for k, v in variants().items() if k in args.variants.split(",")}
    for name in args.models.split(","):
        model = build(name, args.tiny, args.device, dtype, args.attention)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=args.device)
        results = run_variants(model, chosen, ids, args.device, args.steps, args.warmup, args.amp)
        for variant, r in results.items():
            rel = [
                f"{r['tokens_per_s'] / results[base]['tokens_per_s']:.3f}x" if base in results else "-"
                for base in ("eager", "dynamo+eager", "inductor")
            ]
            lines.append(
                f"| {name} | {variant} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {' | '.join(rel)} | "
                f"{r['peak_gib']:.2f} | {r['compile_s']:.1f} |"
            )
        del model
    table = "\n".join(lines)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "e2e.md"), "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
