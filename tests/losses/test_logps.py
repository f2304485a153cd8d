"""Per-token / per-sequence log-probs and the cross-entropy loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref.losses import (
    cross_entropy_from_gathered,
    cross_entropy_loss,
    sequence_logps,
    sequence_logps_from_gathered,
    token_logps,
    token_logps_from_gathered,
)
from tests.losses import losses_reference as ref


def make(seed=0, shape=(2, 5), V=11):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(*shape, V)) * 3).astype(np.float32)
    labels = rng.integers(0, V, size=shape).astype(np.int32)
    mask = rng.random(shape) > 0.3
    return logits, labels, mask


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_token_logps_matches_numpy(temperature):
    logits, labels, mask = make()
    got = token_logps(logits, labels, temperature=temperature)
    np.testing.assert_allclose(got, ref.token_logps(logits, labels, temperature), rtol=1e-5, atol=1e-6)
    masked = token_logps(logits, np.where(mask, labels, -100), mask=mask, temperature=temperature)
    np.testing.assert_allclose(masked, np.where(mask, got, 0.0), rtol=1e-6)
    lse = jax.nn.logsumexp(jnp.asarray(logits) / temperature, -1)
    gathered = np.take_along_axis(logits, labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(token_logps_from_gathered(gathered, lse, temperature=temperature), got, rtol=1e-6)


def test_sequence_logps_sum_and_mean():
    logits, labels, mask = make(1)
    mask[1] = False  # an empty sequence: sum 0, mean 0 (divides by max(count, 1))
    total, mean = sequence_logps(logits, labels, mask=mask)
    lp = ref.token_logps(logits, labels)
    want = (lp * mask).sum(-1)
    np.testing.assert_allclose(total, want, rtol=1e-5)
    np.testing.assert_allclose(mean, want / np.maximum(mask.sum(-1), 1), rtol=1e-5)
    lse = jax.nn.logsumexp(jnp.asarray(logits), -1)
    gathered = np.take_along_axis(logits, labels[..., None], -1)[..., 0]
    g_total, g_mean = sequence_logps_from_gathered(gathered, lse, mask=mask)
    np.testing.assert_allclose(g_total, total, rtol=1e-6)
    np.testing.assert_allclose(g_mean, mean, rtol=1e-6)


@pytest.mark.parametrize("num_items", [None, 17])
def test_cross_entropy_value_and_gradient(num_items):
    logits, labels, mask = make(2)
    loss, metrics = cross_entropy_loss(logits, labels, mask=mask, num_items=num_items)
    want = ref.cross_entropy(logits, labels, mask, num_items)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["ce_loss"], want, rtol=1e-5)
    g = jax.grad(lambda z: cross_entropy_loss(z, labels, mask=mask, num_items=num_items)[0])(logits)
    fd = ref.finite_diff_grad(lambda z: ref.cross_entropy(z, labels, mask, num_items), logits)
    np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-7)
    lse = jax.nn.logsumexp(jnp.asarray(logits), -1)
    gathered = np.take_along_axis(logits, labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(
        cross_entropy_from_gathered(gathered, lse, mask=mask, num_items=num_items)[0], loss, rtol=1e-6
    )


def test_cross_entropy_empty_mask_and_ignore_index_labels():
    logits, labels, _ = make(3)
    mask = np.zeros(labels.shape, bool)
    loss, _ = cross_entropy_loss(logits, np.full(labels.shape, -100), mask=mask)
    assert float(loss) == 0.0
    g = jax.grad(lambda z: cross_entropy_loss(z, labels, mask=mask)[0])(logits)
    assert np.all(g == 0.0)


def test_bfloat16_jit_vmap():
    logits, labels, mask = make(4)
    lb = jnp.asarray(logits, jnp.bfloat16)
    got, _ = cross_entropy_loss(lb, labels, mask=mask)
    want, _ = cross_entropy_loss(lb.astype(jnp.float32), labels, mask=mask)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, want)
    assert token_logps(lb, labels).dtype == jnp.float32
    f = jax.jit(lambda z: cross_entropy_loss(z, labels, mask=mask)[0])
    np.testing.assert_allclose(f(logits), cross_entropy_loss(logits, labels, mask=mask)[0], rtol=1e-6)
    per_row = jax.vmap(lambda z, y, m: sequence_logps(z, y, mask=m)[0])(logits, labels, mask)
    np.testing.assert_allclose(per_row, sequence_logps(logits, labels, mask=mask)[0], rtol=1e-6)
