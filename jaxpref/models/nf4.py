"""4-bit NormalFloat (NF4) weights with double quantization, as bitsandbytes stores QLoRA base weights.

A weight is quantized in transformers' layout ([out, in], row-major, i.e. the order bitsandbytes
flattens ``nn.Linear.weight`` in), so the codes and scales equal bitsandbytes' for the same tensor:

* first level: blocks of ``blocksize`` (64) consecutive values; each block is divided by its absmax
  (multiplied by the float32 reciprocal, as bitsandbytes) and every value goes to the nearest of the
  16 NF4 levels (a tie to the lower level); two 4-bit codes per byte, the first in the high nibble
  (``quant_storage`` uint8).
* double quantization (``bnb_4bit_use_double_quant``): the float32 block absmaxes minus their mean
  (``offset``, one per tensor) are quantized in blocks of 256 to bitsandbytes' signed dynamic 8-bit
  map (nearest, tie to the lower index; each block divided by its own float32 absmax, ``absmax2``).

Dequantization is float32 (``code[q] * absmax``; ``dyn[q8] * absmax2 + offset`` for the absmax), then
cast to the compute dtype, as bitsandbytes' ``dequantize_4bit``. Storage per weight of n values:
n/2 bytes of codes + n/64 bytes of absmax codes + 4 bytes per 256 blocks + 4: 0.517 bytes per value
(0.258x bfloat16); without double quantization n/2 + 4 n/64 (0.281x).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpref.errors import ModelError

#: bitsandbytes' NF4 levels (QLoRA paper, appendix E), float32, ascending.
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
BLOCKSIZE = 64  # bitsandbytes' default for 4-bit weights
ABSMAX_BLOCKSIZE = 256  # bitsandbytes' block of the double-quantized absmax


@functools.cache
def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed dynamic 8-bit map (``create_dynamic_map(signed=True)``): float32 [256], ascending.

    For exponent i in 0..6, 2**i linearly spaced fractions (means of ``linspace(0.1, 1, 2**i + 1)``
    neighbours, in float32) times 10**(i - 6), both signs; then 0 and 1.
    """
    data: list[float] = []
    for i in range(7):
        bounds = _linspace(2**i + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = np.float32(10.0 ** (i - 6))
        data += (scale * means).tolist() + (-scale * means).tolist()
    data += [0.0, 1.0]
    return np.array(sorted(data), dtype=np.float32)


def _linspace(steps: int) -> np.ndarray:
    """float32 ``torch.linspace(0.1, 1, steps)``: the lower half ``start + step * i``, the upper half
    ``end - step * (steps - 1 - i)``, each a fused multiply-add (numpy's linspace differs in the last bit
    for some points, which would move entries of the map)."""
    start, end = np.float32(0.1), np.float32(1.0)
    step = np.float64((end - start) / np.float32(steps - 1))
    idx = np.arange(steps)
    low = (step * idx + np.float64(start)).astype(np.float32)
    high = (np.float64(end) - step * (steps - 1 - idx)).astype(np.float32)
    return np.where(idx < steps // 2, low, high)


def _midpoints(code: np.ndarray) -> np.ndarray:
    return ((code[:-1] + code[1:]) / np.float32(2.0)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class NF4Config:
    """How base weights are quantized (axolotl/bitsandbytes ``bnb_4bit_*`` meaning).

    double_quant: ``bnb_4bit_use_double_quant``. quantize_embeddings: also store the token embedding
    (and an untied LM head) as NF4 (jaxpref's opt-in; bitsandbytes keeps it in 16 bits).
    """

    double_quant: bool = True
    quantize_embeddings: bool = False
    blocksize: int = BLOCKSIZE


class NF4Arrays(NamedTuple):
    """One quantized weight of n values (leading ``layers`` axes allowed on every field).

    codes: uint8 [n / 2]; absmax: uint8 [n / blocksize] with double quantization, else float32;
    absmax2: float32 [ceil(n / blocksize / 256)] or None; offset: float32 [] or None.
    """

    codes: jax.Array
    absmax: jax.Array
    absmax2: jax.Array | None
    offset: jax.Array | None


def check_size(n: int, blocksize: int = BLOCKSIZE) -> None:
    """ModelError unless a weight of n values splits into whole blocks."""
    if n % blocksize:
        raise ModelError(f"NF4: a weight of {n} values is not a multiple of the block size {blocksize}")


def check_row_size(h: int, blocksize: int = BLOCKSIZE) -> None:
    """ModelError unless a table's rows of h values are whole blocks (each token's own codes and scales)."""
    if h % blocksize:
        raise ModelError(
            f"NF4 embeddings: hidden_size {h} is not a multiple of the NF4 block size {blocksize}, so a token's "
            "row would share quantization blocks with its neighbours; set qlora_quantize_embeddings: false"
        )


def quantized_bytes(n: int, cfg: NF4Config) -> int:
    """Bytes of one NF4 weight of n values (codes + scales)."""
    blocks = n // cfg.blocksize
    if cfg.double_quant:
        return n // 2 + blocks + 4 * math.ceil(blocks / ABSMAX_BLOCKSIZE) + 4
    return n // 2 + 4 * blocks


def quantize(w: jax.Array, cfg: NF4Config) -> NF4Arrays:
    """Quantize one weight (any shape, flattened row-major: pass transformers' [out, in] layout)."""
    x = jnp.asarray(w).reshape(-1).astype(jnp.float32)
    check_size(x.size, cfg.blocksize)
    blocks = x.reshape(-1, cfg.blocksize)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    scaled = jnp.clip(blocks * (1.0 / jnp.maximum(absmax, 1e-38))[:, None], -1.0, 1.0).reshape(-1)
    # the number of midpoints below each value = searchsorted(side="left"), as one fused elementwise pass
    # (a search would hold int32 indices of the whole weight)
    q = sum((scaled > m).astype(jnp.uint8) for m in _midpoints(NF4_CODE).tolist())
    codes = (q[0::2] << 4) | q[1::2]
    if not cfg.double_quant:
        return NF4Arrays(codes, absmax, None, None)
    return NF4Arrays(codes, *double_quantize(absmax))


def double_quantize(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 block absmaxes [nb] -> (uint8 codes [nb], float32 absmax2 [ceil(nb / 256)], float32 offset [])."""
    offset = jnp.mean(absmax)
    centred = absmax - offset
    nb = centred.size
    padded = jnp.pad(centred, (0, -nb % ABSMAX_BLOCKSIZE)).reshape(-1, ABSMAX_BLOCKSIZE)
    absmax2 = jnp.max(jnp.abs(padded), axis=-1)
    normed = (padded / jnp.where(absmax2 > 0, absmax2, 1.0)[:, None]).reshape(-1)[:nb]
    q8 = jnp.searchsorted(jnp.asarray(_midpoints(dynamic_map())), normed, side="left").astype(jnp.uint8)
    return q8, absmax2, offset


def block_absmax(q: NF4Arrays) -> jax.Array:
    """The first-level absmax, float32 [n / blocksize] (double quantization undone)."""
    if q.absmax2 is None:
        return q.absmax.astype(jnp.float32)
    nb = q.absmax.shape[-1]
    values = jnp.take(jnp.asarray(dynamic_map()), q.absmax.astype(jnp.int32), axis=0)
    values = jnp.pad(values, (0, -nb % ABSMAX_BLOCKSIZE)).reshape(-1, ABSMAX_BLOCKSIZE)
    return (values * q.absmax2[:, None]).reshape(-1)[:nb] + q.offset


def rows_absmax(absmax_rows: jax.Array, rows: jax.Array, q: NF4Arrays) -> jax.Array:
    """The first-level absmax of whole rows of a table: float32 [..., H / blocksize].

    absmax_rows: [..., H / blocksize] the rows' absmax entries (gathered from ``q.absmax`` stored
    [V, H / blocksize]); rows: int [...] their row indices (to find each block's second-level scale).
    The same float32 arithmetic as ``block_absmax``, for the gathered blocks only."""
    if q.absmax2 is None:
        return absmax_rows.astype(jnp.float32)
    per_row = absmax_rows.shape[-1]
    block = rows.astype(jnp.int32)[..., None] * per_row + jnp.arange(per_row, dtype=jnp.int32)
    values = jnp.take(jnp.asarray(dynamic_map()), absmax_rows.astype(jnp.int32), axis=0)
    return values * jnp.take(q.absmax2, block // ABSMAX_BLOCKSIZE, axis=0) + q.offset


def dequantize_rows(q: NF4Arrays, rows: jax.Array, dtype: Any) -> jax.Array:
    """Rows of a table quantized as [V, H] (codes stored [V, H / 2], absmax [V, H / blocksize], H a multiple
    of the block size, so a row's codes and blocks are its own): rows int [...] -> [..., H] in ``dtype``.

    Only the gathered rows are dequantized (an embedding lookup), equal to the rows of ``dequantize``."""
    codes = jnp.take(q.codes, rows, axis=0)
    absmax = rows_absmax(jnp.take(q.absmax, rows, axis=0), rows, q)
    values = jnp.take(jnp.asarray(NF4_CODE), jnp.stack([codes >> 4, codes & 0xF], axis=-1).astype(jnp.int32), axis=0)
    lead, per_row = absmax.shape[:-1], absmax.shape[-1]
    values = values.reshape(*lead, per_row, -1) * absmax[..., None]
    return values.reshape(*lead, -1).astype(dtype)


def flat(q: NF4Arrays) -> NF4Arrays:
    """The arrays with codes and absmax flattened (a table's [V, ...] storage -> ``dequantize``'s layout)."""
    return q._replace(codes=q.codes.reshape(-1), absmax=q.absmax.reshape(-1))


def quantize_table(table: jax.Array, cfg: NF4Config, rows_per_chunk: int = 1024) -> NF4Arrays:
    """Quantize a [V, H] table (transformers' layout: the embedding, or ``lm_head.weight``) as ``quantize``
    of the whole tensor, returned as codes [V, H / 2] and absmax [V, H / blocksize] (a row's blocks are its
    own: H must be a multiple of the block size). The first level runs over chunks of rows, so no float32
    copy of the whole table is made; the double quantization then takes all block absmaxes (as one tensor).
    """
    v, h = table.shape
    check_row_size(h, cfg.blocksize)
    first = dataclasses.replace(cfg, double_quant=False)
    codes, absmax, _, _ = jax.lax.map(lambda row: quantize(row, first), table, batch_size=rows_per_chunk)
    if not cfg.double_quant:
        return NF4Arrays(codes, absmax, None, None)
    q8, absmax2, offset = double_quantize(absmax.reshape(-1))
    return NF4Arrays(codes, q8.reshape(v, -1), absmax2, offset)


def dequantize(q: NF4Arrays, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """The weight of ``shape`` (the shape it was quantized in) in ``dtype``: float32 products, then cast."""
    hi, lo = q.codes >> 4, q.codes & 0xF
    idx = jnp.stack([hi, lo], axis=-1).reshape(-1).astype(jnp.int32)
    values = jnp.take(jnp.asarray(NF4_CODE), idx, axis=0)
    absmax = block_absmax(q)
    blocksize = values.size // absmax.size
    return (values.reshape(-1, blocksize) * absmax[:, None]).reshape(shape).astype(dtype)


def stacked(fn: Any, n_leading: int) -> Any:
    """``fn`` mapped over ``n_leading`` leading (layer) axes."""
    for _ in range(n_leading):
        fn = jax.vmap(fn)
    return fn


class NF4Weight(nnx.Variable):
    """A frozen NF4 base-weight array (codes or scales). Not an ``nnx.Param``: no optimizer, gradient or
    full-fine-tuning filter selects it; ``jaxpref.lora.BASE_PARAMS`` names it beside the float weights."""


def parameter_count(state: Any) -> int:
    """Weight values in an nnx state: the elements of every ``nnx.Param``, and two per byte of NF4 codes
    (an NF4 weight counts its values; its scales are not parameters). Other variables (RNG) count 0."""
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    total = 0
    for path, v in leaves:
        if isinstance(v, nnx.Param):
            total += math.prod(v.shape)
        elif isinstance(v, NF4Weight) and "nf4_codes" in jax.tree_util.keystr(path):
            total += 2 * math.prod(v.shape)
    return total


#: Logical axis names of the NF4 arrays of one weight (after a leading ``layers`` axis when stacked): codes
#: and absmax codes split like any flat weight (``nf4`` -> the fsdp mesh axis), the few second-level scales
#: and the offset replicated.
NF4_AXES = NF4Arrays(codes=("nf4",), absmax=("nf4",), absmax2=(None,), offset=())
#: ... and of a quantized table (embedding / LM head, rows kept: codes [V, H / 2], absmax [V, H / 64]): the
#: vocabulary as the float table's, the flat row contents over fsdp.
NF4_TABLE_AXES = NF4Arrays(codes=("vocab", "nf4"), absmax=("vocab", "nf4"), absmax2=(None,), offset=())


def abstract_table(v: int, h: int, cfg: NF4Config) -> NF4Arrays:
    """Placeholders of ``quantize_table``'s arrays for a [v, h] table."""
    check_row_size(h, cfg.blocksize)
    flat_arrays = abstract_arrays(v * h, cfg)
    per_row = lambda a, n: jax.ShapeDtypeStruct((v, n), a.dtype)  # noqa: E731
    return flat_arrays._replace(
        codes=per_row(flat_arrays.codes, h // 2), absmax=per_row(flat_arrays.absmax, h // cfg.blocksize)
    )


def abstract_arrays(n: int, cfg: NF4Config, lead: tuple[int, ...] = ()) -> NF4Arrays:
    """Shape/dtype placeholders of the NF4 arrays of a weight of n values (``lead``: leading layer axes)."""
    check_size(n, cfg.blocksize)
    blocks = n // cfg.blocksize
    s = lambda shape, dtype: jax.ShapeDtypeStruct(lead + shape, dtype)  # noqa: E731
    if not cfg.double_quant:
        return NF4Arrays(s((n // 2,), jnp.uint8), s((blocks,), jnp.float32), None, None)
    return NF4Arrays(
        s((n // 2,), jnp.uint8),
        s((blocks,), jnp.uint8),
        s((math.ceil(blocks / ABSMAX_BLOCKSIZE),), jnp.float32),
        s((), jnp.float32),
    )
