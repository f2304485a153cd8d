"""Tiny random transformers models for model tests (built offline with transformers itself)."""

from __future__ import annotations

import copy
from functools import partial

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
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
    # Gemma 2: [sliding, full]; soft-caps low enough to bite on these small scores and logits, and a
    # query_pre_attn_scalar that is not head_dim.
    "gemma2": (
        Gemma2Config, Gemma2ForCausalLM,
        {"tie_word_embeddings": True, "query_pre_attn_scalar": 4, "attn_logit_softcapping": 0.5,
         "final_logit_softcapping": 1.0},
    ),
    # [sliding, full, sliding] with a window shorter than the sequences; transformers' default caps.
    "gemma2_window": (
        Gemma2Config, Gemma2ForCausalLM, {"num_hidden_layers": 3, "sliding_window": 5, "query_pre_attn_scalar": 8}
    ),
    # Gemma 3: q/k norms, [sliding, full, sliding, full], linear RoPE scaling on the full layers only,
    # another base on the sliding ones, window 6.
    "gemma3": (
        Gemma3TextConfig, Gemma3ForCausalLM,
        {"num_hidden_layers": 4, "head_dim": 16, "sliding_window": 6, "sliding_window_pattern": 2,
         "query_pre_attn_scalar": 16, "tie_word_embeddings": True, "final_logit_softcapping": 3.0,
         "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}},
    ),
    # [sliding, sliding, full], untied head, no final cap, window 4, transformers' default RoPE bases.
    "gemma3_pattern3": (
        Gemma3TextConfig, Gemma3ForCausalLM,
        {"num_hidden_layers": 3, "sliding_window": 4, "sliding_window_pattern": 3, "query_pre_attn_scalar": 8},
    ),
}  # fmt: skip


def build_hf(case: str, seed: int = 0, **overrides):
    """A tiny transformers model of ``case`` with every parameter (norms and biases too) random."""
    config_cls, model_cls, case_overrides = CASES[case]
    torch.manual_seed(seed)
    # Deep-copied: transformers writes rope_theta into the rope dicts it is given (LLAMA3_ROPE is shared).
    config = config_cls(**copy.deepcopy({**TINY, **case_overrides, **overrides}))
    model = model_cls(config).eval()
    unit = 0.0 if config.model_type.startswith("gemma") else 1.0  # Gemma norms scale by 1 + weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(unit + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.array(ids))).logits.float().numpy()


def capped_logits(model, hidden, *, use_adapters: bool = True):
    """float32 logits [..., V] from hidden [..., H], soft-capped as transformers does (``cap * tanh(z / cap)``
    with ``config.final_logit_softcapping``): the reference, independent of ``CausalLM.logits``."""
    w = model.lm_head_weight(use_adapters=use_adapters)
    z = jnp.einsum("...h,hv->...v", hidden, w, preferred_element_type=jnp.float32)
    cap = model.config.final_logit_softcapping
    return z if cap is None else cap * jnp.tanh(z / cap)


@partial(nnx.jit, static_argnames=("use_adapters",))
def _jax_logits(model, ids, positions, segment_ids, use_adapters):
    hidden = model(ids, positions=positions, segment_ids=segment_ids, use_adapters=use_adapters)
    return capped_logits(model, hidden, use_adapters=use_adapters)


def jax_logits(model, ids, *, positions=None, segment_ids=None, use_adapters: bool = True) -> np.ndarray:
    """jaxpref logits, float32 [B, T, V] (jitted: eager scans would recompile on every call)."""
    return np.asarray(_jax_logits(model, jnp.asarray(ids, jnp.int32), positions, segment_ids, use_adapters))


def random_ids(shape: tuple[int, ...], vocab: int = TINY["vocab_size"], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)
