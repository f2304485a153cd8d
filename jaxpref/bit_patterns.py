"""Frozen 16-bit weights held as uint16 bit patterns on CPU, so that XLA:CPU never widens them whole.

XLA:CPU has no bfloat16 (or float16) arithmetic: it rewrites every 16-bit float value that a loop
carries to float32 and hoists the conversion out of the loop. A frozen bfloat16 base model that enters
the layer scan (or the fused loss's vocabulary loop) would become a float32 copy of itself inside the
step; converting it to uint16 inside the step (``jax.lax.bitcast_convert_type``) avoids the float32 copy
but XLA:CPU materialises the bitcast: a uint16 copy (1.4 GiB at Qwen3-0.6B, 2.8 GiB at Llama-3.2-1B).

So the Trainer keeps such weights as uint16 arrays *outside* the step (``to_bits``, a zero-copy view of
the same host memory), the step takes them as uint16 arguments and reinterprets them (``from_bits``);
the model's own bitcasts back to uint16 (``models.decoder``, ``models.layers.Embed``, the XLA fused
loss) then cancel out and the layer scan and the embedding gather read the argument's buffer in place
(a tied LM head is still copied once into the [H, V] layout the chunked loss reads). Qwen3-0.6B LoRA
KD step: XLA temporaries 1.70 -> 0.90 GiB; Llama-3.2-1B LoRA DPO: 3.13 -> 1.28 GiB. GPUs and TPUs
compute in bfloat16 natively and keep their weights as they are.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BITS = jnp.dtype(jnp.uint16)


def is_16bit_float(dtype: Any) -> bool:
    """bfloat16 or float16 (not typed PRNG keys, which LoRA dropout keeps in the frozen state)."""
    return jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize == 2


def _view(x: jax.Array, dtype: Any) -> jax.Array:
    """``x``'s bytes as ``dtype`` (same item size) without a copy: each CPU shard's buffer is viewed
    through numpy and handed back to its device, which on CPU aliases the memory (the view keeps the
    original buffer alive)."""
    if x.dtype == dtype:
        return x
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    shards = [jax.device_put(np.asarray(s.data).view(dtype), s.device) for s in x.addressable_shards]
    return jax.make_array_from_single_device_arrays(x.shape, x.sharding, shards)


def storage_dtypes(state: Any) -> Any:
    """The dtype of every leaf of ``state`` (the tree ``from_bits`` restores to)."""
    return jax.tree.map(lambda x: x.dtype, state)


def to_bits(state: Any) -> Any:
    """``state`` with every 16-bit float leaf as a uint16 view of the same memory (CPU arrays) or shape."""
    return jax.tree.map(lambda x: _view(x, BITS) if is_16bit_float(x.dtype) else x, state)


def view_as(state: Any, dtypes: Any) -> Any:
    """Host side: ``to_bits`` undone, again without copying (for exporting the model)."""
    return jax.tree.map(_view, state, dtypes)


def from_bits(state: Any, dtypes: Any) -> Any:
    """Inside a traced step: each leaf reinterpreted as its ``dtypes`` entry (a no-op where equal)."""

    def back(x: jax.Array, dtype: Any) -> jax.Array:
        return x if x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)

    return jax.tree.map(back, state, dtypes)
