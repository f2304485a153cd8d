"""The dtype policy of a training run: the dtype each piece of state is kept in, and how a float32
update reaches bfloat16 parameters (docs/config.md "Precision").

=====================================  ==========================================================
state                                  dtype
=====================================  ==========================================================
parameters, trained or frozen          ``param_dtype``
LoRA adapters (``lora_A``/``lora_B``)  float32, whatever ``param_dtype`` (PEFT's autocast_adapter_dtype)
``lora_modules_to_save`` copies        ``param_dtype`` (PEFT copies the module as it is)
activations, matmul inputs             ``compute_dtype``; norms, RoPE, softmax, losses in float32
one micro-batch's gradients            the parameter's dtype (what autodiff gives)
gradient accumulator (accumulation)    float32
optimizer state (Adam moments, ...)    float32
frozen reference / online teacher      ``rl_reference_dtype`` / ``kd_teacher_dtype`` (default ``param_dtype``)
=====================================  ==========================================================

The optimizer computes its update in float32. A float32 parameter adds it exactly as
``optax.apply_updates`` does. A bfloat16 parameter keeps 8 significant bits, so rounding ``p + u``
to the nearest bfloat16 drops any update smaller than half a unit in the last place (2^-9 to 2^-8
of ``|p|``): at fine-tuning learning rates (Adam moves a weight by about the learning rate, 1e-5
against weights of 1e-2) most updates vanish. bfloat16 parameters are therefore rounded
*stochastically*: up or down with the probabilities that make the expected value ``p + u`` exactly,
so small updates accumulate on average (docs/config.md has the measurements). The noise is a hash of
the seed, the step number and the element's index, so a resumed run rounds exactly as the
uninterrupted one, on any mesh.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

#: Storage dtype of LoRA adapters and of every optimizer state array.
ADAPTER_DTYPE = jnp.float32
OPTIMIZER_STATE_DTYPE = jnp.float32


def init_optimizer_state(tx: optax.GradientTransformation, params: Any) -> Any:
    """``tx.init`` with float32 state whatever the parameters' dtype (optax sizes moments like params).

    Traceable: ``jax.eval_shape`` of it plans the state without allocating it.
    """
    as_float32 = lambda x: x.astype(OPTIMIZER_STATE_DTYPE) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
    return tx.init(jax.tree.map(as_float32, params))


def keep_dtypes(new: Any, old: Any) -> Any:
    """``new`` cast leaf by leaf to the dtypes of ``old`` (an optimizer update may promote a state
    array; the state's dtypes are fixed when it is created)."""
    return jax.tree.map(lambda n, o: n.astype(o.dtype) if hasattr(n, "astype") else n, new, old)


def _mix32(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: a bijection of uint32 whose every output bit depends on every input bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def rounding_seed(seed: int, step: jax.Array) -> jax.Array:
    """uint32 seed of one optimizer step's rounding noise, from the run's seed and the step number."""
    return _mix32(_mix32(jnp.uint32(seed & 0xFFFFFFFF) ^ jnp.uint32(0x5EED0DD)) + jnp.asarray(step).astype(jnp.uint32))


def rounding_noise(shape: tuple[int, ...], seed: jax.Array) -> jax.Array:
    """uint32 [shape] of uniform 16-bit noise: a hash of each element's flat index and ``seed``.

    A counter-based hash rather than ``jax.random``: rounding needs no more than uniform, independent
    low bits, and threefry per parameter array costs far more (on CPU, 11x the time of this hash per
    element and about 0.4 s of compilation per array). The index is the element's position in the
    whole array, so every device of a mesh computes its shard's noise alone (iota is partitioned) and
    the values do not depend on how the array is sharded.
    """
    index = jax.lax.broadcasted_iota(jnp.uint32, shape, 0) if shape else jnp.uint32(0)
    for dim in range(1, len(shape)):
        index = index * jnp.uint32(shape[dim]) + jax.lax.broadcasted_iota(jnp.uint32, shape, dim)
    return _mix32(_mix32(index ^ seed) + seed) >> 16


def stochastic_round(x: jax.Array, dtype: Any, seed: jax.Array) -> jax.Array:
    """``x`` (float32) rounded to ``dtype``: bfloat16 stochastically (unbiased), anything else as usual.

    A bfloat16 is the top 16 bits of a float32. Adding uniform 16-bit noise to the low 16 bits and
    truncating rounds the magnitude up with probability (low bits) / 2^16, so ``E[round(x)] == x``.
    Non-finite values pass through unchanged.
    """
    if jnp.dtype(dtype) != jnp.bfloat16:
        return x.astype(dtype)
    x = x.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    truncated = (bits + rounding_noise(x.shape, seed)) & jnp.uint32(0xFFFF0000)
    rounded = jax.lax.bitcast_convert_type(truncated, jnp.float32).astype(jnp.bfloat16)  # exact
    return jnp.where(jnp.isfinite(x), rounded, x.astype(jnp.bfloat16))


def apply_updates(params: Any, updates: Any, seed: jax.Array | None) -> Any:
    """``params + updates`` computed in float32, stored in each parameter's own dtype.

    float32 parameters: exactly ``optax.apply_updates``. bfloat16 parameters: stochastic rounding, the
    noise of array i seeded by ``seed`` and i (see :func:`rounding_seed`); ``seed=None`` rounds to
    nearest instead (PyTorch's in-place bfloat16 update; kept for measurements, docs/config.md
    "Precision").
    """
    leaves, treedef = jax.tree.flatten(params)
    flat_updates = treedef.flatten_up_to(updates)
    out = []
    for i, (p, u) in enumerate(zip(leaves, flat_updates)):
        total = p.astype(jnp.float32) + u.astype(jnp.float32)
        if seed is None or p.dtype == jnp.float32:
            out.append(total.astype(p.dtype))
        else:
            out.append(stochastic_round(total, p.dtype, _mix32(seed + jnp.uint32(i) * jnp.uint32(0x9E3779B9))))
    return jax.tree.unflatten(treedef, out)
