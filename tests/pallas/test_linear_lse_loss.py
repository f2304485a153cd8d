"""linear_logsumexp_gather_loss: the one-pass XLA version equals the full-logits reference.

The row loss below mixes every ingredient a real one has (lse at several temperatures, gathered
logits with duplicate ids, per-row inputs, masked rows), so value and gradients are checked for
every way rows split into chunks: one chunk, several full chunks, full chunks plus a ragged tail.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref.pallas import linear_logsumexp_gather_loss
from jaxpref.pallas.linear_lse import onepass

N, H, V, K = 37, 32, 203, 5


def make_inputs(seed=0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 6)
    hidden = jax.random.normal(keys[0], (N, H)).astype(dtype)
    weight = (jax.random.normal(keys[1], (H, V)) * 0.5).astype(dtype)
    bias = jax.random.normal(keys[2], (V,)).astype(dtype)
    ids = jax.random.randint(keys[3], (N, K), 0, V)
    ids = ids.at[:, 1].set(ids[:, 0]).at[0, :].set(V - 1).at[1, :].set(0)  # duplicates, vocabulary edges
    inputs = {"w": jax.random.normal(keys[4], (N, K)), "keep": jnp.arange(N) % 5 != 3}
    return hidden, weight, bias, ids, inputs


def row_loss(lse, gathered, inp):
    """A sum of per-row terms: weighted gathered logits against a mix of the temperatures' lse."""
    per_row = jnp.sum(inp["w"] * gathered, axis=1) - 1.5 * lse[0] + 0.3 * lse[-1] ** 2
    return jnp.sum(jnp.where(inp["keep"], per_row, 0.0))


def reference(hidden, weight, bias, ids, inputs, temps):
    z = hidden.astype(jnp.float32) @ weight.astype(jnp.float32) + bias.astype(jnp.float32)
    lse = jnp.stack([jax.nn.logsumexp(z / t, axis=1) for t in temps])
    gathered = jnp.take_along_axis(z, ids, axis=1)
    return row_loss(lse, gathered, inputs), lse, gathered


def run(fn, hidden, weight, bias):
    def value(h, w, b):
        out = fn(h, w, b)
        return out[0], out[1:]

    return jax.jit(jax.value_and_grad(value, argnums=(0, 1, 2), has_aux=True))(hidden, weight, bias)


@pytest.mark.parametrize("block_n", [64, 8, 12, 37], ids=["one-chunk", "chunks+tail", "3-chunks+tail", "exact"])
@pytest.mark.parametrize("temps", [(1.0,), (2.0, 1.0)])
def test_onepass_matches_full_logits(block_n, temps):
    hidden, weight, bias, ids, inputs = make_inputs()
    ref = run(lambda h, w, b: reference(h, w, b, ids, inputs, temps), hidden, weight, bias)
    got = run(
        lambda h, w, b: linear_logsumexp_gather_loss(
            h, w, ids, row_loss, inputs, bias=b, temperatures=temps, impl="xla_onepass", block_n=block_n
        ),
        hidden, weight, bias,
    )  # fmt: skip
    (v_ref, (lse_ref, g_ref)), grads_ref = ref
    (v_got, (lse_got, g_got)), grads_got = got
    np.testing.assert_allclose(v_got, v_ref, rtol=1e-5)
    np.testing.assert_allclose(lse_got, lse_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_got, g_ref, rtol=1e-5, atol=1e-5)
    for a, e in zip(grads_got, grads_ref):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("impl", ["auto", "xla_chunked", "reference"])
def test_every_impl_gives_the_same_value_and_gradients(impl):
    hidden, weight, bias, ids, inputs = make_inputs(1)

    def fn(h, w, b):
        return linear_logsumexp_gather_loss(h, w, ids, row_loss, inputs, bias=b, temperatures=(0.7, 1.0), impl=impl)

    (v, _), grads = run(fn, hidden, weight, bias)
    (v_ref, _), grads_ref = run(lambda h, w, b: reference(h, w, b, ids, inputs, (0.7, 1.0)), hidden, weight, bias)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    for a, e in zip(grads, grads_ref):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=2e-5)


def test_scalar_cotangent_scales_gradients_and_the_eval_path_agrees():
    """The backward multiplies the stored gradients by the incoming cotangent (here 1/N of a mean)."""
    hidden, weight, bias, ids, inputs = make_inputs(2)
    op = lambda h, w: linear_logsumexp_gather_loss(h, w, ids, row_loss, inputs, impl="xla_onepass", block_n=8)[0]  # noqa: E731
    g = jax.grad(lambda h, w: op(h, w) / 7.0, argnums=(0, 1))(hidden, weight)
    g_ref = jax.grad(lambda h, w: reference(h, w, jnp.zeros(V), ids, inputs, (1.0,))[0] / 7.0, argnums=(0, 1))(
        hidden, weight
    )
    for a, e in zip(g, g_ref):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)
    # Not differentiated (eval): the forward-only path gives the same value.
    value = jax.jit(op)(hidden, weight)
    np.testing.assert_allclose(value, reference(hidden, weight, jnp.zeros(V), ids, inputs, (1.0,))[0], rtol=1e-5)


def test_bfloat16_weights():
    hidden, weight, bias, ids, inputs = make_inputs(3, dtype=jnp.bfloat16)
    got = run(
        lambda h, w, b: linear_logsumexp_gather_loss(
            h, w, ids, row_loss, inputs, bias=b, impl="xla_onepass", block_n=8
        ),
        hidden, weight, bias,
    )  # fmt: skip
    ref = run(lambda h, w, b: reference(h, w, b, ids, inputs, (1.0,)), hidden, weight, bias)
    assert [x.dtype for x in got[1]] == [jnp.bfloat16] * 3
    np.testing.assert_allclose(got[0][0], ref[0][0], rtol=1e-5)
    for a, e in zip(got[1], ref[1]):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), rtol=2e-2, atol=2e-2)


def test_chunk_rows_respects_the_byte_budget():
    assert onepass.chunk_rows(4096, 32000, 1024) == 256  # 64 MiB / (2 x 4 bytes x V), a multiple of 8
    assert onepass.chunk_rows(4096, 128256, 1024) == 64
    assert onepass.chunk_rows(100, 1000, 1024) == 100
    assert onepass.chunk_rows(4096, 10**7, 1024) == 8


def test_onepass_temporaries_are_a_fraction_of_the_logits():
    n, h, v = 512, 64, 32768
    s = jax.ShapeDtypeStruct
    args = (s((n, h), jnp.float32), s((h, v), jnp.float32), s((n, 4), jnp.int32), s((n,), jnp.bool_))

    def loss(hid, w, ids, keep):
        def rows(lse, g, k):
            return jnp.sum(jnp.where(k, lse[0] - g[:, 0], 0.0))

        return linear_logsumexp_gather_loss(hid, w, ids, rows, keep, impl="xla_onepass", block_n=64)[0]

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    assert f"f32[{n},{v}]" not in compiled.as_text()
    assert compiled.memory_analysis().temp_size_in_bytes < n * v * 4 / 2


def test_a_frozen_lm_head_gets_no_weight_gradient_work():
    """Differentiating only the hidden states (LoRA, a frozen tied head): the same hidden gradient, and
    neither the dW GEMM nor the [H, V] float32 gradient sum is in the compiled step."""
    hidden, weight, bias, ids, inputs = make_inputs()

    def loss(h, w, b):
        return linear_logsumexp_gather_loss(h, w, ids, row_loss, inputs, bias=b, impl="xla_onepass", block_n=8)[0]

    frozen = jax.jit(jax.grad(loss))(hidden, weight, bias)
    expected = jax.grad(lambda h: reference(h, weight, bias, ids, inputs, (1.0,))[0])(hidden)
    np.testing.assert_allclose(frozen, expected, rtol=1e-4, atol=2e-5)

    def dots(argnums):
        return jax.jit(jax.grad(loss, argnums=argnums)).lower(hidden, weight, bias).as_text().count("dot_general")

    # logits and grad_h per chunk (a first chunk, the scanned ones, the tail) vs also grad_w
    assert dots(0) == 6 and dots((0, 1)) == 9
