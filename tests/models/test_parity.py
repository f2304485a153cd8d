"""Logits parity with transformers' PyTorch models (float32), packed sequences, HF round trip."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoModelForCausalLM

from jaxpref.models import from_pretrained, save_pretrained
from tests.models.tiny import CASES, hf_logits, jax_logits, random_ids

ATOL = 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, hf_checkpoint):
    path, hf = hf_checkpoint(case)
    model = from_pretrained(path)
    ids = random_ids((2, 24))
    np.testing.assert_allclose(jax_logits(model, ids), hf_logits(hf, ids), rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    "case",
    ["llama3_rope", "qwen2", "qwen3", "mistral_window", "qwen2_window", "phi3_partial", "phi3_window"]
    + ["gemma2", "gemma2_window", "gemma3"],
)
def test_packed_segments_equal_separate_sequences(case, hf_checkpoint):
    path, hf = hf_checkpoint(case)
    model = from_pretrained(path)
    lengths = [[5, 7], [10, 3, 2]]
    t = 16
    ids = random_ids((2, t), seed=1)
    segment_ids = np.zeros((2, t), np.int32)
    positions = np.zeros((2, t), np.int32)
    for row, lens in enumerate(lengths):
        start = 0
        for seg, n in enumerate(lens, start=1):
            segment_ids[row, start : start + n] = seg
            positions[row, start : start + n] = np.arange(n)
            start += n
    logits = jax_logits(model, ids, positions=positions, segment_ids=segment_ids)
    assert np.isfinite(logits).all()  # padding rows too
    for row, lens in enumerate(lengths):
        start = 0
        for n in lens:
            alone = hf_logits(hf, ids[row : row + 1, start : start + n])[0]
            np.testing.assert_allclose(logits[row, start : start + n], alone, rtol=0, atol=ATOL)
            start += n


@pytest.mark.parametrize(
    "case",
    ["llama_tied", "qwen2", "qwen3", "llama3_rope", "qwen2_window", "mistral_window", "phi3_longrope", "phi3_partial",
     "phi3_window", "gemma2", "gemma3", "gemma3_pattern3"],
)
def test_hf_round_trip(case, hf_checkpoint, tmp_path):
    path, hf = hf_checkpoint(case)
    out = tmp_path / "saved"
    save_pretrained(from_pretrained(path), out)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(hf)
    ids = random_ids((2, 12))
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(hf, ids))


def test_sharded_checkpoint_round_trip(hf_checkpoint, tmp_path):
    path, hf = hf_checkpoint("qwen3")
    out = tmp_path / "sharded"
    save_pretrained(from_pretrained(path), out, max_shard_size=40_000)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    ids = random_ids((1, 10))
    np.testing.assert_allclose(jax_logits(from_pretrained(out), ids), hf_logits(hf, ids), rtol=0, atol=ATOL)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(hf, ids))


def test_bfloat16_checkpoint_and_compute(hf_checkpoint, tmp_path):
    import jax.numpy as jnp

    path, hf = hf_checkpoint("llama")
    bf16_dir = tmp_path / "bf16"
    save_pretrained(from_pretrained(path), bf16_dir, dtype=jnp.bfloat16)
    model = from_pretrained(bf16_dir, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ids = random_ids((2, 12))
    hidden = model(ids)
    assert hidden.dtype == jnp.bfloat16
    logits = np.asarray(model.logits(hidden))
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    assert np.abs(logits - hf_logits(hf, ids)).max() < 0.1
