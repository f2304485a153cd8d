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
import optax
from flax import nnx

from jaxpref import lora, models
from jaxpref import sharding as shd
from jaxpref import trainer as trainer_module
from jaxpref.losses.fused import fused_cross_entropy
from jaxpref.models import decoder, layers
from jaxpref.objectives.base import Objective
from jaxpref.sharding import make_mesh
from jaxpref.trainer import Trainer, stack_micro_batches

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


def ce_objective() -> Objective:
    def loss(model, batch, num_items, *, train):
        hidden = model(batch["input_ids"], segment_ids=batch["segment_ids"])
        return fused_cross_entropy(hidden, model.lm_head_weight(), batch["labels"], num_items=num_items)[0], {}

    return Objective(name="ce", count=lambda batch: jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32), loss=loss)


def copies_of_frozen_weights(text: str) -> list[str]:
    """Instructions of the compiled step's entry computation that build a whole stacked frozen kernel
    or the table, in any 16- or 32-bit type (parameters and free views excepted). The tied head's
    [H, V] transpose is not counted: the chunked loss reads [H, V] columns and copies a tied table into
    that layout once (reading [V, H] rows instead made the loss 40% slower on XLA:CPU)."""
    entry = text[text.index("\nENTRY") :]
    h, i, v, n = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"], 3
    shapes = [f"[{n},{h},{i}]", f"[{n},{i},{h}]", f"[{v},{h}]"]
    free = ("parameter(", "bitcast(", "get-tuple-element(", "tuple(", "while(")
    return [
        line.strip()[:120]
        for line in entry.splitlines()
        if any(f"{t}{s}" in line.split("=", 1)[-1][:40] for t in ("u16", "bf16", "f32") for s in shapes)
        and not any(f in line for f in free)
    ]


def test_the_trainer_holds_the_frozen_base_as_bits_in_place(monkeypatch):
    """The Trainer passes the frozen bfloat16 base to its step as uint16 views of the same memory, so
    the compiled step makes no copy of it (a bitcast inside the step is materialised by XLA:CPU: 1.4 GiB
    at Qwen3-0.6B); the step's result is the one of a Trainer that keeps the weights as they are."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CONFIG["vocab_size"], (B, T)).astype(np.int32)
    batch = {"input_ids": ids, "labels": np.roll(ids, -1, axis=1), "segment_ids": np.ones((B, T), np.int32)}

    def trainer(platform_name: str) -> Trainer:
        model = lora_model()
        with monkeypatch.context() as m:
            m.setattr(trainer_module.platform, "kernel_platform", lambda: platform_name)
            return Trainer(model, ce_objective(), optax.adam(1e-2), mesh=make_mesh(None),
                           trainable=lora.trainable_filter(model))  # fmt: skip

    model = lora_model()
    _, _, frozen = nnx.split(model, nnx.LoRAParam, ...)
    bits = trainer("cpu")
    held = {p: x for p, x in jax.tree_util.tree_flatten_with_path(bits.frozen)[0]}
    originals = {p: x for p, x in jax.tree_util.tree_flatten_with_path(frozen)[0]}
    assert held.keys() == originals.keys()
    for path, x in held.items():
        assert x.dtype == (jnp.uint16 if originals[path].dtype == jnp.bfloat16 else originals[path].dtype), path
        np.testing.assert_array_equal(np.asarray(x).view(originals[path].dtype), np.asarray(originals[path]))
    # a view, not a copy: the held array and the model's frozen weight are one buffer
    model_frozen = jax.tree.leaves(nnx.split(bits.model(), nnx.LoRAParam, ...)[2])
    assert [x.dtype for x in model_frozen] == [x.dtype for x in jax.tree.leaves(frozen)]
    pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(bits.frozen)]
    assert [x.unsafe_buffer_pointer() for x in model_frozen] == pointers

    stacked = shd.global_batch(stack_micro_batches([batch]), bits.mesh, leading_dims=1)
    args = (bits.params, bits.frozen, bits.companions, bits.opt_state, stacked, jnp.int32(0))
    assert copies_of_frozen_weights(bits._train_step.lower(*args).compile().as_text()) == []
    plain = trainer("gpu")  # the weights kept as bfloat16 (what GPUs and TPUs get)
    assert all(x.dtype != jnp.uint16 for x in jax.tree.leaves(plain.frozen))
    args = (plain.params, plain.frozen, plain.companions, plain.opt_state, stacked, jnp.int32(0))
    assert copies_of_frozen_weights(plain._train_step.lower(*args).compile().as_text())  # the test can fail

    for _ in range(2):
        a, b = bits.train_step([batch]), plain.train_step([batch])
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
    for x, y in zip(jax.tree.leaves(bits.params), jax.tree.leaves(plain.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
