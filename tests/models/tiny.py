"""Tiny random transformers models for model tests (built offline with transformers itself)."""

from __future__ import annotations

import copy
from functools import partial

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
LINEAR_ROPE = {"rope_type": "linear", "factor": 2.0}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

# Phi-3: head_dim 8 (hidden 32 / 4 heads); longrope factors are per rotary frequency (rotary_dim / 2).
PHI3 = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
PHI3_LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0, 1.3, 2.1, 3.7],
    "long_factor": [1.5, 2.7, 4.9, 11.0],
}

# name -> (config class, model class, overrides of TINY)
CASES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "llama_mha": (LlamaConfig, LlamaForCausalLM, {"num_key_value_heads": 4}),
    "llama_mqa_bias": (LlamaConfig, LlamaForCausalLM, {"num_key_value_heads": 1, "attention_bias": True}),
    "llama3_rope": (LlamaConfig, LlamaForCausalLM, {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0}),
    "llama_linear_rope": (LlamaConfig, LlamaForCausalLM, {"rope_scaling": LINEAR_ROPE}),
    "llama_tied": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": True}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "mistral_window": (MistralConfig, MistralForCausalLM, {"sliding_window": 5}),
    "qwen2_window": (
        Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}
    ),
    "qwen3_window": (
        Qwen3Config, Qwen3ForCausalLM,
        {"head_dim": 16, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0},
    ),
    "phi3": (Phi3Config, Phi3ForCausalLM, PHI3),
    # original context 16 of 64: sequences longer than 16 use the long factors (attention factor
    # sqrt(1 + ln 4 / ln 16))
    "phi3_longrope": (
        Phi3Config, Phi3ForCausalLM,
        {**PHI3, "original_max_position_embeddings": 16, "rope_scaling": PHI3_LONGROPE},
    ),
    "phi3_partial": (
        Phi3Config, Phi3ForCausalLM,
        {**PHI3, "partial_rotary_factor": 0.5, "tie_word_embeddings": True, "rope_theta": 500.0},
    ),
    "phi3_window": (Phi3Config, Phi3ForCausalLM, {**PHI3, "sliding_window": 5, "num_key_value_heads": 1}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    "qwen3_tied": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 12, "tie_word_embeddings": True}),
}


def build_hf(case: str, seed: int = 0, **overrides):
    """A tiny transformers model of ``case`` with every parameter (norms and biases too) random."""
    config_cls, model_cls, case_overrides = CASES[case]
    torch.manual_seed(seed)
    # Deep-copied: transformers writes rope_theta into the rope dicts it is given (LLAMA3_ROPE is shared).
    config = config_cls(**copy.deepcopy({**TINY, **case_overrides, **overrides}))
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.array(ids))).logits.float().numpy()


@partial(nnx.jit, static_argnames=("use_adapters",))
def _jax_logits(model, ids, positions, segment_ids, use_adapters):
    hidden = model(ids, positions=positions, segment_ids=segment_ids, use_adapters=use_adapters)
    return model.logits(hidden, use_adapters=use_adapters)


def jax_logits(model, ids, *, positions=None, segment_ids=None, use_adapters: bool = True) -> np.ndarray:
    """jaxpref logits, float32 [B, T, V] (jitted: eager scans would recompile on every call)."""
    return np.asarray(_jax_logits(model, jnp.asarray(ids, jnp.int32), positions, segment_ids, use_adapters))


def random_ids(shape: tuple[int, ...], vocab: int = TINY["vocab_size"], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)
