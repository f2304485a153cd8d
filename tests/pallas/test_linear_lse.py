"""linear_logsumexp_gather: every implementation equals the full-logits reference (values and VJP)."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref.pallas import linear_logsumexp_gather
from jaxpref.pallas.linear_lse import api, resolve_block_sizes

N, H, V, K = 37, 32, 203, 5  # V and N not multiples of any block used below

XLA = ("xla_chunked", dict(block_n=16, block_v=64))
PALLAS = ("pallas", dict(block_n=16, block_v=32, block_h=16))  # Triton kernels, interpret mode on CPU
TPU = ("pallas_tpu", dict(block_n=16, block_v=128))  # Mosaic kernels, interpret mode on CPU
# (impl, block overrides, temperatures): several row chunks, a ragged last vocabulary block, a block
# wider than V, several vocabulary splits per row block, three temperatures.
CASES = [
    (*XLA, (2.0, 1.0)),
    ("xla_chunked", dict(block_n=4096, block_v=50), (1.0,)),
    ("xla_chunked", dict(block_n=8, block_v=1024), (0.5, 1.0, 3.0)),
    (*PALLAS, (2.0, 1.0)),
    ("pallas", dict(block_n=32, block_v=64, block_h=32), (0.5, 1.0, 3.0)),
    (*TPU, (2.0, 1.0)),
    ("pallas_tpu", dict(block_n=8, block_v=256), (0.5, 1.0, 3.0)),
]


def make_inputs(seed=0, *, dtype=jnp.float32, n=N, h=H, v=V, k=K, temps=2):
    keys = jax.random.split(jax.random.key(seed), 6)
    hidden = jax.random.normal(keys[0], (n, h)).astype(dtype)
    weight = (jax.random.normal(keys[1], (h, v)) * 0.5).astype(dtype)
    bias = jax.random.normal(keys[2], (v,)).astype(dtype)
    ids = jax.random.randint(keys[3], (n, k), 0, v)
    ids = ids.at[:, 1].set(ids[:, 0])  # a duplicate id in every row
    ids = ids.at[0, :].set(v - 1).at[1, :].set(0)  # the vocabulary edges
    row_mask = jnp.arange(n) % 5 != 3  # "masked rows": zero cotangent, as a masked loss gives
    g_lse = jnp.where(row_mask, jax.random.normal(keys[4], (temps, n)), 0.0)
    g_gathered = jnp.where(row_mask[:, None], jax.random.normal(keys[5], (n, k)), 0.0)
    return hidden, weight, bias, ids, g_lse, g_gathered


def value_and_grads(impl, hidden, weight, bias, ids, g_lse, g_gathered, temps, **blocks):
    """(lse, gathered) and the gradient of <g_lse, lse> + <g_gathered, gathered> w.r.t. h, W, b."""

    def f(h, w, b):
        return linear_logsumexp_gather(h, w, ids, bias=b, temperatures=temps, impl=impl, **blocks)

    @jax.jit
    def run(h, w, b):
        out, pullback = jax.vjp(f, h, w, b)
        return out, pullback((g_lse, g_gathered))

    return run(hidden, weight, bias)


@functools.cache
def reference(seed, temps, dtype=jnp.float32):
    hidden, weight, bias, ids, g_lse, g_gathered = make_inputs(seed, dtype=dtype, temps=len(temps))
    return value_and_grads("reference", hidden, weight, bias, ids, g_lse, g_gathered, temps)


def assert_close(actual, expected, rtol=2e-5, atol=2e-5):
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32), rtol, atol)


@pytest.mark.parametrize("impl,blocks,temps", CASES)
def test_matches_reference(impl, blocks, temps):
    hidden, weight, bias, ids, g_lse, g_gathered = make_inputs(temps=len(temps))
    ref_out, ref_grads = reference(0, temps)
    out, grads = value_and_grads(impl, hidden, weight, bias, ids, g_lse, g_gathered, temps, **blocks)
    assert out[0].shape == (len(temps), N) and out[0].dtype == jnp.float32
    assert out[1].shape == (N, K) and out[1].dtype == jnp.float32
    for a, e in zip(out, ref_out):
        assert_close(a, e)
    for a, e in zip(grads, ref_grads):
        assert a.dtype == e.dtype
        assert_close(a, e)


@pytest.mark.parametrize("impl,blocks", [XLA, PALLAS, TPU])
def test_without_bias_and_single_cotangent(impl, blocks):
    """No bias; a loss of lse only, and one of gathered only (the other cotangent is zero)."""
    hidden, weight, _, ids, g_lse, g_gathered = make_inputs(seed=1)
    temps = (2.0, 1.0)

    def grads(name, **kw):
        def loss(h, w, which):
            lse, gathered = linear_logsumexp_gather(h, w, ids, temperatures=temps, impl=name, **kw)
            return jnp.sum(lse * g_lse) if which == "lse" else jnp.sum(gathered * g_gathered)

        g = jax.grad(loss, argnums=(0, 1))
        return jax.jit(lambda h, w: (g(h, w, "lse"), g(h, w, "gathered")))(hidden, weight)

    for a, e in zip(jax.tree.leaves(grads(impl, **blocks)), jax.tree.leaves(grads("reference"))):
        assert_close(a, e)


def test_duplicate_ids_accumulate():
    """Gathering the same id twice gives twice the gradient of gathering it once (the Pallas kernels
    see a duplicate in every row of ``test_matches_reference``)."""
    hidden, weight, _, _, _, _ = make_inputs(seed=2, n=8, v=40)
    ids_once = jnp.full((8, 1), 7, jnp.int32)
    ids_twice = jnp.full((8, 2), 7, jnp.int32)

    def g(w, ids):
        loss = lambda w: jnp.sum(linear_logsumexp_gather(hidden, w, ids, impl=XLA[0], **XLA[1])[1])
        return jax.grad(loss)(w)

    once, twice = jax.jit(lambda w: (g(w, ids_once), g(w, ids_twice)))(weight)
    assert_close(twice, 2 * once)


@pytest.mark.parametrize("impl,blocks", [XLA, PALLAS, TPU])
def test_bfloat16_inputs(impl, blocks):
    hidden, weight, bias, ids, g_lse, g_gathered = make_inputs(seed=3, dtype=jnp.bfloat16)
    temps = (2.0, 1.0)
    ref_out, ref_grads = reference(3, temps, jnp.bfloat16)
    out, grads = value_and_grads(impl, hidden, weight, bias, ids, g_lse, g_gathered, temps, **blocks)
    for a, e in zip(out, ref_out):
        assert a.dtype == jnp.float32
        assert_close(a, e, rtol=1e-4, atol=1e-4)  # float32 math on bf16 inputs
    for a, e in zip(grads, ref_grads):
        assert a.dtype == jnp.bfloat16
        assert_close(a, e, rtol=2e-2, atol=2e-2)  # one bf16 rounding of the result


def test_large_logits_stay_finite():
    """Huge logits do not overflow the online log-sum-exp (the running max is subtracted)."""
    hidden, weight, _, ids, _, _ = make_inputs(seed=4)
    hidden = hidden * 200.0

    def lse(name, **kw):
        return linear_logsumexp_gather(hidden, weight, ids, temperatures=(1.0, 0.5), impl=name, **kw)[0]

    expected = lse("reference")
    for impl, blocks in [XLA, PALLAS, TPU]:
        actual = jax.jit(lambda impl=impl, blocks=blocks: lse(impl, **blocks))()
        assert bool(jnp.all(jnp.isfinite(actual)))
        assert_close(actual, expected, rtol=1e-5, atol=1e-3)


def test_auto_uses_xla_on_cpu_and_matches():
    hidden, weight, bias, ids, g_lse, g_gathered = make_inputs(seed=0)
    ref_out, ref_grads = reference(0, (2.0, 1.0))
    out, grads = value_and_grads("auto", hidden, weight, bias, ids, g_lse, g_gathered, (2.0, 1.0))
    for a, e in zip(list(out) + list(grads), list(ref_out) + list(ref_grads)):
        assert_close(a, e)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_auto_falls_back_with_one_warning_when_pallas_cannot_compile(monkeypatch, backend):
    """Pretend to be on a GPU/TPU: its kernel cannot compile on CPU, so auto warns and uses XLA."""
    monkeypatch.setattr(api, "_backend", lambda: backend)
    api._pallas_failure.cache_clear()
    hidden, weight, _, ids, _, _ = make_inputs(seed=6, n=24)
    expected = linear_logsumexp_gather(hidden, weight, ids, impl="reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = jax.jit(lambda h, w: linear_logsumexp_gather(h, w, ids, impl="auto"))(hidden, weight)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "using xla_chunked" in messages[0] and "\n" not in messages[0]
    for a, e in zip(out, expected):
        assert_close(a, e)
    api._pallas_failure.cache_clear()


def test_argument_errors():
    hidden, weight, bias, ids, _, _ = make_inputs()
    with pytest.raises(ValueError, match="unknown impl"):
        linear_logsumexp_gather(hidden, weight, ids, impl="cuda")
    with pytest.raises(ValueError, match="flatten"):
        linear_logsumexp_gather(hidden[None], weight, ids)
    with pytest.raises(ValueError, match="positive"):
        linear_logsumexp_gather(hidden, weight, ids, temperatures=(0.0,))
    with pytest.raises(ValueError, match="bias"):
        linear_logsumexp_gather(hidden, weight, ids, bias=bias[:-1])
    with pytest.raises(ValueError, match="block_v"):
        linear_logsumexp_gather(hidden, weight, ids, block_v=-1)


def test_block_table_defaults_and_overrides():
    cpu = resolve_block_sizes("cpu", "xla_chunked")
    assert cpu.block_n > 0 and cpu.block_v > 0
    assert resolve_block_sizes("cpu", "xla_chunked", block_v=128).block_v == 128
    assert resolve_block_sizes("cpu", "xla_chunked", block_v=128).block_n == cpu.block_n
    gpu = resolve_block_sizes("gpu", "pallas_gpu")
    assert all(x & (x - 1) == 0 for x in (gpu.block_n, gpu.block_v, gpu.block_h))
    assert resolve_block_sizes("tpu", "something_new").block_v > 0  # generic fallback entry
