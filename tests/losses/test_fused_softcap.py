"""Final logit soft-capping through the fused losses, the teacher top-k, the mean-logit metric, the
sampler's and ``CausalLM.logits``' full logits: each equals the full-logits
computation on ``cap * tanh(logits / cap)`` (the full-logits losses are themselves checked against
TRL/axolotl elsewhere; the kernels against a float64 brute force in tests/pallas)."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref.generation.sampler import _logits as sampler_logits
from jaxpref.losses import cross_entropy_loss, kd_loss, token_logps
from jaxpref.losses.fused import (
    fused_cross_entropy,
    fused_kd_loss,
    fused_token_entropy,
    fused_token_logps,
    fused_token_logps_and_log_sum_sq_probs,
)
from jaxpref.models.decoder import CausalLM
from jaxpref.pallas import linear_mean_logit
from jaxpref.teacher_topk import topk_and_token_logprobs, topk_logprobs

B, T, H, V, K = 2, 5, 16, 97, 4
CAP = 1.5  # raw logits have std ~1.6: tanh is far from linear
XLA = dict(impl="xla_chunked", block_n=4, block_v=32)
ONEPASS = dict(impl="xla_onepass", block_n=4)
PALLAS = dict(impl="pallas_gpu")  # interpret mode on CPU, tiles of blocks.py's ("cpu", "pallas_gpu")
IMPLS = [XLA, ONEPASS, PALLAS]


def make_inputs(seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(B, T, H)).astype(np.float32)
    weight = (rng.normal(size=(H, V)) * 0.4).astype(np.float32)
    ids = np.stack([rng.permutation(V)[:K] for _ in range(B * T)]).reshape(B, T, K).astype(np.int32)
    mask = rng.random((B, T, K)) > 0.25
    mask[..., 0] = True
    raw = np.where(mask, rng.normal(size=(B, T, K)) * 1.5, -np.inf)
    lp = raw - np.log(np.sum(np.exp(raw), axis=-1, keepdims=True))
    loss_mask = rng.random((B, T)) > 0.3
    loss_mask[0, 0] = True
    labels = np.where(loss_mask, rng.integers(0, V, size=(B, T)), -100).astype(np.int32)  # padding labels
    ids[~loss_mask] = -1  # padding teacher ids
    return hidden, weight, ids, lp.astype(np.float32), mask, labels, loss_mask


def capped(h, w):
    return CAP * jnp.tanh(jnp.einsum("bth,hv->btv", h, w) / CAP)


def assert_same(expected, actual, tol=2e-5):
    for e, a in zip(jax.tree.leaves(expected), jax.tree.leaves(actual)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=tol, atol=tol)


@pytest.mark.parametrize("impl_kw", IMPLS)
@pytest.mark.parametrize("kw", [dict(), dict(temperature=2.0, beta=0.5)])
def test_fused_kd_loss_with_cap_equals_kd_loss_on_capped_logits(kw, impl_kw):
    hidden, weight, ids, lp, mask, labels, loss_mask = make_inputs()
    common = dict(kd_alpha=0.7, kd_ce_alpha=0.3, loss_mask=loss_mask, **kw)

    def full(h, w):
        return kd_loss(capped(h, w), ids, lp, mask, labels, **common)

    def fused(h, w):
        return fused_kd_loss(h, w, ids, lp, mask, labels, softcap=CAP, **common, **impl_kw)

    grad = lambda f: jax.value_and_grad(f, argnums=(0, 1), has_aux=True)  # noqa: E731
    expected, actual = jax.jit(lambda h, w: (grad(full)(h, w), grad(fused)(h, w)))(hidden, weight)
    assert_same(expected, actual)
    uncapped = fused_kd_loss(hidden, weight, ids, lp, mask, labels, **common, **impl_kw)[0]
    assert abs(float(uncapped) - float(actual[0][0])) > 1e-2  # the cap matters here


@pytest.mark.parametrize("impl_kw", IMPLS)
def test_fused_cross_entropy_with_cap(impl_kw):
    hidden, weight, _, _, _, labels, loss_mask = make_inputs()

    def full(h, w):
        return cross_entropy_loss(capped(h, w), labels, mask=loss_mask)[0]

    def fused(h, w):
        return fused_cross_entropy(h, w, labels, mask=loss_mask, softcap=CAP, **impl_kw)[0]

    grad = lambda f: jax.value_and_grad(f, argnums=(0, 1))  # noqa: E731
    assert_same(*jax.jit(lambda h, w: (grad(full)(h, w), grad(fused)(h, w)))(hidden, weight))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_token_logps_and_sq_probs_with_cap(temperature):
    """Temperature divides the capped logits (transformers caps inside the model)."""
    hidden, weight, _, _, _, labels, loss_mask = make_inputs()

    def full(h, w):
        return token_logps(capped(h, w), labels, mask=loss_mask, temperature=temperature)

    def fused(h, w):
        return fused_token_logps(h, w, labels, mask=loss_mask, temperature=temperature, softcap=CAP, **XLA)

    cot = jnp.asarray(np.random.default_rng(1).normal(size=(B, T)), jnp.float32)
    vjp = lambda f, h, w: (lambda out, pb: (out, pb(cot)))(*jax.vjp(f, h, w))  # noqa: E731
    assert_same(vjp(full, hidden, weight), vjp(fused, hidden, weight))

    logps, sq = fused_token_logps_and_log_sum_sq_probs(
        hidden, weight, labels, mask=loss_mask, temperature=temperature, softcap=CAP, **XLA
    )
    p = jax.nn.softmax(capped(hidden, weight) / temperature, axis=-1)
    assert_same(full(hidden, weight), logps)
    assert_same(jnp.where(loss_mask, jnp.log(jnp.sum(p * p, axis=-1)), 0.0), sq)


def test_fused_token_entropy_with_cap():
    hidden, weight, *_, loss_mask = make_inputs()
    logp = jax.nn.log_softmax(capped(hidden, weight) / 0.7, axis=-1)
    want = jnp.where(loss_mask, -jnp.sum(jnp.exp(logp) * logp, axis=-1), 0.0)
    got = fused_token_entropy(hidden, weight, mask=loss_mask, temperature=0.7, softcap=CAP, **XLA)
    assert_same(want, got)


def test_mean_logit_metric_with_and_without_cap():
    hidden, weight, *_ = make_inputs()
    h = hidden.reshape(-1, H)
    raw = h.astype(np.float64) @ weight.astype(np.float64)
    assert_same(np.mean(CAP * np.tanh(raw / CAP), axis=1), linear_mean_logit(h, weight, softcap=CAP, block_v=32))
    assert_same(np.mean(raw, axis=1), linear_mean_logit(h, weight))


def test_teacher_topk_with_cap_matches_float64_brute_force():
    hidden, weight, _, _, _, labels, _ = make_inputs()
    raw = hidden.astype(np.float64) @ weight.astype(np.float64)
    z = CAP * np.tanh(raw / CAP)
    for temperature in (1.0, 2.0):
        zt = z / temperature
        logp = zt - np.log(np.sum(np.exp(zt - zt.max(-1, keepdims=True)), -1, keepdims=True)) - zt.max(-1)[..., None]
        ids, lps = topk_logprobs(hidden, weight, 3, temperature=temperature, softcap=CAP, block_rows=4)
        want_ids = np.argsort(-logp, axis=-1)[..., :3]
        np.testing.assert_array_equal(np.asarray(ids), want_ids)
        assert_same(np.take_along_axis(logp, want_ids, -1), lps)
    nxt = np.clip(labels, 0, V - 1)
    logp = z - np.log(np.sum(np.exp(z), -1, keepdims=True))
    ids, lps, next_lp, rank = topk_and_token_logprobs(hidden, weight, nxt, 3, softcap=CAP, block_rows=4)
    assert_same(np.take_along_axis(logp, nxt[..., None], -1)[..., 0], next_lp)
    assert_same(np.take_along_axis(logp, np.asarray(ids), -1), lps)
    want_rank = 1 + np.sum(z > np.take_along_axis(z, nxt[..., None], -1), axis=-1)
    np.testing.assert_array_equal(np.asarray(rank), want_rank)


def _stub(cap, weight):
    """What ``CausalLM.logits`` and the sampler read from a model."""
    return SimpleNamespace(
        config=SimpleNamespace(final_logit_softcapping=cap), lm_head_weight=lambda use_adapters=True: weight
    )


def test_causal_lm_logits_and_sampler_logits_are_capped():
    hidden, weight, *_ = make_inputs()
    want = capped(hidden, weight)
    assert_same(want, CausalLM.logits(_stub(CAP, weight), jnp.asarray(hidden)))
    assert_same(want[:, -1], sampler_logits(_stub(CAP, weight), jnp.asarray(hidden[:, -1]), True))
    assert_same(jnp.einsum("bth,hv->btv", hidden, weight), CausalLM.logits(_stub(None, weight), jnp.asarray(hidden)))
