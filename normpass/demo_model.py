"""The model `normpass demo` runs: a small Llama-style decoder with random weights.

With transformers installed it is transformers' own LlamaForCausalLM (from a LlamaConfig; nothing
downloads). Without it, `TinyLlama` below stands in: the same layout and the same hand-written
RMSNorm form (upcast to fp32, x * rsqrt(mean(x^2) + eps), downcast, times the weight).

Example:
    >>> model, what = build(layers=2, hidden=64)
    >>> logits = model(torch.randint(0, 512, (2, 16)))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TinyLlama", "build"]


class RMSNorm(nn.Module):
    """Llama's RMSNorm as Llama writes it (the R1 form in PATTERNS.md)."""

    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.input_layernorm = RMSNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.post_attention_layernorm = RMSNorm(hidden)
        self.gate_up = nn.Linear(hidden, 2 * 4 * hidden, bias=False)
        self.down = nn.Linear(4 * hidden, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.input_layernorm(x)).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, s, d))
        gate, up = self.gate_up(self.post_attention_layernorm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class TinyLlama(nn.Module):
    """A Llama-style decoder without transformers: input_ids -> logits."""

    def __init__(self, layers: int, hidden: int, heads: int, vocab: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList([Block(hidden, heads) for _ in range(layers)])
        self.norm = RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


class LogitsOnly(nn.Module):
    """transformers' model as a plain function of input_ids, returning the logits tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def build(
    layers: int = 2,
    hidden: int = 256,
    heads: int = 4,
    vocab: int = 512,
    *,
    use_transformers: bool | None = None,
) -> tuple[nn.Module, str]:
    """The demo model (input_ids -> logits, random weights, eval mode) and a one-line description.

    use_transformers: None picks transformers' LlamaForCausalLM when it is installed.
    """
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    if use_transformers is not False:
        try:
            import transformers
        except ImportError:
            if use_transformers:
                raise
        else:
            config = transformers.LlamaConfig(
                hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                max_position_embeddings=4096,
            )  # fmt: skip
            config._attn_implementation = "sdpa"
            model = LogitsOnly(transformers.LlamaForCausalLM(config)).eval()
            return model, f"transformers {transformers.__version__} LlamaForCausalLM"
    return TinyLlama(layers, hidden, heads, vocab).eval(), "normpass.demo_model.TinyLlama"
