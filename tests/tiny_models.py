"""Tiny transformers models with random weights, shared by the tests (nothing downloads)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

# A decoder of two layers, 4 query and 2 key/value heads of 8 (the Llama-family configs share it).
DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=128,
)
# Special tokens inside the tiny vocabulary (some configs default to ids beyond it).
TOKENS = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)

# name: (config class, kwargs). Sizes are tiny; every model has several norm modules.
CONFIGS = {
    "llama": ("LlamaConfig", DECODER),
    "gemma": ("GemmaConfig", DECODER),
    "t5": (
        "T5Config",
        dict(
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            vocab_size=128,
            decoder_start_token_id=0,
        ),
    ),
    "gpt2": (
        "GPT2Config",
        dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=128, bos_token_id=0, eos_token_id=0),
    ),
    "bert": (
        "BertConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=128,
            max_position_embeddings=64,
        ),
    ),
    "vit": (
        "ViTConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=16,
            patch_size=4,
            num_channels=3,
            num_labels=3,
        ),
    ),
    # ConvNeXt's channels-first LayerNorm (stem and downsampling; transformers permutes to channels
    # last around F.layer_norm) beside its blocks' channels-last ones.
    "convnext": (
        "ConvNextConfig",
        dict(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=4, num_labels=3),
    ),
    # Further norm forms of current models: per-head q/k RMSNorm (Qwen3), sandwich norms with q/k
    # norms of weight 1 + w (Gemma3), norms after attention and MLP over the whole projection
    # (OLMo2), a LayerNorm without bias written out in fp32 (Cohere), a state-space model's RMSNorm
    # with its residual kept in fp32 (Mamba).
    "qwen3": ("Qwen3Config", DECODER),
    "gemma3": ("Gemma3TextConfig", DECODER),
    "olmo2": ("Olmo2Config", DECODER),
    "cohere": ("CohereConfig", {**DECODER, **TOKENS}),
    "mamba": (
        "MambaConfig",
        dict(hidden_size=32, num_hidden_layers=2, state_size=4, vocab_size=128, **TOKENS),
    ),
}

MODEL_CLASSES = {
    "llama": "LlamaForCausalLM",
    "gemma": "GemmaForCausalLM",
    "t5": "T5ForConditionalGeneration",
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertForMaskedLM",
    "vit": "ViTForImageClassification",
    "convnext": "ConvNextForImageClassification",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "cohere": "CohereForCausalLM",
    "mamba": "MambaForCausalLM",
}


def build(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """A tiny model with random weights; dropout off so eager and compiled runs compare."""
    cls_name, kwargs = CONFIGS[name]
    config = getattr(transformers, cls_name)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASSES[name])(config).to(dtype)
    return model.eval()


def example_batch(name: str, batch: int = 2, seq: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    """Keyword inputs that make the model return a loss."""
    g = torch.Generator().manual_seed(seed)
    if name in ("vit", "convnext"):
        return {
            "pixel_values": torch.randn(batch, 3, 16, 16, generator=g),
            "labels": torch.randint(0, 3, (batch,), generator=g),
        }
    ids = torch.randint(0, 128, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def count_norm_modules(model: torch.nn.Module) -> int:
    """Norm modules as the user sees them: every module whose class name says Norm."""
    return sum("norm" in type(m).__name__.lower() for m in model.modules())
