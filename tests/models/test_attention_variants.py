"""Sliding windows, logit soft-capping and custom score scales in every attention implementation, against
a float64 numpy brute force (values and q/k/v gradients); the blocked kernel and splash skip the key
blocks outside the window; cuDNN and splash lower for their platforms with the variants."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref import platform
from jaxpref.models.attention import attention, decode_attention, resolve_impl
from jaxpref.models.blocked_attention import blocked_attention
from jaxpref.models.splash_attention import _kernel

# row 0: segments 1, 2, 3 then padding (windows cross the boundaries at 11 and 29); row 1: one sequence
T = 40
SEGMENTS = np.array([[1] * 11 + [2] * 18 + [3] * 7 + [0] * 4, [1] * T], np.int32)


def brute_force(q, k, v, seg, g, window, softcap, scale):
    """float64 numpy attention and its q/k/v gradients for the cotangent ``g`` (hand-derived backward)."""
    q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
    b, t, n, d = q.shape
    kv = k.shape[2]
    rep = n // kv
    kr, vr = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)  # query head h uses KV head h // rep
    scale = 1 / np.sqrt(d) if scale is None else scale
    s = np.einsum("bind,bjnd->bnij", q, kr) * scale
    th = np.tanh(s / softcap) if softcap is not None else None
    if softcap is not None:
        s = softcap * th
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    visible = (j <= i) & ((j > i - window) if window is not None else True)
    seg = np.zeros((b, t), np.int32) if seg is None else np.asarray(seg)
    allowed = visible[None] & (seg[:, :, None] == seg[:, None, :])  # [B, T, T]
    s = np.where(allowed[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bnij,bjnd->bind", p, vr)
    dvr = np.einsum("bnij,bind->bjnd", p, g)
    dp = np.einsum("bind,bjnd->bnij", g, vr)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
    if softcap is not None:
        ds *= 1 - th**2
    ds *= scale
    dq = np.einsum("bnij,bjnd->bind", ds, kr)
    dkr = np.einsum("bnij,bind->bjnd", ds, q)
    fold = lambda x: x.reshape(b, t, kv, rep, d).sum(3)  # noqa: E731
    return out, (dq, fold(dkr), fold(dvr))


def inputs(b=2, t=T, n=4, kv=2, d=16, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = 2.0 * jax.random.normal(ks[0], (b, t, n, d))  # large enough scores for the soft cap to matter
    k = 2.0 * jax.random.normal(ks[1], (b, t, kv, d))
    v = jax.random.normal(ks[2], (b, t, kv, d))
    g = jax.random.normal(ks[3], (b, t, n, d))
    return [x.astype(dtype) for x in (q, k, v, g)]


def run(impl, q, k, v, g, seg, **variant):
    if impl == "blocked":
        fn = lambda q, k, v: blocked_attention(q, k, v, segment_ids=seg, block_q=8, **variant)  # noqa: E731
    else:
        fn = lambda q, k, v: attention(q, k, v, segment_ids=seg, impl=impl, **variant)  # noqa: E731
    out, pullback = jax.vjp(fn, q, k, v)
    return out, pullback(g)


VARIANTS = {
    "window_packed": dict(window=6),  # shorter than every segment and crossing their boundaries
    "window_1": dict(window=1),  # only itself
    "window_over_T": dict(window=T + 9),  # the same as no window
    "softcap": dict(softcap=2.5),
    "scale": dict(scale=0.4),
    "all": dict(window=9, softcap=3.0, scale=0.3),  # Gemma 2's sliding layers
}


# (impl, variant, KV heads): every variant with GQA on blocked and xla; MQA with all variants at once;
# splash (slow in interpret mode) on the window cases
CASES = [(impl, name, 2) for impl in ("blocked", "xla") for name in VARIANTS] + [
    ("blocked", "all", 1), ("xla", "all", 1),
    ("splash", "window_packed", 2), ("splash", "window_1", 2), ("splash", "all", 2), ("splash", "all", 1),
]  # fmt: skip


@pytest.mark.parametrize("impl,name,kv", CASES)
def test_matches_float64_brute_force(impl, name, kv):
    variant = VARIANTS[name]
    q, k, v, g = inputs(kv=kv)
    seg = jnp.asarray(SEGMENTS) if name != "window_1" else None
    out, grads = jax.jit(lambda *a: run(impl, *a, seg, **variant))(q, k, v, g)
    ref_out, ref_grads = brute_force(q, k, v, seg, g, **{"window": None, "softcap": None, "scale": None, **variant})
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=2e-5)
    for a, e, x in zip(grads, ref_grads, "qkv"):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=5e-5, err_msg=f"d{x}")


def test_window_shorter_than_t_changes_the_result():
    """The brute force itself: a window is not a no-op here (else the tests above prove nothing)."""
    q, k, v, g = inputs()
    full = brute_force(q, k, v, SEGMENTS, g, None, None, None)[0]
    windowed = brute_force(q, k, v, SEGMENTS, g, 6, None, None)[0]
    capped = brute_force(q, k, v, SEGMENTS, g, None, 2.5, None)[0]
    assert np.abs(full - windowed).max() > 0.1 and np.abs(full - capped).max() > 0.1


@pytest.mark.parametrize("impl", ["blocked", "xla"])
def test_bfloat16(impl):
    q, k, v, g = inputs(dtype=jnp.bfloat16, seed=1)
    variant = dict(window=7, softcap=3.0, scale=0.3)
    seg = jnp.asarray(SEGMENTS)
    out, grads = jax.jit(lambda *a: run(impl, *a, seg, **variant))(q, k, v, g)
    assert out.dtype == jnp.bfloat16 and all(x.dtype == jnp.bfloat16 for x in grads)
    ref_out, ref_grads = brute_force(q, k, v, seg, g, **variant)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, rtol=3e-2, atol=3e-2)
    for a, e in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(a, np.float32), e, rtol=5e-2, atol=6e-2)


def test_decode_attention_equals_the_last_row_of_full_attention():
    """One query at slot s against a cache whose later slots hold garbage: the brute force's row s."""
    q, k, v, g = inputs(b=2, t=T, kv=2)
    slots = np.array([T - 1, 23])
    variant = dict(window=6, softcap=2.5, scale=0.4)
    garbage = jnp.arange(T)[None, :, None, None] > jnp.asarray(slots)[:, None, None, None]
    k_cache, v_cache = jnp.where(garbage, 1e3, k), jnp.where(garbage, 1e3, v)
    q_now = q[jnp.arange(2), jnp.asarray(slots)][:, None]
    out = decode_attention(q_now, k_cache, v_cache, jnp.asarray(slots), **variant)
    ref = brute_force(q, k, v, None, g, **variant)[0]
    np.testing.assert_allclose(out[:, 0], ref[np.arange(2), slots], rtol=1e-5, atol=2e-5)


def test_blocked_window_skips_key_blocks_outside_the_window():
    """Forward + backward: no score block wider than block_q + window - 1 keys, and about a third of
    the causal flops at T = 256, block_q = 32, window = 16."""
    s = jax.ShapeDtypeStruct
    b, t, n, kv, d, block_q, window = 1, 256, 2, 1, 16, 32, 16
    args = [s((b, t, n, d), jnp.float32), s((b, t, kv, d), jnp.float32), s((b, t, kv, d), jnp.float32)]

    def lowered(w):
        fn = lambda *a: jnp.sum(blocked_attention(*a, block_q=block_q, window=w) ** 2)  # noqa: E731
        return jax.jit(jax.grad(fn, argnums=(0, 1, 2))).lower(*args)

    windowed, causal = lowered(window), lowered(None)
    widths = {int(m) for m in re.findall(r"dot_general.*-> tensor<1x1x2x32x(\d+)xf32>", windowed.as_text())}
    assert widths and max(widths) == block_q + window - 1, widths
    flops = lambda low: low.compile().cost_analysis()["flops"]  # noqa: E731
    assert flops(windowed) < 0.4 * flops(causal)


def test_splash_window_mask_skips_key_blocks():
    """The kernel's block tables: with a window of one block, each query block visits at most 2 key
    blocks (causal: up to all 8)."""
    causal, local = _kernel(1024, 2, 128, True, None, None), _kernel(1024, 2, 128, True, 128, None)
    assert int((np.asarray(causal.fwd_mask_info.block_mask) > 0).sum()) == 36
    assert int((np.asarray(local.fwd_mask_info.block_mask) > 0).sum()) == 15
    assert np.asarray(local.fwd_mask_info.data_next).shape[-1] == 2


def test_resolve_impl_on_gpu_avoids_cudnn_with_a_soft_cap():
    bf16 = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    with platform.lowering_for("cuda"):
        assert resolve_impl("auto", bf16) == "cudnn"
        assert resolve_impl("auto", bf16, softcap=50.0) == "blocked"
    with pytest.raises(ValueError, match="soft-capping"):
        attention(bf16, bf16, bf16, impl="cudnn", softcap=50.0)
    for bad in (dict(window=0), dict(window=2.5), dict(softcap=0.0), dict(scale=-1.0)):
        with pytest.raises(ValueError, match="attention (window|softcap|scale)"):
            attention(bf16, bf16, bf16, **bad)


def _lower(target, fn, args):
    """Value and q/k/v gradients of ``fn`` lowered (not run) for ``target`` with kernels chosen for it."""
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2)  # noqa: E731
    with platform.lowering_for(target):
        traced = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(*args)
        return traced.lower(lowering_platforms=(target,)).as_text()


@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_lowers_with_the_sliding_window_and_scale(packed):
    s = jax.ShapeDtypeStruct
    b, t, n, kv, d = 2, 64, 4, 2, 16
    args = (s((b, t, n, d), jnp.bfloat16), s((b, t, kv, d), jnp.bfloat16), s((b, t, kv, d), jnp.bfloat16))
    seg = jnp.asarray(np.repeat(np.arange(1, 3), t // 2)[None].repeat(b, 0)) if packed else None
    text = _lower("cuda", lambda q, k, v: attention(q, k, v, segment_ids=seg, window=8, scale=0.25), args)
    text = text.replace("\\22", '"')  # the backend config is an escaped JSON string
    calls = re.findall(r"custom_call @__cudnn\$fmha(\w+)\(", text)
    kind = "ScaleBiasSoftmax" if packed else "Softmax"  # packed: the segment mask goes in as a bias
    assert sorted(calls) == [kind, kind + "Backward"]
    assert re.findall(r'"sliding_window_length": (\d+)', text) == ["8", "8"]  # keys i-7 .. i
    assert re.findall(r'"fmha_scale": ([\d.]+)', text) == ["0.25", "0.25"]
    assert re.findall(r'"mask_type": "(\w+)"', text) == ["CAUSAL", "CAUSAL"]


def test_splash_lowers_for_tpu_with_window_and_soft_cap():
    s = jax.ShapeDtypeStruct
    b, t, n, kv, d = 1, 1024, 2, 1, 128
    args = (s((b, t, n, d), jnp.bfloat16), s((b, t, kv, d), jnp.bfloat16), s((b, t, kv, d), jnp.bfloat16))
    seg = jnp.ones((b, t), jnp.int32)
    text = _lower("tpu", lambda q, k, v: attention(q, k, v, segment_ids=seg, window=512, softcap=30.0), args)
    assert text.count("tpu_custom_call") >= 3  # forward, dq, dkv
