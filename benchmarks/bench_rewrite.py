"""How long normpass.rewrite takes on the graph of a Llama-style model, and that it grows linearly.

Captures a transformers LlamaConfig model (tiny hidden size, random weights) with torch.export
(ATen IR) and with Dynamo (torch IR), then times `normpass.api.rewrite` alone on fresh copies of each
graph (capture time excluded). Run: python benchmarks/bench_rewrite.py [--layers 8 16 32] [--repeat 5]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
import transformers

from normpass import api


class Loss(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, input_ids):
        return self.m(input_ids=input_ids, labels=input_ids).loss


def llama(layers: int) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        use_cache=False,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return Loss(transformers.LlamaForCausalLM(config).eval())


def capture_export(model, ids):
    return torch.export.export(model, (ids,), strict=False).graph_module


def capture_dynamo(model, ids):
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=record, fullgraph=True)(ids)
    return graphs[0]


def time_rewrite(gm: torch.fx.GraphModule, repeat: int) -> tuple[float, int, int]:
    """(median seconds, sites rewritten, nodes before)."""
    nodes = len(gm.graph.nodes)
    times, sites = [], 0
    for _ in range(repeat):
        g = copy.deepcopy(gm)
        t0 = time.perf_counter()
        _, rep = api.rewrite(g, report=True)
        times.append(time.perf_counter() - t0)
        sites = len(rep.rewritten)
    return statistics.median(times), sites, nodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    cpu, threads = platform.processor() or platform.machine(), torch.get_num_threads()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {cpu}, {threads} threads")
    print("| IR | layers | graph nodes | sites rewritten | rewrite time (median) | per 1000 nodes |")
    print("|---|---|---|---|---|---|")
    ids = torch.randint(0, 128, (2, 16))
    for ir, capture in (("torch.export (ATen)", capture_export), ("Dynamo (torch)", capture_dynamo)):
        for layers in args.layers:
            gm = capture(llama(layers), ids)
            seconds, sites, nodes = time_rewrite(gm, args.repeat)
            per_k = seconds / nodes * 1e6  # ms per 1000 nodes
            print(f"| {ir} | {layers} | {nodes} | {sites} | {seconds * 1e3:.0f} ms | {per_k:.0f} ms |")


if __name__ == "__main__":
    main()
