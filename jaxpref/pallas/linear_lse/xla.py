"""Chunked XLA implementation (the default on CPU): rows in chunks, vocabulary in blocks, exact VJP.

Forward, per row chunk: a loop over vocabulary blocks computes one [rows, block_v] logits block with a
single matmul, folds it into an online (running max, rescaled sum) log-sum-exp per temperature and picks
the logits at ``ids`` that fall inside the block. Backward recomputes each block, forms
``dlogits = sum_t g_lse[t] / T_t * softmax_t + scatter(g_gathered)`` and immediately contracts it into
grad_hidden (accumulated) and the block's grad_weight columns (written in place). Neither pass holds more
than a few [rows, block_v] float32 buffers; [N, V] never exists.

The weight is never padded or reshaped (both would copy [H, V] per call): full blocks are read with
``dynamic_slice`` inside a ``fori_loop`` and a ragged last block is handled by a static tail step.
16-bit weights travel as uint16 bit patterns (see ``_to_bits``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from .padding import pad_rows
from .softcap import soft_cap, soft_cap_grad

_F32 = jnp.float32


def linear_logsumexp_gather_xla(
    hidden: jax.Array,
    weight: jax.Array,
    ids: jax.Array,
    *,
    bias: jax.Array | None = None,
    temperatures: tuple[float, ...] = (1.0,),
    softcap: float | None = None,
    block_n: int,
    block_v: int,
) -> tuple[jax.Array, jax.Array]:
    """See ``jaxpref.pallas.linear_logsumexp_gather``. hidden [N, H], weight [H, V], ids int [N, K']."""
    temps = tuple(float(t) for t in temperatures)
    cap = None if softcap is None else float(softcap)
    return _lse_gather(hidden, weight, bias, ids.astype(jnp.int32), temps, cap, int(block_n), int(block_v))


def vocabulary_mean(weight: jax.Array, *, block_v: int = 8192) -> jax.Array:
    """float32 [H]: the mean of the LM-head weight [H, V] over the vocabulary, block by block (a 16-bit
    weight is never converted whole: see ``_to_bits``). The mean logit of a row is ``h . mean``."""
    w_bits = _to_bits(weight)

    def body(total, v0, width):
        return total + jnp.sum(_weight_block(w_bits, weight.dtype, v0, width).astype(_F32), axis=1)

    return _vocab_loop(weight.shape[1], block_v, body, jnp.zeros(weight.shape[0], _F32)) / weight.shape[1]


def linear_softmax_entropy_xla(
    hidden: jax.Array,
    weight: jax.Array,
    *,
    bias: jax.Array | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    block_n: int,
    block_v: int,
) -> jax.Array:
    """Entropy (nats) of ``softmax((hidden @ weight (+ bias)) / temperature)`` per row: float32 [N];
    the logits soft-capped first when ``softcap`` is set (``softcap.py``).

    Forward only (no VJP: a metric), the same blocking as the forward of ``linear_logsumexp_gather_xla``:
    rows in chunks of ``block_n``, a loop over vocabulary blocks of ``block_v`` with one matmul each,
    folding every [rows, block_v] block of ``z = logits / temperature`` into an online

        m = max_v z_v,   s = sum_v exp(z_v - m),   u = sum_v exp(z_v - m) (z_v - m)

    (on a new block maximum m': ``s <- s e^(m - m')``, ``u <- e^(m - m') (u + (m - m') s)``), so that
    ``H = lse(z) - E_p[z] = log s - u / s``. [N, V] never exists.
    """
    t = float(temperature)
    cap = None if softcap is None else float(softcap)
    hidden, weight = jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(weight)
    bias = None if bias is None else jax.lax.stop_gradient(bias)
    n = hidden.shape[0]
    rows, num = _chunking(n, int(block_n))
    if num == 1:
        return _entropy_chunk(hidden, weight, bias, t, cap, int(block_v))
    h = pad_rows(hidden, rows * num).reshape(num, rows, -1)
    out = lax.map(lambda x: _entropy_chunk(x, weight, bias, t, cap, int(block_v)), h)
    return out.reshape(rows * num)[:n]


def linear_mean_logit_xla(
    hidden: jax.Array,
    weight: jax.Array,
    *,
    softcap: float | None = None,
    block_n: int,
    block_v: int,
) -> jax.Array:
    """Mean over the vocabulary of the (soft-capped) logits ``hidden @ weight`` per row: float32 [N].

    Forward only, under ``stop_gradient`` (a metric: TRL's ``logits/chosen``), blocked like
    :func:`linear_softmax_entropy_xla`. Without a cap the mean is ``hidden . vocabulary_mean(weight)``
    (cheaper); with one it is not linear in ``hidden``, hence this pass.
    """
    cap = None if softcap is None else float(softcap)
    hidden, weight = jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(weight)
    w_bits = _to_bits(weight)

    def chunk(h):
        def body(total, v0, width):
            z = _block_logits(h, _weight_block(w_bits, weight.dtype, v0, width), None, v0, width, cap)
            return total + jnp.sum(z, axis=1)

        return _vocab_loop(weight.shape[1], int(block_v), body, jnp.zeros((h.shape[0],), _F32))

    n = hidden.shape[0]
    rows, num = _chunking(n, int(block_n))
    if num == 1:
        return chunk(hidden) / weight.shape[1]
    out = lax.map(chunk, pad_rows(hidden, rows * num).reshape(num, rows, -1))
    return out.reshape(rows * num)[:n] / weight.shape[1]


def _entropy_chunk(
    h: jax.Array, weight: jax.Array, bias: jax.Array | None, t: float, cap: float | None, bv: int
) -> jax.Array:
    """One row chunk of :func:`linear_softmax_entropy_xla`: [n] float32."""
    n = h.shape[0]
    w_bits = _to_bits(weight)

    def body(carry, v0, width):
        m, s, u = carry
        z = _block_logits(h, _weight_block(w_bits, weight.dtype, v0, width), bias, v0, width, cap)
        z = z if t == 1.0 else z / t
        new_m = jnp.maximum(m, jnp.max(z, axis=1))
        e = jnp.exp(z - new_m[:, None])
        shift = m - new_m  # <= 0; -inf before the first block, where s = u = 0
        scale = jnp.exp(shift)
        carried_u = jnp.where(s > 0, scale * (u + shift * s), 0.0)
        return new_m, s * scale + jnp.sum(e, axis=1), carried_u + jnp.sum(e * (z - new_m[:, None]), axis=1)

    init = (jnp.full((n,), -jnp.inf, _F32), jnp.zeros((n,), _F32), jnp.zeros((n,), _F32))
    _, s, u = _vocab_loop(weight.shape[1], bv, body, init)
    return jnp.log(s) - u / s


# ---------------------------------------------------------------------------------------------------------
# Blocked loops over the vocabulary.


def _vocab_loop(v: int, block_v: int, body: Callable, carry):
    """Run ``body(carry, v0, width)`` over [0, v) in blocks: a fori_loop over full blocks, then a tail."""
    num_full, tail = divmod(v, block_v)
    if num_full == 1:
        carry = body(carry, 0, block_v)
    elif num_full > 1:
        carry = lax.fori_loop(0, num_full, lambda j, c: body(c, j * block_v, block_v), carry)
    if tail:
        carry = body(carry, num_full * block_v, tail)
    return carry


def _to_bits(x: jax.Array) -> jax.Array:
    """16-bit floats as uint16 (a bitcast), other dtypes unchanged.

    XLA's CPU compiler upcasts bfloat16 slices and updates to float32 and then hoists the convert of the
    whole weight out of the loop (a float32 copy of W, and a full-buffer convert per grad_W update).
    Moving 16-bit weights as integers keeps every slice/update a plain copy of one block; at worst XLA
    materialises the uint16 view once (half the size of the float32 copy).
    """
    return lax.bitcast_convert_type(x, jnp.uint16) if x.dtype.itemsize == 2 else x


def _from_bits(x: jax.Array, dtype) -> jax.Array:
    return lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x


def _weight_block(weight_bits: jax.Array, dtype, v0, width: int) -> jax.Array:
    """Columns [v0, v0 + width) of the weight (given as ``_to_bits(weight)``), in ``dtype``."""
    w_blk = lax.dynamic_slice_in_dim(weight_bits, v0, width, axis=1)
    return _from_bits(lax.optimization_barrier(w_blk), dtype)


def _block_logits(
    h: jax.Array, w_blk: jax.Array, bias: jax.Array | None, v0, width: int, cap: float | None
) -> jax.Array:
    """float32 (soft-capped) logits [n, width] for the weight block of vocabulary columns [v0, v0 + width)."""
    z = jnp.dot(h, w_blk, preferred_element_type=_F32)
    if bias is not None:
        z = z + lax.dynamic_slice_in_dim(bias, v0, width).astype(_F32)[None, :]
    return soft_cap(z, cap)


def _local_ids(ids: jax.Array, v0, width: int) -> tuple[jax.Array, jax.Array]:
    """Column of each id inside the block (clipped) and whether the id is in the block."""
    local = ids - v0
    inside = (local >= 0) & (local < width)
    return jnp.clip(local, 0, width - 1), inside


def _fwd_chunk(
    h: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None,
    ids: jax.Array,
    temps: tuple[float, ...],
    cap: float | None,
    bv: int,
) -> tuple[jax.Array, jax.Array]:
    """One row chunk: (lse [T, n], gathered [n, K'])."""
    n = h.shape[0]
    w_bits = _to_bits(weight)

    def body(carry, v0, width):
        m, s, gathered = carry
        z = _block_logits(h, _weight_block(w_bits, weight.dtype, v0, width), bias, v0, width, cap)
        z_max = jnp.max(z, axis=1)  # max(z / t) == max(z) / t exactly: rounding is monotonic
        new_m, new_s = [], []
        for i, t in enumerate(temps):
            zt = z if t == 1.0 else z / t
            mi = jnp.maximum(m[i], z_max if t == 1.0 else z_max / t)
            new_s.append(s[i] * jnp.exp(m[i] - mi) + jnp.sum(jnp.exp(zt - mi[:, None]), axis=1))
            new_m.append(mi)
        col, inside = _local_ids(ids, v0, width)
        gathered = jnp.where(inside, jnp.take_along_axis(z, col, axis=1), gathered)
        return jnp.stack(new_m), jnp.stack(new_s), gathered

    init = (
        jnp.full((len(temps), n), -jnp.inf, _F32),
        jnp.zeros((len(temps), n), _F32),
        jnp.zeros(ids.shape, _F32),
    )
    m, s, gathered = _vocab_loop(weight.shape[1], bv, body, init)
    return m + jnp.log(s), gathered


def _bwd_chunk(
    h: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None,
    ids: jax.Array,
    lse: jax.Array,
    g_lse: jax.Array,
    g_gathered: jax.Array,
    gw: jax.Array,
    gb: jax.Array | None,
    temps: tuple[float, ...],
    cap: float | None,
    bv: int,
    accumulate: bool,
):
    """One row chunk of the VJP: returns (grad_h [n, H] f32, gw [H, V], gb [V] or None).

    ``gw``/``gb`` receive this chunk's contribution per vocabulary block: added when ``accumulate``
    (several row chunks, float32 buffers), otherwise written directly (one chunk, final dtype; a 16-bit
    ``gw`` is passed and returned as ``_to_bits``).
    """
    n = h.shape[0]
    w_bits = _to_bits(weight)
    coef = [g_lse[i] / t for i, t in enumerate(temps)]  # d lse_t / d z = softmax(z / t) / t
    rows = jnp.arange(n, dtype=jnp.int32)[:, None]

    def body(carry, v0, width):
        gh, gw, gb = carry
        w_blk = _weight_block(w_bits, weight.dtype, v0, width)
        z = _block_logits(h, w_blk, bias, v0, width, cap)
        dz = None
        for i, t in enumerate(temps):
            zt = z if t == 1.0 else z / t
            term = coef[i][:, None] * jnp.exp(zt - lse[i][:, None])
            dz = term if dz is None else dz + term
        col, inside = _local_ids(ids, v0, width)
        # Scatter-add: duplicate ids in a row accumulate, as the gradient of a gather must.
        dz = dz.at[rows, col].add(jnp.where(inside, g_gathered, 0.0), mode="promise_in_bounds")
        if cap is not None:  # chain rule through the cap: d/d z_raw = d/d z * (1 - tanh^2)
            dz = dz * soft_cap_grad(z, cap)
        gh = gh + lax.dot_general(dz, w_blk, (((1,), (1,)), ((), ())), preferred_element_type=_F32)
        gw_blk = lax.dot_general(h, dz, (((0,), (0,)), ((), ())), preferred_element_type=_F32)
        if accumulate:  # float32 accumulator over row chunks
            gw_blk = gw_blk + lax.dynamic_slice_in_dim(gw, v0, width, axis=1)
        else:
            gw_blk = _to_bits(gw_blk.astype(weight.dtype))
        gw = lax.dynamic_update_slice_in_dim(gw, gw_blk, v0, axis=1)
        if gb is not None:
            gb_blk = jnp.sum(dz, axis=0)
            if accumulate:
                gb_blk = gb_blk + lax.dynamic_slice_in_dim(gb, v0, width)
            gb = lax.dynamic_update_slice_in_dim(gb, gb_blk.astype(gb.dtype), v0, axis=0)
        return gh, gw, gb

    init = (jnp.zeros(h.shape, _F32), gw, gb)
    return _vocab_loop(weight.shape[1], bv, body, init)


# ---------------------------------------------------------------------------------------------------------
# Row chunking and the custom VJP.


def _chunking(n: int, block_n: int) -> tuple[int, int]:
    """(chunk rows, number of chunks): balanced chunks, rows rounded up to a multiple of 8."""
    num = max(1, -(-n // block_n))
    if num == 1:
        return n, 1
    rows = -(-n // num)
    rows = -(-rows // 8) * 8
    return rows, -(-n // rows)


def _forward(hidden, weight, bias, ids, temps, cap, block_n, block_v):
    n = hidden.shape[0]
    rows, num = _chunking(n, block_n)
    if num == 1:
        return _fwd_chunk(hidden, weight, bias, ids, temps, cap, block_v)
    h = pad_rows(hidden, rows * num).reshape(num, rows, -1)
    i = pad_rows(ids, rows * num).reshape(num, rows, -1)
    lse, gathered = lax.map(lambda xs: _fwd_chunk(xs[0], weight, bias, xs[1], temps, cap, block_v), (h, i))
    lse = jnp.moveaxis(lse, 0, 1).reshape(len(temps), rows * num)[:, :n]
    return lse, gathered.reshape(rows * num, -1)[:n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _lse_gather(hidden, weight, bias, ids, temps, cap, block_n, block_v):
    return _forward(hidden, weight, bias, ids, temps, cap, block_n, block_v)


def _lse_gather_fwd(hidden, weight, bias, ids, temps, cap, block_n, block_v):
    lse, gathered = _forward(hidden, weight, bias, ids, temps, cap, block_n, block_v)
    return (lse, gathered), (hidden, weight, bias, ids, lse)


def _lse_gather_bwd(temps, cap, block_n, block_v, res, cotangents):
    hidden, weight, bias, ids, lse = res
    g_lse, g_gathered = (c.astype(_F32) for c in cotangents)
    n, v = hidden.shape[0], weight.shape[1]
    rows, num = _chunking(n, block_n)
    if num == 1:
        gh, gw, gb = _bwd_chunk(
            hidden, weight, bias, ids, lse, g_lse, g_gathered,
            _to_bits(jnp.zeros(weight.shape, weight.dtype)),
            None if bias is None else jnp.zeros((v,), _F32),
            temps, cap, block_v, accumulate=False,
        )  # fmt: skip
        gw = _from_bits(gw, weight.dtype)
    else:
        total = rows * num
        xs = (
            pad_rows(hidden, total).reshape(num, rows, -1),
            pad_rows(ids, total).reshape(num, rows, -1),
            pad_rows(lse.T, total).reshape(num, rows, -1),
            pad_rows(g_lse.T, total).reshape(num, rows, -1),  # zero cotangent on padded rows
            pad_rows(g_gathered, total).reshape(num, rows, -1),
        )

        def step(carry, x):
            h, i, lse_c, gl, gg = x
            gw, gb = carry
            gh, gw, gb = _bwd_chunk(h, weight, bias, i, lse_c.T, gl.T, gg, gw, gb, temps, cap, block_v, True)
            return (gw, gb), gh

        init = (jnp.zeros(weight.shape, _F32), None if bias is None else jnp.zeros((v,), _F32))
        (gw, gb), gh = lax.scan(step, init, xs)
        gh = gh.reshape(total, -1)[:n]
    grad_bias = None if bias is None else gb.astype(bias.dtype)
    return gh.astype(hidden.dtype), gw.astype(weight.dtype), grad_bias, None


_lse_gather.defvjp(_lse_gather_fwd, _lse_gather_bwd)
