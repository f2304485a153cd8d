"""Blocked attention equals jax.nn.dot_product_attention (values and gradients), packed or not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref.models.attention import attention
from jaxpref.models.blocked_attention import _blocks, blocked_attention

B, T, N, K, D = 2, 23, 6, 2, 8


def make_inputs(dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (B, T, N, D)).astype(dtype)
    k = jax.random.normal(keys[1], (B, T, K, D)).astype(dtype)
    v = jax.random.normal(keys[2], (B, T, K, D)).astype(dtype)
    g = jax.random.normal(keys[3], (B, T, N, D)).astype(dtype)
    return q, k, v, g


# row 0: three packed sequences then padding; row 1: one sequence then padding
SEGMENTS = np.array([[1] * 7 + [2] * 9 + [3] * 4 + [0] * 3, [1] * 18 + [0] * 5], np.int32)


def value_and_grads(fn, q, k, v, g):
    out, pullback = jax.vjp(fn, q, k, v)
    return out, pullback(g)


@pytest.mark.parametrize("block_q", [4, 7, 23, 64])
@pytest.mark.parametrize("packed", [False, True])
def test_matches_dot_product_attention(block_q, packed):
    q, k, v, g = make_inputs()
    seg = jnp.asarray(SEGMENTS) if packed else None
    expected = value_and_grads(lambda *a: attention(*a, segment_ids=seg, impl="xla"), q, k, v, g)
    got = jax.jit(
        lambda q, k, v, g: value_and_grads(
            lambda *a: blocked_attention(*a, segment_ids=seg, block_q=block_q), q, k, v, g
        )
    )(q, k, v, g)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-5)
    for a, e, name in zip(got[1], expected[1], "qkv"):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


def test_bfloat16():
    q, k, v, g = make_inputs(jnp.bfloat16, seed=1)
    seg = jnp.asarray(SEGMENTS)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, g)]
    expected = value_and_grads(lambda *a: attention(*a, segment_ids=seg, impl="xla"), *f32)
    got = value_and_grads(lambda *a: blocked_attention(*a, segment_ids=seg, block_q=8), q, k, v, g)
    assert got[0].dtype == jnp.bfloat16 and all(x.dtype == jnp.bfloat16 for x in got[1])
    np.testing.assert_allclose(np.asarray(got[0], np.float32), expected[0], rtol=3e-2, atol=3e-2)
    for a, e in zip(got[1], expected[1]):
        np.testing.assert_allclose(np.asarray(a, np.float32), e, rtol=5e-2, atol=5e-2)


def test_blocks_cover_the_sequence_evenly():
    assert _blocks(23, 7) == ((0, 6), (6, 12), (12, 17), (17, 23))
    assert _blocks(1024, 256) == ((0, 256), (256, 512), (512, 768), (768, 1024))
    assert _blocks(5, 64) == ((0, 5),)


def test_needs_far_less_memory_than_dot_product_attention():
    """Compiled forward + backward: no [B, K, G, T, T] buffer, and under half of XLA's temporaries."""
    b, t, n, k, d = 2, 512, 4, 2, 16
    s = jax.ShapeDtypeStruct
    args = [s((b, t, n, d), jnp.float32), s((b, t, k, d), jnp.float32), s((b, t, k, d), jnp.float32)]

    def compiled(fn):
        return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=(0, 1, 2))).lower(*args).compile()

    blocked = compiled(lambda *a: blocked_attention(*a, block_q=64))
    xla = compiled(lambda *a: attention(*a, impl="xla"))
    assert blocked.memory_analysis().temp_size_in_bytes < xla.memory_analysis().temp_size_in_bytes / 2
    assert f"f32[{b},{k},{n // k},{t},{t}]" not in blocked.as_text()
