"""The objectives read the model's final logit soft-cap (``config.final_logit_softcapping``): SFT,
GRPO token log-probs and entropy, the preference sequence statistics, and the KD guard, against full
capped logits of the same tiny model (``CausalLM.logits`` caps too)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref import models
from jaxpref.losses import cross_entropy_loss
from jaxpref.objectives.grpo import token_logps
from jaxpref.objectives.kd import build_kd
from jaxpref.objectives.preference import sequence_stats
from jaxpref.objectives.sft import build_sft

TINY = dict(
    model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
)  # fmt: skip
CAP = 0.5  # small against this random model's logits, so the cap changes every number below


def models_with_and_without_cap():
    plain = models.from_config(models.ModelConfig.from_hf_dict(TINY), seed=0)
    capped = models.from_config(models.ModelConfig.from_hf_dict(TINY), seed=0)
    capped.config = dataclasses.replace(capped.config, final_logit_softcapping=CAP)
    return plain, capped


def batch(seed=0, b=2, t=10):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 64, size=(b, t)).astype(np.int32)
    mask = rng.random((b, t)) > 0.3
    return {
        "input_ids": jnp.asarray(ids),
        "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
        "segment_ids": jnp.ones((b, t), jnp.int32),
        "labels": jnp.asarray(np.where(mask, np.roll(ids, -1, 1), -100)),
        "loss_mask": jnp.asarray(mask),
    }


def full_logits(model, bt):
    hidden = model(bt["input_ids"], positions=bt["positions"], segment_ids=bt["segment_ids"], deterministic=True)
    return model.logits(hidden)


def test_sft_grpo_and_preference_use_the_capped_logits():
    plain, capped = models_with_and_without_cap()
    bt = batch()
    z = full_logits(capped, bt)
    assert float(jnp.max(jnp.abs(z))) <= CAP and not np.allclose(z, full_logits(plain, bt), atol=1e-2)

    sft = build_sft(SimpleNamespace(fused_kernel=None))
    want = cross_entropy_loss(z, bt["labels"], mask=bt["loss_mask"])[0]
    got = sft.loss(capped, bt, jnp.sum(bt["loss_mask"]).astype(jnp.float32), train=False)[0]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)

    logp = jax.nn.log_softmax(z / 0.7, axis=-1)
    labels = jnp.clip(bt["labels"], 0, 63)
    want = jnp.where(bt["loss_mask"], jnp.take_along_axis(logp, labels[..., None], -1)[..., 0], 0.0)
    np.testing.assert_allclose(token_logps(capped, bt, temperature=0.7), want, rtol=2e-5, atol=2e-5)

    stats = sequence_stats(capped, bt, train=False, wpo=True)
    logp1 = jax.nn.log_softmax(z, axis=-1)
    tok = jnp.where(bt["loss_mask"], jnp.take_along_axis(logp1, labels[..., None], -1)[..., 0], 0.0)
    np.testing.assert_allclose(stats.logps, jnp.sum(tok, -1), rtol=2e-5, atol=2e-5)
    mean_z = jnp.sum(jnp.where(bt["loss_mask"], jnp.mean(z, -1), 0.0), -1)
    np.testing.assert_allclose(stats.logit_sums, mean_z, rtol=2e-5, atol=2e-5)


def test_scheduled_kd_temperature_with_a_cap_is_a_clear_error():
    _, capped = models_with_and_without_cap()
    cfg = SimpleNamespace(
        fused_kernel=None, kd_alpha=1.0, kd_ce_alpha=0.0, kd_temperature=2.0, kd_beta=0.0, kd_normalize_topk=False,
        kd_zscore_base_temp=None, kd_teacher_model=None, kd_teacher_top_k=4, kd_temperature_min=1.0,
    )  # fmt: skip
    bt = batch()
    k = 4
    bt |= {
        "target_token_ids": jnp.zeros((2, 10, k), jnp.int32),
        "target_logprobs": jnp.full((2, 10, k), -np.log(k), jnp.float32),
        "target_mask": jnp.ones((2, 10, k), bool),
        "kd_temperature": jnp.float32(2.0),
    }
    with pytest.raises(ValueError, match="kd_temperature_min"):
        build_kd(cfg).loss(capped, bt, jnp.float32(1.0), train=False)
