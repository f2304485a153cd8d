"""jaxpref.generation: greedy parity with transformers' generate, KV cache vs recomputation, sampling,
top-k/top-p against transformers' warpers, LoRA adapters on/off."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM, AutoTokenizer, TopKLogitsWarper, TopPLogitsWarper

from jaxpref.generation import SamplingSettings, generate, top_k_filter, top_p_filter
from jaxpref.lora import LoraConfig, apply_lora, merge_lora
from jaxpref.models import from_pretrained
from tests.models.tiny import build_hf, random_ids

TEACHER = Path(__file__).resolve().parents[2] / "demo" / "teacher"
NEW = 12


def _prompts(vocab: int = 128) -> list[list[int]]:
    return [random_ids((n,), vocab=vocab, seed=n).tolist() for n in (5, 11, 3)]


def _hf_greedy(hf, prompt: list[int], max_new_tokens: int, stop: int | None) -> list[int]:
    """transformers' greedy continuation of one unpadded prompt (a stop token that ended it included)."""
    hf.generation_config.eos_token_id = stop
    hf.generation_config.pad_token_id = 0 if stop is None else stop
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=0)
    return out[0, len(prompt) :].tolist()


def _stop_token(continuations: list[list[int]]) -> tuple[int, int]:
    """(row, token): a token that first appears in that row's continuation after its start and before
    its end (so as a stop token it ends the row early)."""
    for row, c in enumerate(continuations):
        for j in range(2, len(c) - 1):
            if c[j] not in c[:j]:
                return row, c[j]
    raise AssertionError(f"no usable stop token in {continuations}")


def _check_greedy_parity(model, hf, prompts):
    free = [_hf_greedy(hf, p, NEW, None) for p in prompts]
    got = generate(model, prompts, SamplingSettings(max_new_tokens=NEW))
    assert got.tokens == free and got.finished == [False] * len(prompts)
    row, stop = _stop_token(free)
    refs = [_hf_greedy(hf, p, NEW, stop) for p in prompts]
    assert len(refs[row]) < NEW and refs[row][-1] == stop
    got = generate(model, prompts, SamplingSettings(max_new_tokens=NEW, stop_token_ids=(stop,)))
    assert got.tokens == refs
    assert got.finished == [stop in r for r in refs]


# phi3_longrope: prompt + completion cross its original context (16), so decoding switches from the
# short to the long factors mid-way, with the prompt's keys cached under the short ones, as in transformers.
# The window cases: prompts (up to 11 tokens) plus 12 new tokens run past their windows (4 to 6), in
# prefill and in decoding; Gemma with soft-caps, scaled embeddings and per-layer-type RoPE.
@pytest.mark.parametrize(
    "case", ["llama", "mistral", "qwen2", "qwen3", "phi3_longrope", "phi3_window", "mistral_window", "qwen3_window",
             "gemma2_window", "gemma3", "gemma3_pattern3"],
)  # fmt: skip
def test_greedy_equals_transformers(case, tmp_path):
    hf = build_hf(case)
    hf.save_pretrained(tmp_path)
    _check_greedy_parity(from_pretrained(tmp_path), hf, _prompts())


def test_greedy_equals_transformers_demo_teacher():
    hf = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(TEACHER)
    texts = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived", "Hello"]
    prompts = [tok(t)["input_ids"] for t in texts]
    assert len({len(p) for p in prompts}) == 3
    _check_greedy_parity(from_pretrained(TEACHER), hf, prompts)


@jax.jit
def _full_logits(graphdef, state, ids, last):
    model = nnx.merge(graphdef, state)
    hidden = model(ids)
    return model.logits(jnp.take_along_axis(hidden, last[:, None, None], axis=1))[:, 0]


def test_kv_cache_equals_recomputation(tmp_path):
    hf = build_hf("qwen3", seed=1)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    prompts = _prompts()
    got = generate(model, prompts, SamplingSettings(max_new_tokens=NEW)).tokens
    # Without a cache: the full forward over each growing sequence (right-padded to one length, so
    # one compile; causal attention keeps the padding away from the last real position).
    graphdef, state = nnx.split(model)
    seqs = [list(p) for p in prompts]
    width = max(map(len, seqs)) + NEW
    for _ in range(NEW):
        ids = np.zeros((len(seqs), width), np.int32)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
        last = jnp.asarray([len(s) - 1 for s in seqs])
        nxt = np.asarray(jnp.argmax(_full_logits(graphdef, state, jnp.asarray(ids), last), axis=-1))
        for s, t in zip(seqs, nxt):
            s.append(int(t))
    assert got == [s[len(p) :] for s, p in zip(seqs, prompts)]


def test_groups_of_batch_size_equal_one_batch(tmp_path):
    hf = build_hf("llama", seed=2)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    prompts = _prompts() + [random_ids((70,), seed=70).tolist()]  # two prompt-length buckets' worth
    settings = SamplingSettings(max_new_tokens=6)
    whole = generate(model, prompts, settings)
    assert generate(model, prompts, settings, batch_size=3) == whole
    assert [len(t) for t in whole.tokens] == [6] * 4


def test_sampling_reproducible_and_top_k_1_is_greedy(tmp_path):
    hf = build_hf("qwen2", seed=3)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    prompts = _prompts()
    settings = SamplingSettings(max_new_tokens=NEW, temperature=1.3, top_k=50, top_p=0.95)
    a = generate(model, prompts, settings, key=jax.random.key(1))
    assert generate(model, prompts, settings, key=jax.random.key(1)) == a
    assert generate(model, prompts, settings, key=jax.random.key(2)).tokens != a.tokens
    greedy = generate(model, prompts, SamplingSettings(max_new_tokens=NEW))
    assert a.tokens != greedy.tokens
    top1 = SamplingSettings(max_new_tokens=NEW, temperature=0.7, top_k=1)
    assert generate(model, prompts, top1, key=jax.random.key(5)) == greedy


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.8, 0.99])
def test_top_p_matches_transformers_warper(top_p):
    logits = np.random.default_rng(0).normal(size=(6, 40)).astype(np.float32) * 2.0
    ref = TopPLogitsWarper(top_p)(None, torch.tensor(logits)).numpy()
    got = np.asarray(top_p_filter(jnp.asarray(logits), top_p))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref))
    np.testing.assert_array_equal(got[~np.isneginf(got)], logits[~np.isneginf(ref)])


@pytest.mark.parametrize("top_k", [1, 5, 39])
def test_top_k_matches_transformers_warper(top_k):
    logits = np.random.default_rng(1).normal(size=(4, 39)).astype(np.float32)
    ref = TopKLogitsWarper(top_k)(None, torch.tensor(logits)).numpy()
    got = np.asarray(top_k_filter(jnp.asarray(logits), top_k))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref))


def test_lora_adapters_on_and_off(tmp_path):
    hf = build_hf("llama", seed=4)
    hf.save_pretrained(tmp_path)
    base = from_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    apply_lora(model, LoraConfig(r=4, alpha=16.0, dropout=0.0, target_modules=("q_proj", "v_proj", "down_proj"),
                                 modules_to_save=("lm_head",)), rngs=nnx.Rngs(0))
    key = jax.random.key(0)
    for i, (_, var) in enumerate(nnx.iter_graph(model)):
        if isinstance(var, nnx.LoRAParam):
            var.set_value(var[...] + 0.3 * jax.random.normal(jax.random.fold_in(key, i), var.shape, var.dtype))
    prompts = _prompts()
    settings = SamplingSettings(max_new_tokens=NEW)
    base_tokens = generate(base, prompts, settings).tokens
    assert generate(model, prompts, settings, use_adapters=False).tokens == base_tokens
    with_adapters = generate(model, prompts, settings).tokens
    assert with_adapters != base_tokens
    assert generate(merge_lora(model), prompts, settings).tokens == with_adapters


def test_greedy_with_nf4_embeddings_equals_the_dequantized_float_model(tmp_path):
    """qlora_quantize_embeddings: prefill and decode look rows up from the NF4 table and the (untied) head is
    the dequantized table; the same tokens as the float model holding the dequantized weights."""
    from jaxpref.models import nf4
    from tests.models.test_qlora import _float_twin_with_tables

    build_hf("llama", hidden_size=64).save_pretrained(tmp_path)
    q = from_pretrained(tmp_path, quantization=nf4.NF4Config(quantize_embeddings=True))
    twin = _float_twin_with_tables(q, tmp_path)
    settings = SamplingSettings(max_new_tokens=NEW)
    assert generate(q, _prompts(), settings).tokens == generate(twin, _prompts(), settings).tokens
