"""Rotary position embeddings as transformers computes them (default, linear, llama3 and longrope
scaling; partial rotary dims)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """RoPE inverse frequencies, float32 [head_dim // 2], in transformers' float32 arithmetic."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    factor = np.float32(scaling["factor"])
    if kind == "linear":
        return (inv_freq / factor).astype(np.float32)
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = np.float32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unknown rope_type {kind!r}")


def longrope_inverse_frequencies(rotary_dim: int, theta: float, scaling: dict) -> tuple[np.ndarray, np.ndarray]:
    """(short, long) LongRoPE inverse frequencies, float32 [rotary_dim // 2] each:
    ``1 / (factor_i * theta ** (2i / rotary_dim))`` with the short or long factors (transformers'
    ``_compute_longrope_parameters``)."""
    exponent = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rotary_dim)
    base = (np.float32(theta) ** exponent).astype(np.float32)
    short, long = (np.asarray(scaling[k], np.float32) for k in ("short_factor", "long_factor"))
    return (1.0 / (short * base)).astype(np.float32), (1.0 / (long * base)).astype(np.float32)


def longrope_cos_sin(
    positions: jax.Array, seq_lengths: jax.Array, rotary_dim: int, theta: float, scaling: dict
) -> tuple[jax.Array, jax.Array]:
    """LongRoPE cos and sin, float32 [B, T, rotary_dim], times ``attention_factor``.

    Args:
      positions: int [B, T].
      seq_lengths: int [B, T], the length (last position + 1) of the sequence each token belongs to:
        that sequence uses the long factors when it exceeds ``original_max_position_embeddings``, else
        the short ones, as transformers decides for a forward pass over it alone.
    """
    short, long = longrope_inverse_frequencies(rotary_dim, theta, scaling)
    use_long = (seq_lengths > scaling["original_max_position_embeddings"])[..., None]
    inv_freq = jnp.where(use_long, jnp.asarray(long), jnp.asarray(short))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    factor = jnp.float32(scaling["attention_factor"])
    return jnp.cos(emb) * factor, jnp.sin(emb) * factor


def sequence_lengths(positions: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """int [B, T]: for each token, the last position + 1 of its sequence: its row when
    ``segment_ids`` is None, else its packed sequence (a contiguous run of equal segment ids)."""
    if segment_ids is None:
        return jnp.broadcast_to(jnp.max(positions, axis=1, keepdims=True) + 1, positions.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    runs = jnp.cumsum(starts, axis=1) - 1  # run index 0..T-1, whatever the segment id values
    last = jax.vmap(lambda p, r: jax.ops.segment_max(p, r, num_segments=positions.shape[1]))(positions, runs)
    return jnp.take_along_axis(last, runs, axis=1) + 1


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables, float32 [B, T, head_dim], for int positions [B, T]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, N, D] by cos/sin [B, T, R] (rotate-half layout); math in float32.

    R < D (partial rotary, Phi-4-mini): the first R dims rotate (rotate-half within them), the other
    D - R pass through unchanged, as transformers' Phi3 ``apply_rotary_pos_emb``."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return jnp.concatenate([apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]], axis=-1)
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)
