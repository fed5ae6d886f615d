"""Tiny transformers models with random weights, shared by the tests (nothing downloads)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

# name: (config class, kwargs). Sizes are tiny; every model has several norm modules.
CONFIGS = {
    "llama": (
        "LlamaConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
        ),
    ),
    "gemma": (
        "GemmaConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=128,
        ),
    ),
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
}

MODEL_CLASSES = {
    "llama": "LlamaForCausalLM",
    "gemma": "GemmaForCausalLM",
    "t5": "T5ForConditionalGeneration",
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertForMaskedLM",
    "vit": "ViTForImageClassification",
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
    if name == "vit":
        return {
            "pixel_values": torch.randn(batch, 3, 16, 16, generator=g),
            "labels": torch.randint(0, 3, (batch,), generator=g),
        }
    ids = torch.randint(0, 128, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def count_norm_modules(model: torch.nn.Module) -> int:
    """Norm modules as the user sees them: every module whose class name says Norm."""
    return sum("norm" in type(m).__name__.lower() for m in model.modules())
