"""On CPU, a LoRA step over a bfloat16 base keeps no float32 copy of the frozen weights.

XLA:CPU multiplies and gathers bfloat16 in float32 and hoists the conversion of loop-invariant arrays:
without care a float32 copy of every stacked base weight, of the embedding table and of the LM head
sits in the step's temporaries (2 GiB of 3.7 at Qwen3-0.6B). The frozen base enters the layer scan as
uint16 bit patterns (``decoder._frozen_as_bits``), the table is gathered as bits, and a 16-bit head goes
to the chunked fused loss. Same values and gradients; the copies are gone from the compiled step.
"""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpref import lora, models
from jaxpref.losses.fused import fused_cross_entropy
from jaxpref.models import decoder, layers

CONFIG = dict(
    model_type="llama", vocab_size=5000, hidden_size=64, intermediate_size=192, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
)  # fmt: skip
B, T = 2, 64  # vocab > the chunked loss's 2048-column block: a whole-head float32 array is a copy


def lora_model() -> nnx.Module:
    cfg = models.ModelConfig.from_hf_dict(CONFIG)
    model = models.from_config(cfg, seed=0, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat_policy="full")
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lora.apply_lora(model, lora.LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=targets), rngs=nnx.Rngs(1))
    return model


def loss_and_grads(model: nnx.Module):
    graphdef, adapters, frozen = nnx.split(model, nnx.LoRAParam, ...)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, CONFIG["vocab_size"], (B, T)), jnp.int32)
    labels = jnp.roll(ids, -1, axis=1)

    def loss(adapters):
        m = nnx.merge(graphdef, adapters, frozen)
        hidden = m(ids, segment_ids=jnp.ones((B, T), jnp.int32))
        return fused_cross_entropy(hidden, m.lm_head_weight(), labels)[0]

    return jax.jit(jax.value_and_grad(loss)), adapters


def stacked_float32_copies(text: str) -> list[str]:
    """float32 arrays shaped like a stacked frozen kernel, the table or the head in an HLO module."""
    h, i, v, layers = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"], 3
    shapes = [f"f32[{layers},{h},{i}]", f"f32[{layers},{i},{h}]", f"f32[{v},{h}]", f"f32[{h},{v}]"]
    return [s for s in shapes if s in text]


def test_the_bit_patterns_change_nothing_but_memory(monkeypatch):
    model = lora_model()
    step, adapters = loss_and_grads(model)
    loss, grads = step(adapters)
    text = step.lower(adapters).compile().as_text()
    assert stacked_float32_copies(text) == []

    with monkeypatch.context() as m:
        m.setattr(decoder, "_frozen_as_bits", lambda state, frozen_base: (state, lambda s: s))
        m.setattr(layers, "platform", SimpleNamespace(kernel_platform=lambda: "gpu"))  # the table gathered as is
        plain, _ = loss_and_grads(model)
        plain_loss, plain_grads = plain(adapters)
        plain_text = plain.lower(adapters).compile().as_text()
    assert stacked_float32_copies(plain_text)  # the copies this test guards against (so it can fail)
    np.testing.assert_allclose(float(loss), float(plain_loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
