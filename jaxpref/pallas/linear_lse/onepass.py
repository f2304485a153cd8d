"""One-pass value and gradient of a row-separable loss on ``hidden @ weight`` (XLA; the CPU default).

``linear_logsumexp_gather`` must recompute every logits block in its backward, because the cotangents
of (lse, gathered) only exist after the caller's loss has run: four [N, H] x [H, V]-sized matmuls per
step. When the loss is a *sum of per-row terms* (token cross-entropy, top-k KD: each row's term depends
on that row's lse and gathered logits only; the divisor N is applied by the caller), each row chunk can
finish on its own: logits [rows, V] -> lse, gathered -> the chunk's loss and its cotangents (``jax.grad``
of ``row_loss``) -> dlogits -> grad_hidden rows and the chunk's grad_weight contribution. Three matmuls
and one ``exp`` pass over the logits instead of four and two; the forward already holds the gradients,
and the backward only scales them by the incoming scalar cotangent.

Memory: one row chunk's float32 logits and probabilities ([rows, V] each; ``rows`` is sized from a byte
budget, see ``chunk_rows``), plus grad_hidden [N, H] and grad_weight [H, V] kept from the forward to
the backward (the sizes of hidden and of the weight). [N, V] never exists.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import CustomVJPPrimal

from .softcap import soft_cap, soft_cap_grad
from .xla import linear_logsumexp_gather_xla

_F32 = jnp.float32

# A row-separable loss: (lse [T, n], gathered [n, K'], row_inputs with leading dim n) -> float32 scalar,
# the *sum* of independent per-row terms.
RowLoss = Callable[[jax.Array, jax.Array, Any], jax.Array]


def chunk_rows(n: int, v: int, block_n: int, budget_bytes: int = 64 * 2**20) -> int:
    """Rows per chunk: at most ``block_n``, and [rows, V] float32 logits + probabilities within the budget."""
    by_budget = max(8, budget_bytes // (2 * 4 * v) // 8 * 8)
    return max(1, min(n, block_n, by_budget))


def linear_logsumexp_gather_loss_onepass(
    hidden: jax.Array,
    weight: jax.Array,
    ids: jax.Array,
    row_loss: RowLoss,
    row_inputs: Any,
    *,
    bias: jax.Array | None = None,
    temperatures: tuple[float, ...] = (1.0,),
    softcap: float | None = None,
    block_n: int,
    forward_blocks: tuple[int, int],
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """See ``jaxpref.pallas.linear_logsumexp_gather_loss``. hidden [N, H], weight [H, V], ids int [N, K'].

    ``block_n``: rows per chunk (capped by ``chunk_rows``); ``forward_blocks``: (block_n, block_v) of
    the forward-only path (not differentiated: evaluation), which is ``xla_chunked``."""
    temps = tuple(float(t) for t in temperatures)
    cap = None if softcap is None else float(softcap)
    rows = chunk_rows(hidden.shape[0], weight.shape[1], int(block_n))
    value, lse, gathered = _onepass(
        hidden, weight, bias, ids.astype(jnp.int32), row_inputs, row_loss, temps, cap, rows, tuple(forward_blocks)
    )
    return value, lax.stop_gradient(lse), lax.stop_gradient(gathered)


def _chunk(
    h, weight, bias, ids, inputs, row_loss: RowLoss, temps: tuple[float, ...], cap: float | None, head_grads=True
):
    """One row chunk: (value, lse [T, n], gathered [n, K'], grad_h [n, H] f32, grad_w [H, V] f32, grad_b);
    grad_w and grad_b are None without ``head_grads``."""
    z = jnp.dot(h, weight, preferred_element_type=_F32)
    if bias is not None:
        z = z + bias.astype(_F32)[None, :]
    z = soft_cap(z, cap)
    z_max = jnp.max(z, axis=1)  # max(z / t) == max(z) / t exactly: rounding is monotonic
    probs, sums, lses = [], [], []
    for t in temps:
        m = z_max if t == 1.0 else z_max / t
        p = jnp.exp((z if t == 1.0 else z / t) - m[:, None])  # unnormalised softmax(z / t), in (0, 1]
        s = jnp.sum(p, axis=1)
        probs.append(p)
        sums.append(s)
        lses.append(m + jnp.log(s))
    lse = jnp.stack(lses)
    gathered = jnp.take_along_axis(z, ids, axis=1)
    value, (g_lse, g_gathered) = jax.value_and_grad(row_loss, argnums=(0, 1))(lse, gathered, inputs)
    # d lse_t / d z = softmax(z / t) / t; d gathered / d z is a scatter (duplicate ids accumulate).
    dz = None
    for i, t in enumerate(temps):
        term = probs[i] * (g_lse[i] / (t * sums[i]))[:, None]
        dz = term if dz is None else dz + term
    rows = jnp.arange(h.shape[0], dtype=jnp.int32)[:, None]
    dz = dz.at[rows, ids].add(g_gathered.astype(_F32), mode="promise_in_bounds")
    if cap is not None:  # chain rule through the cap
        dz = dz * soft_cap_grad(z, cap)
    grad_h = lax.dot_general(dz, weight, (((1,), (1,)), ((), ())), preferred_element_type=_F32)
    if not head_grads:
        return value.astype(_F32), lse, gathered, grad_h, None, None
    grad_w = lax.dot_general(h, dz, (((0,), (0,)), ((), ())), preferred_element_type=_F32)
    grad_b = None if bias is None else jnp.sum(dz, axis=0)
    return value.astype(_F32), lse, gathered, grad_h, grad_w, grad_b


def _value_and_grads(hidden, weight, bias, ids, inputs, row_loss, temps, cap, rows, head_grads=True):
    """Full chunks under a scan (the first one outside it seeds the gradient sums), then a static tail.
    Without ``head_grads`` no [H, V] gradient is formed (a frozen LM head: LoRA, a teacher)."""
    n = hidden.shape[0]
    num_full, tail = divmod(n, rows)
    run = functools.partial(
        _chunk, weight=weight, bias=bias, row_loss=row_loss, temps=temps, cap=cap, head_grads=head_grads
    )
    add = lambda a, b: None if a is None else a + b  # noqa: E731

    first = run(hidden[:rows], ids=ids[:rows], inputs=jax.tree.map(lambda x: x[:rows], inputs))
    value, lse_parts, gathered_parts, gh_parts, gw, gb = first
    lse_parts, gathered_parts, gh_parts = [lse_parts], [gathered_parts], [gh_parts]
    if num_full > 1:
        stop = num_full * rows

        def stack(x):
            return x[rows:stop].reshape(num_full - 1, rows, *x.shape[1:])

        def step(carry, xs):
            total, gw, gb = carry
            h, i, inp = xs
            v, lse_c, gathered_c, gh_c, gw_c, gb_c = run(h, ids=i, inputs=inp)
            return (total + v, add(gw, gw_c), add(gb, gb_c)), (lse_c, gathered_c, gh_c)

        xs = (stack(hidden), stack(ids), jax.tree.map(stack, inputs))
        (value, gw, gb), (lse_s, gathered_s, gh_s) = lax.scan(step, (value, gw, gb), xs)
        lse_parts.append(jnp.moveaxis(lse_s, 0, 1).reshape(len(temps), -1))
        gathered_parts.append(gathered_s.reshape(-1, gathered_s.shape[-1]))
        gh_parts.append(gh_s.reshape(-1, gh_s.shape[-1]))
    if tail:  # rows <= n (chunk_rows), so there is always a first full chunk
        start = num_full * rows
        v, lse_c, gathered_c, gh_c, gw_c, gb_c = run(
            hidden[start:], ids=ids[start:], inputs=jax.tree.map(lambda x: x[start:], inputs)
        )
        value, gw, gb = value + v, add(gw, gw_c), add(gb, gb_c)
        lse_parts.append(lse_c)
        gathered_parts.append(gathered_c)
        gh_parts.append(gh_c)
    cat = lambda parts, axis=0: parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)  # noqa: E731
    return value, cat(lse_parts, 1), cat(gathered_parts), (cat(gh_parts), gw, gb)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _onepass(hidden, weight, bias, ids, inputs, row_loss, temps, cap, rows, forward_blocks):
    # Not differentiated (eval): the plain forward, no gradient work.
    block_n, block_v = forward_blocks
    lse, gathered = linear_logsumexp_gather_xla(
        hidden, weight, ids, bias=bias, temperatures=temps, softcap=cap, block_n=block_n, block_v=block_v
    )
    return row_loss(lse, gathered, inputs).astype(_F32), lse, gathered


def _onepass_fwd(hidden, weight, bias, ids, inputs, row_loss, temps, cap, rows, forward_blocks):
    # symbolic_zeros: each differentiable input comes as CustomVJPPrimal(value, perturbed), so a frozen
    # LM head (LoRA, tied embeddings not trained) costs neither the dW GEMM nor an [H, V] float32 sum.
    head_grads = weight.perturbed or (bias is not None and bias.perturbed)
    hidden, weight, bias, ids, inputs = jax.tree.map(
        lambda p: p.value, (hidden, weight, bias, ids, inputs), is_leaf=lambda x: isinstance(x, CustomVJPPrimal)
    )
    value, lse, gathered, grads = _value_and_grads(
        hidden, weight, bias, ids, inputs, row_loss, temps, cap, rows, head_grads=head_grads
    )
    dtypes = (jnp.zeros((0,), hidden.dtype), jnp.zeros((0,), weight.dtype))  # residuals must be arrays
    return (value, lse, gathered), (grads, dtypes)


def _onepass_bwd(row_loss, temps, cap, rows, forward_blocks, res, cotangents):
    (gh, gw, gb), (h_like, w_like) = res
    g = cotangents[0]  # lse and gathered leave the op through stop_gradient
    g = jnp.zeros((), _F32) if isinstance(g, jax.custom_derivatives.SymbolicZero) else g.astype(_F32)
    grad_weight = None if gw is None else (g * gw).astype(w_like.dtype)
    grad_bias = None if gb is None else (g * gb).astype(w_like.dtype)
    return (g * gh).astype(h_like.dtype), grad_weight, grad_bias, None, None


_onepass.defvjp(_onepass_fwd, _onepass_bwd, symbolic_zeros=True)
