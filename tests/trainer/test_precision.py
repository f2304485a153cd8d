"""The dtype policy's pieces (jaxpref/precision.py): stochastic rounding, float32 optimizer state."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpref import precision
from jaxpref.optim import make_optimizer
from tests.trainer.test_optim import _cfg


def _neighbours(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bfloat16 values just below and above float32 ``x`` (truncation towards zero, then one ulp up)."""
    bits = x.astype(np.float32).view(np.uint32)
    low = (bits & 0xFFFF0000).view(np.float32)
    high = ((bits & 0xFFFF0000) + 0x10000).view(np.float32)
    return np.minimum(low, high), np.maximum(low, high)


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=4096) * 10.0 ** rng.integers(-6, 3, size=4096)).astype(np.float32)
    seeds = [precision.rounding_seed(0, s) for s in range(400)]
    rounded = np.stack(
        [np.asarray(precision.stochastic_round(jnp.asarray(x), jnp.bfloat16, s).astype(jnp.float32)) for s in seeds]
    )
    low, high = _neighbours(x)
    assert np.all((rounded == low) | (rounded == high))
    # P(up) = (x - low) / (high - low); the mean over 400 draws is within 5 standard errors of it
    p_up = (x - low) / (high - low)
    frac_up = (rounded == high).mean(0)
    assert np.all(np.abs(frac_up - p_up) <= 5 * np.sqrt(p_up * (1 - p_up) / 400) + 1e-9)
    # and over all elements together the relative bias of the mean vanishes
    rel = (rounded.mean(0) - x) / (high - low)
    assert abs(rel.mean()) < 0.01


def test_exact_and_nonfinite_values_pass_through():
    x = jnp.asarray([0.0, -0.0, 1.0, -2.5, 3.0e38, jnp.inf, -jnp.inf, jnp.nan], jnp.float32)
    for step in range(5):
        out = precision.stochastic_round(x, jnp.bfloat16, precision.rounding_seed(3, step))
        out = np.asarray(out.astype(jnp.float32))
        np.testing.assert_array_equal(out[:4], np.asarray(x[:4]))
        assert np.isposinf(out[5]) and np.isneginf(out[6]) and np.isnan(out[7])


def test_noise_depends_on_seed_step_and_position_only():
    shape = (4, 6, 8)
    a = precision.rounding_noise(shape, precision.rounding_seed(0, 7))
    assert a.dtype == jnp.uint32 and int(a.max()) < 2**16
    np.testing.assert_array_equal(a, precision.rounding_noise(shape, precision.rounding_seed(0, 7)))  # resumable
    for other in (precision.rounding_seed(0, 8), precision.rounding_seed(1, 7)):
        assert np.mean(np.asarray(a) == np.asarray(precision.rounding_noise(shape, other))) < 0.01
    # each element's noise comes from its flat index: a slice of the array has the whole array's values
    flat = precision.rounding_noise((4 * 6 * 8,), precision.rounding_seed(0, 7))
    np.testing.assert_array_equal(np.asarray(a).reshape(-1), np.asarray(flat))
    # roughly uniform over [0, 2^16)
    big = np.asarray(precision.rounding_noise((1 << 16,), precision.rounding_seed(0, 0)))
    counts = np.bincount(big >> 12, minlength=16)
    assert counts.min() > 0.9 * 4096 and counts.max() < 1.1 * 4096


def test_small_updates_accumulate_with_stochastic_rounding_and_vanish_with_nearest():
    """1000 updates of 1e-4 on a bfloat16 weight of 1 (half an ulp is 2^-8 = 0.0039): rounding to
    nearest keeps 1.0; stochastic rounding reaches 1.1 on average, as float32 does."""
    params = {"w": jnp.ones((2048,), jnp.bfloat16)}
    updates = {"w": jnp.full((2048,), 1e-4, jnp.float32)}

    @functools.partial(jax.jit, static_argnums=1)
    def run(p, stochastic):
        def body(p, step):
            seed = precision.rounding_seed(0, step)
            return precision.apply_updates(p, updates, seed if stochastic else None), None

        return jax.lax.scan(body, p, jnp.arange(1000))[0]

    nearest = np.asarray(run(params, False)["w"].astype(jnp.float32))
    stochastic = np.asarray(run(params, True)["w"].astype(jnp.float32))
    np.testing.assert_array_equal(nearest, 1.0)
    assert abs(stochastic.mean() - 1.1) < 0.002, stochastic.mean()


def test_float32_parameters_update_exactly_as_optax():
    rng = np.random.default_rng(1)
    p = {"a": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.asarray(rng.normal(size=3), jnp.float32)}
    u = jax.tree.map(lambda x: x * 1e-3, p)
    out = precision.apply_updates(p, u, precision.rounding_seed(0, 0))
    for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(optax.apply_updates(p, u))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", ["adamw", "adam", "adafactor", "lion", "sgd"])
def test_optimizer_state_is_float32_for_bfloat16_parameters(name):
    """Every optimizer's state is float32 and keeps its dtypes through an update."""
    params = {"kernel": jnp.ones((256, 128), jnp.bfloat16), "bias": jnp.zeros((128,), jnp.bfloat16)}
    tx, _ = make_optimizer(_cfg(optimizer=name, weight_decay=0.01, max_grad_norm=1.0), 10)
    state = precision.init_optimizer_state(tx, params)
    floating = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert all(x.dtype == jnp.float32 for x in floating)
    grads = jax.tree.map(lambda x: jnp.full(x.shape, 0.5, jnp.float32), params)
    updates, new_state = tx.update(grads, state, params)
    new_state = precision.keep_dtypes(new_state, state)
    assert [x.dtype for x in jax.tree.leaves(new_state)] == [x.dtype for x in jax.tree.leaves(state)]
    new_params = precision.apply_updates(params, updates, precision.rounding_seed(0, 0))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(new_params))
