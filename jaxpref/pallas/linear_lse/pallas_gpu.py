"""Pallas kernels for GPU (Triton lowering); run with ``interpret=True`` on CPU for tests.

Three kernels, all recomputing [block_n, block_v] logits tiles from hidden and weight (the hidden
dimension is consumed ``block_h`` at a time), never writing [N, V]:

* forward, grid (row blocks, vocabulary splits): each program walks its share of vocabulary blocks with an
  online max/sum per temperature and writes the logits at ``ids`` that fall in its tiles; the per-split
  (max, sum) partials are merged in XLA (split-K style, so short batches still fill the GPU).
* grad_hidden, grid (row blocks,): each program owns its rows of a float32 grad_hidden and walks every
  vocabulary block, adding ``dlogits @ W_tile.T``.
* grad_weight (and grad_bias), grid (vocabulary blocks,): each program owns its weight columns and walks
  every row block, adding ``h_tile.T @ dlogits``.

Every output element is written by exactly one program, so there are no atomics and results are
deterministic. Costs 5 tile-matmul passes over [N, H, V] (forward 1, each backward kernel 2) against 3 for
unfused autodiff; memory is O(N * H + H * V).

Ids are assumed in [0, V): an out-of-range id is never matched, so its gathered logit is left unwritten.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .padding import row_padded_lse_gather
from .softcap import soft_cap, soft_cap_grad

_F32 = jnp.float32
_TARGET_PROGRAMS = 1024  # forward grid size to aim for (a few waves on a 100+ SM GPU)


class PallasUnsupportedError(ValueError):
    """A Pallas kernel (GPU or TPU) cannot handle this shape / dtype / block configuration."""


@dataclass(frozen=True)
class _Config:
    temps: tuple[float, ...]
    n: int  # rows after padding to a multiple of block_n
    h: int
    v: int
    k: int
    block_n: int
    block_v: int
    block_h: int
    num_splits: int
    has_bias: bool
    interpret: bool
    softcap: float | None = None
    num_warps: int = 4
    num_stages: int = 2

    @property
    def row_blocks(self) -> int:
        return self.n // self.block_n

    @property
    def vocab_blocks(self) -> int:
        return -(-self.v // self.block_v)

    @property
    def blocks_per_split(self) -> int:
        return -(-self.vocab_blocks // self.num_splits)


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def check_supported(hidden, weight, ids, *, block_n: int, block_v: int, block_h: int) -> int:
    """Raise ``PallasUnsupportedError`` if the kernels cannot run; return the block_h to use.

    Triton tiles must be powers of two and at least 16 wide for ``tl.dot``; the hidden dimension must be
    a multiple of the (possibly reduced) ``block_h`` because hidden/weight loads are not masked along H.
    """
    for name, size in (("block_n", block_n), ("block_v", block_v), ("block_h", block_h)):
        if not _is_pow2(size) or size < 16:
            raise PallasUnsupportedError(f"{name}={size} must be a power of two >= 16 for the Triton kernels")
    for x in (hidden, weight):
        if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
            raise PallasUnsupportedError(f"unsupported dtype {x.dtype} (float32, bfloat16, float16 only)")
    h = hidden.shape[1]
    bh = min(block_h, h & -h)  # h & -h: the largest power of two dividing H
    if bh < 16:
        raise PallasUnsupportedError(f"hidden size {h} must be a multiple of 16 for the Triton kernels")
    if ids.shape[1] < 1:
        raise PallasUnsupportedError("ids must have at least one column")
    return bh


# ---------------------------------------------------------------------------------------------------------
# Tile helpers shared by the kernels.


def _logits_tile(h_ref, w_ref, b_ref, r0, v0, cfg: _Config):
    """float32 (soft-capped) logits for rows [r0, r0+bn) x columns [v0, v0+bv); -inf beyond the vocabulary."""
    bn, bv, bh = cfg.block_n, cfg.block_v, cfg.block_h
    cols = v0 + jnp.arange(bv, dtype=jnp.int32)
    in_vocab = cols < cfg.v
    dtype = jnp.promote_types(h_ref.dtype, w_ref.dtype)

    def h_step(kb, acc):
        hk = h_ref[pl.ds(r0, bn), pl.ds(kb * bh, bh)].astype(dtype)
        wk = plgpu.load(w_ref.at[pl.ds(kb * bh, bh), pl.ds(v0, bv)], mask=in_vocab[None, :], other=0)
        return acc + plgpu.dot(hk, wk.astype(dtype))

    z = lax.fori_loop(0, cfg.h // bh, h_step, jnp.zeros((bn, bv), _F32))
    if b_ref is not None:
        z = z + plgpu.load(b_ref.at[pl.ds(v0, bv)], mask=in_vocab, other=0).astype(_F32)[None, :]
    return jnp.where(in_vocab[None, :], soft_cap(z, cfg.softcap), -jnp.inf), cols, in_vocab


def _dlogits_tile(z, cols, r0, ids_ref, lse_ref, glse_ref, gg_ref, cfg: _Config):
    """d loss / d raw logits on one tile: sum_t g_lse_t / T_t * softmax_t + one-hot(ids) * g_gathered,
    times ``1 - (z / cap)^2`` with a soft cap (0 on the -inf columns beyond the vocabulary)."""
    rows = pl.ds(r0, cfg.block_n)
    dz = jnp.zeros(z.shape, _F32)
    for t, temp in enumerate(cfg.temps):
        zt = z if temp == 1.0 else z / temp
        coef = glse_ref[t, rows] / temp
        dz = dz + coef[:, None] * jnp.exp(zt - lse_ref[t, rows][:, None])

    def k_step(k, dz):  # duplicates in a row add up, like the transpose of a gather
        idk = ids_ref[rows, k]
        return dz + jnp.where(cols[None, :] == idk[:, None], gg_ref[rows, k][:, None], 0.0)

    dz = lax.fori_loop(0, cfg.k, k_step, dz)
    return dz if cfg.softcap is None else dz * soft_cap_grad(z, cfg.softcap)


# ---------------------------------------------------------------------------------------------------------
# Kernels.


def _split_refs(refs, has_bias: bool, n_in: int):
    refs = list(refs)
    if not has_bias:
        refs.insert(2, None)
    return refs[: n_in + 1], refs[n_in + 1 :]


def _fwd_kernel(*refs, cfg: _Config):
    (h_ref, w_ref, b_ref, ids_ref), (m_ref, s_ref, g_ref) = _split_refs(refs, cfg.has_bias, 3)
    bn, bv = cfg.block_n, cfg.block_v
    i, split = pl.program_id(0), pl.program_id(1)
    r0 = i * bn
    rows = pl.ds(r0, bn)
    j_lo = split * cfg.blocks_per_split
    j_hi = jnp.minimum(j_lo + cfg.blocks_per_split, cfg.vocab_blocks)

    def v_step(j, carry):
        v0 = j * bv
        z, cols, _ = _logits_tile(h_ref, w_ref, b_ref, r0, v0, cfg)
        z_max = jnp.max(z, axis=1)  # max(z / t) == max(z) / t exactly: rounding is monotonic
        new = []
        for t, temp in enumerate(cfg.temps):
            m, s = carry[t]
            zt = z if temp == 1.0 else z / temp
            m_new = jnp.maximum(m, z_max if temp == 1.0 else z_max / temp)
            new.append((m_new, s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(zt - m_new[:, None]), axis=1)))

        def k_step(k, _):
            idk = ids_ref[rows, k]
            hit = (idk >= v0) & (idk < v0 + bv)
            val = jnp.sum(jnp.where(cols[None, :] == idk[:, None], z, 0.0), axis=1)
            plgpu.store(g_ref.at[rows, k], val, mask=hit)
            return None

        lax.fori_loop(0, cfg.k, k_step, None)
        return tuple(new)

    init = tuple((jnp.full((bn,), -jnp.inf, _F32), jnp.zeros((bn,), _F32)) for _ in cfg.temps)
    out = lax.fori_loop(j_lo, j_hi, v_step, init)
    for t in range(len(cfg.temps)):
        m_ref[t, split, rows] = out[t][0]
        s_ref[t, split, rows] = out[t][1]


def _dh_kernel(*refs, cfg: _Config):
    (h_ref, w_ref, b_ref, ids_ref, lse_ref, glse_ref, gg_ref), (gh_ref,) = _split_refs(refs, cfg.has_bias, 6)
    bn, bv, bh = cfg.block_n, cfg.block_v, cfg.block_h
    r0 = pl.program_id(0) * bn
    rows = pl.ds(r0, bn)

    def zero_step(kb, _):
        gh_ref[rows, pl.ds(kb * bh, bh)] = jnp.zeros((bn, bh), _F32)
        return None

    lax.fori_loop(0, cfg.h // bh, zero_step, None)

    def v_step(j, _):
        v0 = j * bv
        z, cols, in_vocab = _logits_tile(h_ref, w_ref, b_ref, r0, v0, cfg)
        dz = _dlogits_tile(z, cols, r0, ids_ref, lse_ref, glse_ref, gg_ref, cfg).astype(w_ref.dtype)

        def h_step(kb, _):
            hs = pl.ds(kb * bh, bh)
            wk = plgpu.load(w_ref.at[hs, pl.ds(v0, bv)], mask=in_vocab[None, :], other=0)
            gh_ref[rows, hs] = gh_ref[rows, hs] + plgpu.dot(dz, wk, trans_b=True)
            return None

        lax.fori_loop(0, cfg.h // bh, h_step, None)
        return None

    lax.fori_loop(0, cfg.vocab_blocks, v_step, None)


def _dw_kernel(*refs, cfg: _Config):
    (h_ref, w_ref, b_ref, ids_ref, lse_ref, glse_ref, gg_ref), outs = _split_refs(refs, cfg.has_bias, 6)
    gw_ref, gb_ref = outs if cfg.has_bias else (outs[0], None)
    bn, bv, bh = cfg.block_n, cfg.block_v, cfg.block_h
    v0 = pl.program_id(0) * bv
    vs = pl.ds(v0, bv)
    in_vocab = (v0 + jnp.arange(bv, dtype=jnp.int32)) < cfg.v

    def zero_step(kb, _):
        plgpu.store(gw_ref.at[pl.ds(kb * bh, bh), vs], jnp.zeros((bh, bv), _F32), mask=in_vocab[None, :])
        return None

    lax.fori_loop(0, cfg.h // bh, zero_step, None)

    def r_step(i, gb):
        r0 = i * bn
        z, cols, _ = _logits_tile(h_ref, w_ref, b_ref, r0, v0, cfg)
        dz = _dlogits_tile(z, cols, r0, ids_ref, lse_ref, glse_ref, gg_ref, cfg)
        dzc = dz.astype(h_ref.dtype)

        def h_step(kb, _):
            hs = pl.ds(kb * bh, bh)
            hk = h_ref[pl.ds(r0, bn), hs]
            acc = plgpu.load(gw_ref.at[hs, vs], mask=in_vocab[None, :], other=0.0)
            plgpu.store(gw_ref.at[hs, vs], acc + plgpu.dot(hk, dzc, trans_a=True), mask=in_vocab[None, :])
            return None

        lax.fori_loop(0, cfg.h // bh, h_step, None)
        return gb + jnp.sum(dz, axis=0)

    gb = lax.fori_loop(0, cfg.row_blocks, r_step, jnp.zeros((bv,), _F32))
    if gb_ref is not None:
        plgpu.store(gb_ref.at[vs], gb, mask=in_vocab)


# ---------------------------------------------------------------------------------------------------------
# pallas_call wrappers and the custom VJP.


def _call(kernel, cfg: _Config, grid, out_shape, args):
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        out_shape=out_shape,
        grid=grid,
        name="linear_lse" + kernel.__name__.removesuffix("_kernel"),  # named in profiles and exported modules
        in_specs=[pl.no_block_spec] * len(args),
        out_specs=[pl.no_block_spec] * len(out_shape),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=cfg.interpret,
    )(*args)


def _with_bias(args: list, bias, cfg: _Config) -> list:
    return args[:2] + [bias] + args[2:] if cfg.has_bias else args


def _forward(hidden, weight, bias, ids, cfg: _Config):
    nt, ns = len(cfg.temps), cfg.num_splits
    out_shape = [
        jax.ShapeDtypeStruct((nt, ns, cfg.n), _F32),
        jax.ShapeDtypeStruct((nt, ns, cfg.n), _F32),
        jax.ShapeDtypeStruct((cfg.n, cfg.k), _F32),
    ]
    args = _with_bias([hidden, weight, ids], bias, cfg)
    m, s, gathered = _call(_fwd_kernel, cfg, (cfg.row_blocks, ns), out_shape, args)
    m_max = jnp.max(m, axis=1)
    total = jnp.sum(jnp.where(s > 0, s * jnp.exp(m - m_max[:, None]), 0.0), axis=1)
    return m_max + jnp.log(total), gathered


def _backward(hidden, weight, bias, ids, lse, g_lse, g_gathered, cfg: _Config):
    args = _with_bias([hidden, weight, ids, lse, g_lse, g_gathered], bias, cfg)
    (gh,) = _call(_dh_kernel, cfg, (cfg.row_blocks,), [jax.ShapeDtypeStruct((cfg.n, cfg.h), _F32)], args)
    out_shape = [jax.ShapeDtypeStruct((cfg.h, cfg.v), _F32)]
    if cfg.has_bias:
        out_shape.append(jax.ShapeDtypeStruct((cfg.v,), _F32))
    outs = _call(_dw_kernel, cfg, (cfg.vocab_blocks,), out_shape, args)
    return gh, outs[0], (outs[1] if cfg.has_bias else None)


_lse_gather = row_padded_lse_gather(_forward, _backward, id_pad=-1)


def linear_logsumexp_gather_pallas_gpu(
    hidden: jax.Array,
    weight: jax.Array,
    ids: jax.Array,
    *,
    bias: jax.Array | None = None,
    temperatures: tuple[float, ...] = (1.0,),
    softcap: float | None = None,
    block_n: int,
    block_v: int,
    block_h: int,
    num_splits: int | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """See ``jaxpref.pallas.linear_logsumexp_gather``. hidden [N, H], weight [H, V], ids int [N, K'].

    ``num_splits``: vocabulary splits of the forward grid (default: enough programs to fill a GPU).
    ``interpret``: run the Pallas interpreter (default: only when the default backend is CPU).
    Raises ``PallasUnsupportedError`` for configurations the Triton kernels cannot handle.
    """
    bh = check_supported(hidden, weight, ids, block_n=block_n, block_v=block_v, block_h=block_h)
    n = hidden.shape[0]
    row_blocks = -(-n // block_n)
    vocab_blocks = -(-weight.shape[1] // block_v)
    if num_splits is None:
        num_splits = math.ceil(_TARGET_PROGRAMS / row_blocks)
    num_splits = max(1, min(int(num_splits), vocab_blocks))
    num_splits = -(-vocab_blocks // -(-vocab_blocks // num_splits))  # no empty splits
    cfg = _Config(
        temps=tuple(float(t) for t in temperatures),
        n=row_blocks * block_n,
        h=hidden.shape[1],
        v=weight.shape[1],
        k=ids.shape[1],
        block_n=block_n,
        block_v=block_v,
        block_h=bh,
        num_splits=num_splits,
        has_bias=bias is not None,
        interpret=jax.default_backend() == "cpu" if interpret is None else bool(interpret),
        softcap=None if softcap is None else float(softcap),
    )
    return _lse_gather(hidden, weight, bias, ids.astype(jnp.int32), cfg)
