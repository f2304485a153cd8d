"""TPU splash attention (run here in Pallas's interpret mode) equals the CPU blocked attention on packed
batches, in value and gradient; kernels are chosen per platform; on a mesh they run under shard_map."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref import platform
from jaxpref.models.attention import attention, resolve_impl
from jaxpref.models.blocked_attention import blocked_attention
from jaxpref.models.splash_attention import splash_attention

REPO = Path(__file__).resolve().parents[2]


def packed_inputs(b: int, t: int, n: int, kv: int, d: int, dtype=jnp.float32, seed: int = 0):
    """q, k, v and segment ids [B, T] with several packed sequences and trailing padding (segment 0)."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (b, t, n, d), dtype)
    k = jax.random.normal(ks[1], (b, t, kv, d), dtype)
    v = jax.random.normal(ks[2], (b, t, kv, d), dtype)
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, t), np.int32)
    for row in range(b):
        cuts = np.sort(rng.choice(np.arange(1, t - 8), size=2, replace=False))
        seg[row, : cuts[0]], seg[row, cuts[0] : cuts[1]], seg[row, cuts[1] : t - 5] = 1, 2, 3
    return q, k, v, jnp.asarray(seg)


@pytest.mark.parametrize(
    "b,t,n,kv,d",
    [(2, 128, 4, 2, 32), (2, 200, 4, 1, 16), (1, 96, 2, 2, 64)],  # GQA; MQA + ragged length; MHA + short
)
def test_splash_equals_blocked_attention_in_value_and_gradient(b, t, n, kv, d):
    q, k, v, seg = packed_inputs(b, t, n, kv, d)
    w = jax.random.normal(jax.random.PRNGKey(9), (b, t, n, d))

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, segment_ids=seg) * w)

    out, ref = splash_attention(q, k, v, segment_ids=seg), blocked_attention(q, k, v, segment_ids=seg)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
    grads = jax.grad(lambda *a: loss(splash_attention, *a), argnums=(0, 1, 2))(q, k, v)
    ref_grads = jax.grad(lambda *a: loss(blocked_attention, *a), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=1e-4)


def test_splash_without_segments_is_plain_causal_and_keeps_bfloat16():
    q, k, v, _ = packed_inputs(1, 128, 4, 2, 32, dtype=jnp.bfloat16)
    out = splash_attention(q, k, v)
    assert out.dtype == jnp.bfloat16
    ref = blocked_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=3e-2)


def test_auto_chooses_per_platform():
    f32 = jnp.zeros((1, 8, 2, 64), jnp.float32)
    bf16, wide = f32.astype(jnp.bfloat16), jnp.zeros((1, 8, 2, 256), jnp.bfloat16)
    assert resolve_impl("auto", f32) == "blocked"  # this CPU
    with platform.lowering_for("tpu"):
        assert resolve_impl("auto", f32) == "splash"
        assert not platform.interpret_kernels()
    with platform.lowering_for("cuda"):
        assert resolve_impl("auto", bf16) == "cudnn"
        assert resolve_impl("auto", f32) == "blocked"  # cuDNN takes bfloat16/float16 only
        assert resolve_impl("auto", wide) == "blocked"  # head_dim over 128 (Gemma's 256)
    assert platform.kernel_platform() == "cpu" and platform.interpret_kernels()
    with pytest.raises(ValueError, match="attention impl"):
        attention(f32, f32, f32, impl="flash")


MESH_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp
    jax.config.update("jax_num_cpu_devices", 8)
    from jaxpref import platform, sharding as shd
    from jaxpref.models.attention import attention
    from jaxpref.pallas.linear_lse.api import linear_logsumexp_gather
    from tests.models.test_splash_attention import packed_inputs

    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    worst = {}

    def gap(out, ref):  # largest difference in value and gradients
        return max([abs(float(out[0] - ref[0]))] + [float(jnp.max(jnp.abs(a - r))) for a, r in zip(out[1], ref[1])])

    # attention: batch over (data, fsdp), heads over tensor; then heads that tensor does not divide
    for name, (b, t, n, kv) in {"split_heads": (4, 160, 4, 2), "replicated_heads": (4, 130, 3, 1)}.items():
        q, k, v, seg = packed_inputs(b, t, n, kv, 16)
        loss = lambda q, k, v, impl: jnp.sum(jnp.sin(attention(q, k, v, segment_ids=seg, impl=impl)))
        ref = jax.value_and_grad(loss, (0, 1, 2))(q, k, v, "blocked")
        with platform.kernel_mesh(mesh):
            out = jax.jit(jax.value_and_grad(loss, (0, 1, 2)), static_argnums=3)(q, k, v, "splash")
        worst[name] = gap(out, ref)
    # fused loss: rows over every axis that divides N (48: all three; 36: data and fsdp), LM head gathered
    kh, kw, ki = jax.random.split(jax.random.PRNGKey(1), 3)
    for rows in (48, 36):
        hid, w = jax.random.normal(kh, (rows, 32)), 0.1 * jax.random.normal(kw, (32, 256))
        ids = jax.random.randint(ki, (rows, 3), 0, 256)
        def f(hid, w, impl):
            lse, g = linear_logsumexp_gather(hid, w, ids, impl=impl, temperatures=(1.0, 2.0))
            return jnp.sum(jnp.sin(lse)) + jnp.sum(jnp.cos(g))
        ref = jax.value_and_grad(f, (0, 1))(hid, w, "reference")
        with platform.kernel_mesh(mesh):
            out = jax.jit(jax.value_and_grad(f, (0, 1)), static_argnums=2)(hid, w, "pallas")
        worst[f"loss_{rows}"] = gap(out, ref)
    print(worst)
    assert all(v < 1e-4 for v in worst.values()), worst
    """
)


@pytest.mark.slow
def test_kernels_under_shard_map_on_eight_devices_match_one_device():
    """Value and gradients of splash attention and of the Pallas fused loss on a (2, 2, 2) mesh equal the
    single-device references (the LM head's gradient is summed back over the devices)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
