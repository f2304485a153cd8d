"""Row padding and the custom VJP shared by the Pallas implementations.

The Pallas kernels work on whole row blocks, so hidden/ids are padded to ``cfg.n`` rows (a multiple of
``block_n``) around each kernel call and the outputs and gradients are cut back to N. Padded rows
get a zero cotangent, so they contribute nothing to grad_W.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def pad_rows(x: jax.Array, total: int, value: Any = 0) -> jax.Array:
    """``x`` [N, ...] padded with ``value`` to [total, ...] along the first axis."""
    pad = total - x.shape[0]
    return x if pad == 0 else jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=value)


def row_padded_lse_gather(forward: Callable, backward: Callable, *, id_pad: int = 0) -> Callable:
    """``f(hidden, weight, bias, ids, cfg) -> (lse [T, N], gathered [N, K'])`` with an exact VJP.

    ``forward(hidden, weight, bias, ids, cfg)`` and ``backward(hidden, weight, bias, ids, lse, g_lse,
    g_gathered, cfg) -> (grad_h, grad_W, grad_b)`` see ``cfg.n`` rows; padded ids hold ``id_pad``.
    ``cfg`` is static (hashable).
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def lse_gather(hidden, weight, bias, ids, cfg):
        return fwd(hidden, weight, bias, ids, cfg)[0]

    def fwd(hidden, weight, bias, ids, cfg):
        n = hidden.shape[0]
        lse, gathered = forward(pad_rows(hidden, cfg.n), weight, bias, pad_rows(ids, cfg.n, id_pad), cfg)
        return (lse[:, :n], gathered[:n]), (hidden, weight, bias, ids, lse)

    def bwd(cfg, res, cotangents):
        hidden, weight, bias, ids, lse = res
        n = hidden.shape[0]
        g_lse, g_gathered = (c.astype(_F32) for c in cotangents)
        gh, gw, gb = backward(
            pad_rows(hidden, cfg.n), weight, bias, pad_rows(ids, cfg.n, id_pad), lse,
            jnp.pad(g_lse, [(0, 0), (0, cfg.n - n)]), pad_rows(g_gathered, cfg.n), cfg,
        )  # fmt: skip
        grad_bias = None if bias is None else gb.astype(bias.dtype)
        return gh[:n].astype(hidden.dtype), gw.astype(weight.dtype), grad_bias, None

    lse_gather.defvjp(fwd, bwd)
    return lse_gather
