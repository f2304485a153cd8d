"""Final logit soft-capping in every fused LM-head kernel, against a float64 NumPy brute force.

``z = cap * tanh((h @ W + b) / cap)``; lse_t = logsumexp(z / T_t); gathered = z[ids]; the gradient of
<g_lse, lse> + <g_gathered, gathered> goes through the cap (1 - tanh^2). The cap is small against the
raw logits (std ~3) so that tanh is far from linear: an implementation that forgot the cap anywhere (the
forward, the gather, the VJP factor) is off by far more than the tolerance.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref.pallas import check_softcap, linear_logsumexp_gather, linear_logsumexp_gather_loss, linear_softmax_entropy
from jaxpref.pallas.linear_lse.pallas_gpu import linear_logsumexp_gather_pallas_gpu
from jaxpref.pallas.linear_lse.pallas_tpu import linear_logsumexp_gather_pallas_tpu

N, H, V, K = 37, 32, 203, 5  # not multiples of any block: padded rows, a ragged last vocabulary block
CAP = 2.5

CASES = [
    ("reference", {}, (2.0, 1.0)),
    ("xla_chunked", dict(block_n=16, block_v=64), (2.0, 1.0)),
    ("xla_chunked", dict(block_n=8, block_v=1024), (0.5, 1.0, 3.0)),
    ("pallas_gpu", dict(block_n=16, block_v=32, block_h=16), (2.0, 1.0)),  # Triton kernels, interpreted
    ("pallas_gpu", dict(block_n=32, block_v=64, block_h=32), (0.5, 1.0, 3.0)),
    ("pallas_tpu", dict(block_n=16, block_v=128), (2.0, 1.0)),  # Mosaic kernels, interpreted
    ("pallas_tpu", dict(block_n=8, block_v=256), (0.5, 1.0, 3.0)),
]


def make_inputs(seed=0, temps=2):
    keys = jax.random.split(jax.random.key(seed), 6)
    hidden = jax.random.normal(keys[0], (N, H))
    weight = jax.random.normal(keys[1], (H, V)) * 0.5
    bias = jax.random.normal(keys[2], (V,))
    ids = jax.random.randint(keys[3], (N, K), 0, V)
    ids = ids.at[:, 1].set(ids[:, 0])  # a duplicate id in every row
    ids = ids.at[0, :].set(V - 1).at[1, :].set(0)  # the vocabulary edges
    row_mask = jnp.arange(N) % 5 != 3  # masked rows: zero cotangent
    g_lse = jnp.where(row_mask, jax.random.normal(keys[4], (temps, N)), 0.0)
    g_gathered = jnp.where(row_mask[:, None], jax.random.normal(keys[5], (N, K)), 0.0)
    return hidden, weight, bias, ids, g_lse, g_gathered


def brute_force(hidden, weight, bias, ids, g_lse, g_gathered, temps, cap):
    """float64 NumPy: (lse [T, N], gathered [N, K]), (grad_h, grad_W, grad_b)."""
    h, w, b = (np.asarray(x, np.float64) for x in (hidden, weight, bias))
    ids, g_lse, g_gathered = np.asarray(ids), np.asarray(g_lse, np.float64), np.asarray(g_gathered, np.float64)
    raw = h @ w + b
    z = raw if cap is None else cap * np.tanh(raw / cap)
    lse, dz = [], np.zeros_like(z)
    for i, t in enumerate(temps):
        zt = z / t
        m = zt.max(axis=1, keepdims=True)
        lse_t = (m + np.log(np.exp(zt - m).sum(axis=1, keepdims=True)))[:, 0]
        lse.append(lse_t)
        dz += g_lse[i][:, None] / t * np.exp(zt - lse_t[:, None])
    rows = np.arange(N)[:, None].repeat(ids.shape[1], 1)
    np.add.at(dz, (rows, ids), g_gathered)
    if cap is not None:
        dz *= 1.0 - np.tanh(raw / cap) ** 2
    return (np.stack(lse), np.take_along_axis(z, ids, 1)), (dz @ w.T, h.T @ dz, dz.sum(0))


def run_vjp(fn, hidden, weight, bias, g_lse, g_gathered):
    out, pullback = jax.vjp(fn, hidden, weight, bias)
    return out, pullback((g_lse, g_gathered))


def assert_close(actual, expected, tol=3e-5):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("impl,blocks,temps", CASES)
def test_every_impl_matches_float64_brute_force(impl, blocks, temps):
    hidden, weight, bias, ids, g_lse, g_gathered = make_inputs(temps=len(temps))
    want_out, want_grads = brute_force(hidden, weight, bias, ids, g_lse, g_gathered, temps, CAP)

    def f(h, w, b):
        return linear_logsumexp_gather(h, w, ids, bias=b, temperatures=temps, softcap=CAP, impl=impl, **blocks)

    out, grads = jax.jit(lambda *a: run_vjp(f, *a))(hidden, weight, bias, g_lse, g_gathered)
    assert np.max(np.abs(np.asarray(out[1]))) <= CAP  # the gathered logits are the capped ones
    for a, e in zip(out, want_out):
        assert_close(a, e)
    for a, e in zip(grads, want_grads):
        assert_close(a, e)


def test_the_brute_force_sees_the_cap():
    """The cap changes every output by far more than the tolerance above (the test can fail)."""
    hidden, weight, bias, ids, g_lse, g_gathered = make_inputs()
    capped = brute_force(hidden, weight, bias, ids, g_lse, g_gathered, (2.0, 1.0), CAP)
    plain = brute_force(hidden, weight, bias, ids, g_lse, g_gathered, (2.0, 1.0), None)
    for a, b in zip(jax.tree.leaves(capped), jax.tree.leaves(plain)):
        assert np.max(np.abs(a - b)) > 0.1


@pytest.mark.parametrize("impl", ["xla_onepass", "xla_chunked", "pallas_gpu"])
def test_row_loss_matches_brute_force(impl):
    """``linear_logsumexp_gather_loss`` (the one-pass kernel included): an NLL at temperature 2 plus a
    gathered-logit term, capped, with padding ids clipped and masked as the fused losses do."""
    temps = (2.0,)
    hidden, weight, bias, ids, _, _ = make_inputs()
    labels = ids[:, :1].at[3:9].set(-100)
    mask = (labels[:, 0] >= 0).astype(jnp.float32)
    safe = jnp.clip(labels, 0, V - 1)

    def row_loss(lse, gathered, m):
        return jnp.sum(m * (lse[0] - gathered[:, 0] / 2.0 + 0.1 * gathered[:, 0]))

    def f(h, w, b):
        return linear_logsumexp_gather_loss(
            h, w, safe, row_loss, mask, bias=b, temperatures=temps, softcap=CAP, impl=impl
        )[0]

    value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(hidden, weight, bias)
    g_lse = mask[None, :]
    g_gathered = (mask * (-0.5 + 0.1))[:, None]
    (lse, gathered), want_grads = brute_force(hidden, weight, bias, safe, g_lse, g_gathered, temps, CAP)
    m = np.asarray(mask, np.float64)
    assert_close(value, np.sum(m * (lse[0] - 0.4 * gathered[:, 0])))
    for a, e in zip(grads, want_grads):
        assert_close(a, e)


@pytest.mark.parametrize("impl,temperature", [("reference", 1.0), ("xla_chunked", 1.0), ("xla_chunked", 0.7)])
def test_entropy_with_cap_matches_brute_force(impl, temperature):
    hidden, weight, bias, *_ = make_inputs()
    blocks = {} if impl == "reference" else dict(block_n=16, block_v=64)
    got = linear_softmax_entropy(hidden, weight, bias=bias, temperature=temperature, softcap=CAP, impl=impl, **blocks)
    raw = np.asarray(hidden, np.float64) @ np.asarray(weight, np.float64) + np.asarray(bias, np.float64)
    z = CAP * np.tanh(raw / CAP) / temperature
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    assert_close(got, -(np.exp(logp) * logp).sum(1))


@pytest.mark.parametrize("bad", [0.0, -30.0, float("inf"), float("nan")])
def test_bad_softcap_is_a_clear_error(bad):
    hidden, weight, _, ids, *_ = make_inputs()
    with pytest.raises(ValueError, match="softcap must be a positive finite float"):
        linear_logsumexp_gather(hidden, weight, ids, softcap=bad)


def test_traced_softcap_is_a_clear_error():
    with pytest.raises(TypeError, match="static Python float"):
        jax.jit(check_softcap)(30.0)


S = jax.ShapeDtypeStruct


def _lowered(fn, dtype, platform, softcap=30.0, **kw):
    n, h, v, k = 512, 64, 4096, 3

    def loss(hd, w, ids):
        lse, gathered = fn(hd, w, ids, temperatures=(2.0, 1.0), softcap=softcap, interpret=False, **kw)
        return jnp.sum(lse) - jnp.sum(gathered)

    args = (S((n, h), dtype), S((h, v), dtype), S((n, k), jnp.int32))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(*args).lower(lowering_platforms=(platform,))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_capped_pallas_kernels_lower_for_cuda_and_tpu(dtype):
    """Lower (not run) the capped kernels: tanh and the VJP factor must have Triton and Mosaic lowerings."""
    gpu = _lowered(linear_logsumexp_gather_pallas_gpu, dtype, "cuda", block_n=64, block_v=128, block_h=64).as_text()
    assert gpu.count("__gpu$xla.gpu.triton") == 3
    assert gpu.count("__nv_tanhf") == 3  # the cap is inside each Triton kernel (CUDA's tanh)
    tpu = _lowered(linear_logsumexp_gather_pallas_tpu, dtype, "tpu", block_n=128, block_v=512).as_text()
    assert tpu.count("tpu_custom_call") == 3
    # Mosaic kernels travel as bytecode: check that the lowered kernels are not the uncapped ones.
    plain = _lowered(linear_logsumexp_gather_pallas_tpu, dtype, "tpu", block_n=128, block_v=512, softcap=None)
    assert plain.as_text() != tpu


def test_capped_kernels_export_for_cuda_and_tpu():
    """``jax.export`` of the capped forward + VJP for both accelerator platforms."""
    triton = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]  # no stability promise
    for fn, platform, kw, checks in (
        (linear_logsumexp_gather_pallas_gpu, "cuda", dict(block_n=64, block_v=128, block_h=64), triton),
        (linear_logsumexp_gather_pallas_tpu, "tpu", dict(block_n=128, block_v=512), []),
    ):

        def loss(hd, w, ids, fn=fn, kw=kw):
            lse, gathered = fn(hd, w, ids, softcap=30.0, interpret=False, **kw)
            return jnp.sum(lse) - jnp.sum(gathered)

        args = (S((256, 64), jnp.bfloat16), S((64, 1024), jnp.bfloat16), S((256, 2), jnp.int32))
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        exported = jax.export.export(grad, platforms=[platform], disabled_checks=checks)(*args)
        assert exported.platforms == (platform,)
        assert exported.mlir_module().count("custom_call") >= 3
