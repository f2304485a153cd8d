"""linear_softmax_entropy (GRPO's ``entropy`` metric): the blocked XLA pass equals the entropy of the full
softmax in float64, for several row chunks, ragged vocabulary blocks, temperatures, a bias and 16-bit
weights; it carries no gradient; and ``fused_token_entropy`` reshapes and masks it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref.losses import fused_token_entropy
from jaxpref.pallas import linear_softmax_entropy

N, H, V = 37, 16, 203


def inputs(seed=0, dtype=jnp.float32, scale=2.0):
    k = jax.random.split(jax.random.key(seed), 3)
    hidden = jax.random.normal(k[0], (N, H)).astype(dtype)
    weight = (scale * jax.random.normal(k[1], (H, V))).astype(dtype)
    bias = jax.random.normal(k[2], (V,)).astype(dtype)
    return hidden, weight, bias


def entropy64(hidden, weight, bias, temperature):
    z = np.asarray(hidden, np.float64) @ np.asarray(weight, np.float64)
    if bias is not None:
        z = z + np.asarray(bias, np.float64)
    z = z / temperature
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -(np.exp(logp) * logp).sum(-1)


@pytest.mark.parametrize(
    "block_n, block_v, temperature, with_bias",
    [(16, 64, 1.0, False), (8, 50, 0.7, True), (4096, 1024, 2.0, False), (16, 203, 0.3, True)],
)
def test_blocked_entropy_equals_full_softmax(block_n, block_v, temperature, with_bias):
    hidden, weight, bias = inputs()
    bias = bias if with_bias else None
    got = jax.jit(
        lambda h, w, b: linear_softmax_entropy(h, w, bias=b, temperature=temperature, block_n=block_n, block_v=block_v)
    )(hidden, weight, bias)
    want = entropy64(hidden, weight, bias, temperature)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert want.max() - want.min() > 1.0  # peaked and flatter rows both
    ref = linear_softmax_entropy(hidden, weight, bias=bias, temperature=temperature, impl="reference")
    np.testing.assert_allclose(np.asarray(ref), want, rtol=1e-5, atol=1e-5)


def test_bfloat16_weight_and_no_gradient():
    hidden, weight, _ = inputs(1, jnp.bfloat16)
    got = linear_softmax_entropy(hidden, weight, block_n=16, block_v=64)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), entropy64(hidden, weight, None, 1.0), rtol=1e-4, atol=1e-4)
    g = jax.grad(lambda h, w: jnp.sum(linear_softmax_entropy(h, w, block_v=64)), argnums=(0, 1))(*inputs()[:2])
    assert all(float(jnp.abs(x).max()) == 0.0 for x in g)


def test_fused_token_entropy_shapes_and_mask():
    hidden, weight, _ = inputs(2)
    h = hidden[:36].reshape(4, 9, H)
    mask = jnp.arange(9)[None, :] < jnp.array([9, 3, 0, 5])[:, None]
    got = fused_token_entropy(h, weight, mask=mask, temperature=0.8, impl="xla_chunked", block_n=8, block_v=32)
    want = entropy64(h.reshape(36, H), weight, None, 0.8).reshape(4, 9)
    np.testing.assert_allclose(np.asarray(got), np.where(mask, want, 0.0), rtol=1e-5, atol=1e-5)
    # Tiles meant for a Pallas kernel are not applied to the XLA pass; the result is the same.
    other = fused_token_entropy(h, weight, mask=mask, temperature=0.8, impl="pallas", block_n=3, block_v=5)
    np.testing.assert_allclose(np.asarray(other), np.asarray(got), rtol=1e-6, atol=1e-6)
