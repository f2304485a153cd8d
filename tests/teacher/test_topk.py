"""``jaxpref.teacher_topk.topk_logprobs`` against a float64 full-vocabulary softmax, and its memory bound."""

import jax
import numpy as np
import pytest

from jaxpref.teacher_topk import topk_logprobs


def brute_force(hidden, weight, k, temperature):
    """Top-k ids and log-probs of softmax(h @ W / T) in float64 over the whole vocabulary."""
    z = hidden.astype(np.float64) @ weight.astype(np.float64) / temperature
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    ids = np.argsort(-logp, axis=-1, kind="stable")[..., :k]
    return ids, np.take_along_axis(logp, ids, axis=-1)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
@pytest.mark.parametrize("k,block_rows", [(1, 8), (5, 16), (17, 256)])
def test_matches_float64_brute_force(temperature, k, block_rows):
    rng = np.random.default_rng(int(temperature * 10) + k)
    n, h, v = 37, 24, 301  # N not a multiple of block_rows, odd V
    hidden = rng.normal(size=(n, h)).astype(np.float32)
    weight = (rng.normal(size=(h, v)) / np.sqrt(h) * 3).astype(np.float32)
    ids, lps = topk_logprobs(hidden, weight, k, temperature=temperature, block_rows=block_rows)
    ref_ids, ref_lps = brute_force(hidden, weight, k, temperature)
    assert ids.shape == lps.shape == (n, k) and ids.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(ids), ref_ids)
    np.testing.assert_allclose(np.asarray(lps), ref_lps, rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(np.asarray(lps), axis=-1) <= 0)  # highest first


def test_leading_dims_and_jit():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(3, 7, 16)).astype(np.float32)
    weight = rng.normal(size=(16, 50)).astype(np.float32)
    ids, lps = jax.jit(lambda h, w: topk_logprobs(h, w, 4, temperature=1.7, block_rows=5))(hidden, weight)
    ref_ids, ref_lps = brute_force(hidden.reshape(-1, 16), weight, 4, 1.7)
    assert ids.shape == (3, 7, 4)
    np.testing.assert_array_equal(np.asarray(ids).reshape(-1, 4), ref_ids)
    np.testing.assert_allclose(np.asarray(lps).reshape(-1, 4), ref_lps, rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_are_computed_in_float32():
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(9, 16)).astype(jax.numpy.bfloat16)
    weight = rng.normal(size=(16, 40)).astype(jax.numpy.bfloat16)
    ids, lps = topk_logprobs(hidden, weight, 3)
    ref_ids, ref_lps = brute_force(np.asarray(hidden, np.float64), np.asarray(weight, np.float64), 3, 1.0)
    assert lps.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(ids), ref_ids)
    np.testing.assert_allclose(np.asarray(lps), ref_lps, rtol=1e-5, atol=1e-5)


def test_never_materialises_all_rows_times_vocab():
    """The largest intermediate of the traced computation is [block_rows, V], not [N, V]."""
    n, h, v, block = 1000, 8, 300, 64
    jaxpr = jax.make_jaxpr(lambda x, w: topk_logprobs(x, w, 4, block_rows=block))(
        np.zeros((n, h), np.float32), np.zeros((h, v), np.float32)
    )

    def sizes(jx):
        for eqn in jx.eqns:
            for var in eqn.outvars:
                yield int(np.prod(var.aval.shape))
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", None)
                if inner is not None:
                    yield from sizes(getattr(inner, "jaxpr", inner))

    largest = max(sizes(jaxpr.jaxpr))
    assert block * v <= largest < n * v


def test_rejects_k_larger_than_vocab():
    with pytest.raises(ValueError, match="vocab size"):
        topk_logprobs(np.zeros((2, 4), np.float32), np.zeros((4, 3), np.float32), 4)


def test_bfloat16_weight_is_not_copied_to_float32():
    """A bf16 teacher's [H, V] LM head stays bf16 (products accumulate in float32 per block)."""
    h, v = 8, 300
    jaxpr = jax.make_jaxpr(lambda x, w: topk_logprobs(x, w, 4, block_rows=16))(
        np.zeros((50, h), jax.numpy.bfloat16), np.zeros((h, v), jax.numpy.bfloat16)
    )

    def avals(jx):
        for eqn in jx.eqns:
            yield from (var.aval for var in eqn.outvars)
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", None)
                if inner is not None:
                    yield from avals(getattr(inner, "jaxpr", inner))

    assert not [a for a in avals(jaxpr.jaxpr) if a.shape == (h, v) and a.dtype == np.float32]
