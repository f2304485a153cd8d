"""Pallas kernels for TPU (Mosaic lowering); run with ``interpret=True`` on CPU for tests.

TPU grids run sequentially per core, so each kernel keeps an accumulator resident in VMEM across the
innermost ("arbitrary") grid axis instead of looping inside the kernel:

* forward, grid (row blocks, vocabulary blocks): online max/sum per temperature in VMEM scratch; the
  gathered logits accumulate in the resident output block; log-sum-exp is written at the last block.
* grad_hidden, grid (row blocks, vocabulary blocks): the [block_n, H] float32 output block accumulates
  ``dlogits @ W_tile.T``.
* grad_weight (+ grad_bias), grid (vocabulary blocks, row blocks): the [H, block_v] float32 output block
  accumulates ``h_tile.T @ dlogits``.

Tiles hold the whole hidden dimension (no H blocking), so VMEM use grows with H; when a shape does not
fit, compilation fails and ``impl="auto"`` falls back to ``xla_chunked``. Weight columns beyond V in the
last block are unspecified memory on TPU and are zeroed before every matmul that could propagate them.

Ids are assumed in [0, V): an out-of-range id is never matched and its gathered logit stays 0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .padding import row_padded_lse_gather
from .pallas_gpu import PallasUnsupportedError
from .softcap import soft_cap, soft_cap_grad

_F32 = jnp.float32


@dataclass(frozen=True)
class _Config:
    temps: tuple[float, ...]
    n: int  # rows after padding to a multiple of block_n
    v: int
    block_n: int
    block_v: int
    has_bias: bool
    interpret: bool
    vmem_limit_bytes: int | None
    softcap: float | None = None

    @property
    def row_blocks(self) -> int:
        return self.n // self.block_n

    @property
    def vocab_blocks(self) -> int:
        return -(-self.v // self.block_v)


def check_supported(hidden, weight, *, block_n: int, block_v: int) -> None:
    """Raise ``PallasUnsupportedError`` for tiles Mosaic cannot lay out (sublane 8, lane 128)."""
    if block_n % 8 or block_n <= 0:
        raise PallasUnsupportedError(f"block_n={block_n} must be a positive multiple of 8 on TPU")
    if block_v % 128 or block_v <= 0:
        raise PallasUnsupportedError(f"block_v={block_v} must be a positive multiple of 128 on TPU")
    for x in (hidden, weight):
        if x.dtype not in (jnp.float32, jnp.bfloat16):
            raise PallasUnsupportedError(f"unsupported dtype {x.dtype} (float32, bfloat16 only)")


# ---------------------------------------------------------------------------------------------------------
# Tile helpers.


def _columns(j, cfg: _Config):
    """Vocabulary ids of tile j as a [1, bv] row and whether each lies inside the vocabulary."""
    cols = j * cfg.block_v + lax.broadcasted_iota(jnp.int32, (1, cfg.block_v), 1)
    return cols, cols < cfg.v


def _weight_tile(w_ref, valid):
    return jnp.where(valid, w_ref[...], jnp.zeros((), w_ref.dtype))


def _logits(h_ref, w, b_ref, valid, cfg: _Config):
    z = jnp.dot(h_ref[...], w, preferred_element_type=_F32)
    if b_ref is not None:
        z = z + b_ref[...].astype(_F32)
    return jnp.where(valid, soft_cap(z, cfg.softcap), -jnp.inf)  # cap first: tanh(-inf) would be -cap


def _dlogits(z, cols, ids_ref, lse_ref, glse_ref, gg_ref, cfg: _Config):
    dz = jnp.zeros(z.shape, _F32)
    for t, temp in enumerate(cfg.temps):
        zt = z if temp == 1.0 else z / temp
        coef = glse_ref[:, t : t + 1] / temp
        dz = dz + coef * jnp.exp(zt - lse_ref[:, t : t + 1])
    for k in range(ids_ref.shape[1]):  # duplicates add up, like the transpose of a gather
        dz = dz + jnp.where(cols == ids_ref[:, k : k + 1], gg_ref[:, k : k + 1], 0.0)
    return dz if cfg.softcap is None else dz * soft_cap_grad(z, cfg.softcap)


def _unpack(refs, has_bias: bool, n_in: int):
    refs = list(refs)
    if not has_bias:
        refs.insert(2, None)
    return refs[: n_in + 1], refs[n_in + 1 :]


# ---------------------------------------------------------------------------------------------------------
# Kernels.


def _fwd_kernel(*refs, cfg: _Config):
    (h_ref, w_ref, b_ref, ids_ref), rest = _unpack(refs, cfg.has_bias, 3)
    lse_ref, g_ref, *stats = rest
    j = pl.program_id(1)
    nt = len(cfg.temps)
    m_refs, s_refs = stats[:nt], stats[nt:]

    @pl.when(j == 0)
    def _init():
        for t in range(nt):
            m_refs[t][...] = jnp.full(m_refs[t].shape, -jnp.inf, _F32)
            s_refs[t][...] = jnp.zeros(s_refs[t].shape, _F32)
        g_ref[...] = jnp.zeros(g_ref.shape, _F32)

    cols, valid = _columns(j, cfg)
    z = _logits(h_ref, w_ref[...], b_ref, valid, cfg)  # garbage columns are replaced by -inf
    z_max = jnp.max(z, axis=1, keepdims=True)
    for t, temp in enumerate(cfg.temps):
        zt = z if temp == 1.0 else z / temp
        m_old = m_refs[t][...]
        m_new = jnp.maximum(m_old, z_max if temp == 1.0 else z_max / temp)
        total = jnp.sum(jnp.exp(zt - m_new), axis=1, keepdims=True)
        s_refs[t][...] = s_refs[t][...] * jnp.exp(m_old - m_new) + total
        m_refs[t][...] = m_new
    for k in range(ids_ref.shape[1]):
        hit = cols == ids_ref[:, k : k + 1]
        g_ref[:, k : k + 1] += jnp.sum(jnp.where(hit, z, 0.0), axis=1, keepdims=True)

    @pl.when(j == cfg.vocab_blocks - 1)
    def _finish():
        for t in range(nt):
            lse_ref[:, t : t + 1] = m_refs[t][...] + jnp.log(s_refs[t][...])


def _dh_kernel(*refs, cfg: _Config):
    (h_ref, w_ref, b_ref, ids_ref, lse_ref, glse_ref, gg_ref), (gh_ref,) = _unpack(refs, cfg.has_bias, 6)
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        gh_ref[...] = jnp.zeros(gh_ref.shape, _F32)

    cols, valid = _columns(j, cfg)
    w = _weight_tile(w_ref, valid)
    z = _logits(h_ref, w, b_ref, valid, cfg)
    dz = _dlogits(z, cols, ids_ref, lse_ref, glse_ref, gg_ref, cfg).astype(w.dtype)
    gh_ref[...] += lax.dot_general(dz, w, (((1,), (1,)), ((), ())), preferred_element_type=_F32)


def _dw_kernel(*refs, cfg: _Config):
    (h_ref, w_ref, b_ref, ids_ref, lse_ref, glse_ref, gg_ref), outs = _unpack(refs, cfg.has_bias, 6)
    gw_ref, gb_ref = outs if cfg.has_bias else (outs[0], None)
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        gw_ref[...] = jnp.zeros(gw_ref.shape, _F32)
        if gb_ref is not None:
            gb_ref[...] = jnp.zeros(gb_ref.shape, _F32)

    cols, valid = _columns(j, cfg)
    z = _logits(h_ref, w_ref[...], b_ref, valid, cfg)
    dz = _dlogits(z, cols, ids_ref, lse_ref, glse_ref, gg_ref, cfg)
    h = h_ref[...]
    gw_ref[...] += lax.dot_general(h, dz.astype(h.dtype), (((0,), (0,)), ((), ())), preferred_element_type=_F32)
    if gb_ref is not None:
        gb_ref[...] += jnp.sum(dz, axis=0, keepdims=True)


# ---------------------------------------------------------------------------------------------------------
# pallas_call wrappers and the custom VJP.


def _params(cfg: _Config, semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=cfg.vmem_limit_bytes)


def _forward(hidden, weight, bias, ids, cfg: _Config):
    bn, bv, k, nt = cfg.block_n, cfg.block_v, ids.shape[1], len(cfg.temps)
    h_dim = hidden.shape[1]
    in_specs = [
        pl.BlockSpec((bn, h_dim), lambda i, j: (i, 0)),
        pl.BlockSpec((h_dim, bv), lambda i, j: (0, j)),
    ]
    args = [hidden, weight]
    if cfg.has_bias:
        in_specs.append(pl.BlockSpec((1, bv), lambda i, j: (0, j)))
        args.append(bias.reshape(1, -1))
    in_specs.append(pl.BlockSpec((bn, k), lambda i, j: (i, 0)))
    args.append(ids)
    lse, gathered = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        name="linear_lse_fwd",
        out_shape=[jax.ShapeDtypeStruct((cfg.n, nt), _F32), jax.ShapeDtypeStruct((cfg.n, k), _F32)],
        grid=(cfg.row_blocks, cfg.vocab_blocks),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((bn, nt), lambda i, j: (i, 0)), pl.BlockSpec((bn, k), lambda i, j: (i, 0))],
        scratch_shapes=[pltpu.VMEM((bn, 1), _F32) for _ in range(2 * nt)],
        compiler_params=_params(cfg, ("parallel", "arbitrary")),
        interpret=cfg.interpret,
    )(*args)
    return lse.T, gathered


def _backward(hidden, weight, bias, ids, lse, g_lse, g_gathered, cfg: _Config):
    bn, bv, k, nt = cfg.block_n, cfg.block_v, ids.shape[1], len(cfg.temps)
    h_dim = hidden.shape[1]
    row_arrays = [ids, lse.T, g_lse.T, g_gathered]
    row_widths = [k, nt, nt, k]

    def specs(row_of, col_of):
        s = [
            pl.BlockSpec((bn, h_dim), lambda a, b: (row_of(a, b), 0)),
            pl.BlockSpec((h_dim, bv), lambda a, b: (0, col_of(a, b))),
        ]
        if cfg.has_bias:
            s.append(pl.BlockSpec((1, bv), lambda a, b: (0, col_of(a, b))))
        s += [pl.BlockSpec((bn, w), lambda a, b: (row_of(a, b), 0)) for w in row_widths]
        return s

    args = [hidden, weight] + ([bias.reshape(1, -1)] if cfg.has_bias else []) + row_arrays
    gh = pl.pallas_call(
        functools.partial(_dh_kernel, cfg=cfg),
        name="linear_lse_dh",
        out_shape=jax.ShapeDtypeStruct((cfg.n, h_dim), _F32),
        grid=(cfg.row_blocks, cfg.vocab_blocks),
        in_specs=specs(lambda i, j: i, lambda i, j: j),
        out_specs=pl.BlockSpec((bn, h_dim), lambda i, j: (i, 0)),
        compiler_params=_params(cfg, ("parallel", "arbitrary")),
        interpret=cfg.interpret,
    )(*args)
    out_shape = [jax.ShapeDtypeStruct((h_dim, cfg.v), _F32)]
    out_specs = [pl.BlockSpec((h_dim, bv), lambda j, i: (0, j))]
    if cfg.has_bias:
        out_shape.append(jax.ShapeDtypeStruct((1, cfg.v), _F32))
        out_specs.append(pl.BlockSpec((1, bv), lambda j, i: (0, j)))
    outs = pl.pallas_call(
        functools.partial(_dw_kernel, cfg=cfg),
        name="linear_lse_dw",
        out_shape=out_shape,
        grid=(cfg.vocab_blocks, cfg.row_blocks),
        in_specs=specs(lambda j, i: i, lambda j, i: j),
        out_specs=out_specs,
        compiler_params=_params(cfg, ("parallel", "arbitrary")),
        interpret=cfg.interpret,
    )(*args)
    return gh, outs[0], (outs[1][0] if cfg.has_bias else None)


_lse_gather = row_padded_lse_gather(_forward, _backward)


def linear_logsumexp_gather_pallas_tpu(
    hidden: jax.Array,
    weight: jax.Array,
    ids: jax.Array,
    *,
    bias: jax.Array | None = None,
    temperatures: tuple[float, ...] = (1.0,),
    softcap: float | None = None,
    block_n: int,
    block_v: int,
    vmem_limit_bytes: int | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """See ``jaxpref.pallas.linear_logsumexp_gather``. hidden [N, H], weight [H, V], ids int [N, K'].

    ``interpret``: run the Pallas interpreter (default: only when the default backend is CPU).
    Raises ``PallasUnsupportedError`` for configurations the Mosaic kernels cannot handle.
    """
    check_supported(hidden, weight, block_n=block_n, block_v=block_v)
    n = hidden.shape[0]
    cfg = _Config(
        temps=tuple(float(t) for t in temperatures),
        n=-(-n // block_n) * block_n,
        v=weight.shape[1],
        block_n=block_n,
        block_v=block_v,
        has_bias=bias is not None,
        interpret=jax.default_backend() == "cpu" if interpret is None else bool(interpret),
        vmem_limit_bytes=vmem_limit_bytes,
        softcap=None if softcap is None else float(softcap),
    )
    return _lse_gather(hidden, weight, bias, ids.astype(jnp.int32), cfg)
