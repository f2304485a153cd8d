"""fused_kd_loss / fused_token_logps (and its WPO twin with log sum_v p_v^2) equal the full-logits losses
(values, metrics, gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref.losses import cross_entropy_loss, kd_loss, token_logps
from jaxpref.losses.fused import (
    fused_cross_entropy,
    fused_kd_loss,
    fused_token_logps,
    fused_token_logps_and_log_sum_sq_probs,
)

B, T, H, V, K = 2, 5, 16, 97, 4
XLA = dict(impl="xla_chunked", block_n=4, block_v=32)  # 3 row chunks, ragged last vocabulary block
ONEPASS = dict(impl="xla_onepass", block_n=4)  # 2 full row chunks and a tail of 2 rows


def make_inputs(seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(B, T, H)).astype(np.float32)
    weight = (rng.normal(size=(H, V)) * 0.4).astype(np.float32)
    ids = np.stack([rng.permutation(V)[:K] for _ in range(B * T)]).reshape(B, T, K).astype(np.int32)
    mask = rng.random((B, T, K)) > 0.25
    mask[..., 0] = True
    raw = np.where(mask, rng.normal(size=(B, T, K)) * 1.5, -np.inf)
    lp = raw - np.log(np.sum(np.exp(raw), axis=-1, keepdims=True))
    labels = rng.integers(0, V, size=(B, T)).astype(np.int32)
    loss_mask = rng.random((B, T)) > 0.3
    loss_mask[0, 0] = True
    labels = np.where(loss_mask, labels, -100)  # padding labels outside the vocabulary
    ids[~loss_mask] = -1  # and padding teacher ids
    return hidden, weight, ids, lp.astype(np.float32), mask, labels, loss_mask


CASES = [
    dict(beta=0.0),
    dict(beta=0.5, temperature=2.0),
    dict(beta=1.0, temperature=1.5, num_items=11.0),
    dict(beta=0.0, temperature=2.0, normalize_topk=True),
    dict(beta=0.5, temperature=1.5, zscore_base_temp=2.0),
]


def _both(kw, impl_kw):
    hidden, weight, ids, lp, mask, labels, loss_mask = make_inputs()
    common = dict(kd_alpha=0.7, kd_ce_alpha=0.3, loss_mask=loss_mask, **kw)

    def full(h, w):
        return kd_loss(jnp.einsum("bth,hv->btv", h, w), ids, lp, mask, labels, **common)

    def fused(h, w):
        return fused_kd_loss(h, w, ids, lp, mask, labels, **common, **impl_kw)

    grad = lambda f: jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
    return jax.jit(lambda h, w: (grad(full)(h, w), grad(fused)(h, w)))(hidden, weight)


def _assert_same(expected, actual):
    ((loss_e, metrics_e), grads_e), ((loss_a, metrics_a), grads_a) = expected, actual
    np.testing.assert_allclose(loss_a, loss_e, rtol=1e-5, atol=1e-6)
    assert set(metrics_a) == set(metrics_e)
    for name in metrics_e:
        np.testing.assert_allclose(metrics_a[name], metrics_e[name], rtol=1e-5, atol=1e-6, err_msg=name)
    for a, e in zip(grads_a, grads_e):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl_kw", [XLA, ONEPASS], ids=["xla_chunked", "xla_onepass"])
@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_fused_kd_loss_equals_kd_loss(kw, impl_kw):
    _assert_same(*_both(kw, impl_kw))


def test_fused_kd_loss_default_loss_mask_and_num_items():
    """No loss_mask / num_items: N = positions with a valid teacher entry, counted over all row chunks."""
    hidden, weight, ids, lp, mask, labels, _ = make_inputs(3)
    full = kd_loss(jnp.einsum("bth,hv->btv", hidden, weight), ids, lp, mask, labels, kd_ce_alpha=0.5)
    fused = fused_kd_loss(hidden, weight, ids, lp, mask, labels, kd_ce_alpha=0.5, **ONEPASS)
    np.testing.assert_allclose(fused[0], full[0], rtol=1e-5)
    for name in full[1]:
        np.testing.assert_allclose(fused[1][name], full[1][name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("impl_kw", [XLA, ONEPASS, {}], ids=["xla_chunked", "xla_onepass", "auto"])
@pytest.mark.parametrize("num_items", [None, 13.0])
def test_fused_cross_entropy_equals_cross_entropy(impl_kw, num_items):
    hidden, weight, _, _, _, labels, loss_mask = make_inputs(4)

    def full(h, w):
        z = jnp.einsum("bth,hv->btv", h, w)
        return cross_entropy_loss(z, jnp.where(loss_mask, labels, 0), mask=loss_mask, num_items=num_items)

    def fused(h, w):
        return fused_cross_entropy(h, w, labels, mask=loss_mask, num_items=num_items, **impl_kw)

    grad = lambda f: jax.value_and_grad(f, argnums=(0, 1), has_aux=True)  # noqa: E731
    _assert_same(*jax.jit(lambda h, w: (grad(full)(h, w), grad(fused)(h, w)))(hidden, weight))


def test_fused_kd_loss_pallas_interpret_equals_kd_loss():
    _assert_same(*_both(CASES[1], dict(impl="pallas", block_n=16, block_v=32)))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_token_logps_equals_token_logps(temperature):
    hidden, weight, _, _, _, labels, loss_mask = make_inputs(1)
    g = np.random.default_rng(2).normal(size=(B, T)).astype(np.float32)

    def full(h, w):
        z = jnp.einsum("bth,hv->btv", h, w)
        return token_logps(z, labels, mask=loss_mask, temperature=temperature)

    def fused(h, w):
        return fused_token_logps(h, w, labels, mask=loss_mask, temperature=temperature, **XLA)

    def value_and_vjp(f, h, w):
        out, pullback = jax.vjp(f, h, w)
        return out, pullback(g)

    run = jax.jit(lambda h, w: (value_and_vjp(full, h, w), value_and_vjp(fused, h, w)))
    (out_e, grads_e), (out_a, grads_a) = run(hidden, weight)
    assert out_a.shape == (B, T) and out_a.dtype == jnp.float32
    np.testing.assert_allclose(out_a, out_e, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(out_a)[~loss_mask] == 0.0)
    for a, e in zip(grads_a, grads_e):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl_kw", [XLA, dict(impl="reference"), dict(impl="pallas", block_n=16, block_v=32)])
def test_fused_log_sum_sq_probs_equals_the_probabilities(impl_kw):
    """WPO's ``log sum_v p_v^2`` from the kernel's log-sum-exps at T and T/2 equals the float64 sum of the
    squared probabilities; the log-probs and their gradient are fused_token_logps' (the second output
    carries no gradient)."""
    hidden, weight, _, _, _, labels, loss_mask = make_inputs(3)
    g = np.random.default_rng(4).normal(size=(B, T)).astype(np.float32)
    z = np.einsum("bth,hv->btv", hidden.astype(np.float64), weight.astype(np.float64))
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.where(loss_mask, np.log(np.sum(p**2, axis=-1)), 0.0)

    def both(h, w):
        return fused_token_logps_and_log_sum_sq_probs(h, w, labels, mask=loss_mask, **impl_kw)

    (logps, sq), pullback = jax.vjp(both, hidden, weight)
    np.testing.assert_allclose(sq, want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(sq) <= 0.0) and np.all(np.asarray(sq)[~loss_mask] == 0.0)
    np.testing.assert_allclose(logps, fused_token_logps(hidden, weight, labels, mask=loss_mask, **impl_kw), atol=1e-6)
    grads = pullback((g, np.ones_like(g)))  # the log_sum_sq_probs cotangent must not reach the gradient
    _, pull_logps = jax.vjp(lambda h, w: fused_token_logps(h, w, labels, mask=loss_mask, **impl_kw), hidden, weight)
    for a, e in zip(grads, pull_logps(g)):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


def test_fused_kd_loss_never_builds_nv_logits():
    """Compiled loss + gradient: no [N, V] (or [B, T, V]) buffer, temporaries well below N * V * 4."""
    b, t, h, v, k = 4, 128, 64, 32768, 8
    s = jax.ShapeDtypeStruct
    args = (
        s((b, t, h), jnp.float32), s((h, v), jnp.float32), s((b, t, k), jnp.int32),
        s((b, t, k), jnp.float32), s((b, t, k), jnp.bool_), s((b, t), jnp.int32),
    )  # fmt: skip

    def loss(hidden, weight, ids, lp, mask, labels):
        return fused_kd_loss(
            hidden, weight, ids, lp, mask, labels, kd_ce_alpha=0.5, temperature=2.0, impl="xla_chunked",
            block_v=512,
        )[0]  # fmt: skip

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    text = compiled.as_text()
    assert f"f32[{b * t},{v}]" not in text and f"f32[{b},{t},{v}]" not in text
    assert compiled.memory_analysis().temp_size_in_bytes < b * t * v * 4 / 10
