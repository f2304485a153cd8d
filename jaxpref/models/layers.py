"""Building blocks of the decoder: projections (with optional LoRA), embedding, RMSNorm, attention,
MLP and the transformer block (Llama family and Gemma 2/3, see ``ModelConfig``).

Every parameter is created with logical axis names in its ``out_sharding`` metadata and with eager
sharding off, so construction never needs a mesh; ``partitioning`` places arrays later.
Module and attribute names mirror transformers' (``self_attn.q_proj``, ``mlp.down_proj``, ...) so
checkpoint key maps are mechanical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpref import platform
from jaxpref.models import nf4
from jaxpref.models.attention import attention, decode_attention
from jaxpref.models.config import AttentionKind, ModelConfig
from jaxpref.models.rope import apply_rope

#: (cos, sin) tables [B, T, D] float32, one pair per ``ModelConfig.rope_variants`` entry.
Ropes = tuple[tuple[jax.Array, jax.Array], ...]


def make_param(value: jax.Array, axes: Sequence[str], cls: type[nnx.Variable] = nnx.Param) -> nnx.Variable:
    """A variable of type ``cls`` tagged with logical axis names (no eager sharding)."""
    return cls(value, out_sharding=tuple(axes), eager_sharding=False)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype: Any) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def _stored_nf4(module: nnx.Module) -> nf4.NF4Arrays | None:
    """A module's ``nf4_*`` variables as arrays (``set_nf4`` stored them), or None when it has none."""
    if module.nf4_codes is None:
        return None
    fields = (module.nf4_codes, module.nf4_absmax, module.nf4_absmax2, module.nf4_offset)
    return nf4.NF4Arrays(*(None if v is None else v[...] for v in fields))


class Linear(nnx.Module):
    """``y = x . kernel + bias`` with kernel [*in_shape, *out_shape], plus an optional LoRA branch.

    LoRA (attached by ``jaxpref.lora.apply_lora``) adds ``scaling * dropout(x) . lora_a . lora_b``
    with lora_a [*in_shape, r] and lora_b [r, *out_shape].

    QLoRA (``set_nf4``): ``kernel`` is None and the frozen ``nf4_*`` arrays hold the weight in
    transformers' [prod(out), prod(in)] order, dequantized to the compute dtype at each call.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        in_axes: Sequence[str],
        out_axes: Sequence[str],
        *,
        use_bias: bool,
        init_std: float,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.in_axes, self.out_axes = tuple(in_axes), tuple(out_axes)
        self.dtype, self.param_dtype = dtype, param_dtype
        self.kernel = make_param(
            _normal(rngs, self.in_shape + self.out_shape, init_std, param_dtype), self.in_axes + self.out_axes
        )
        self.bias = make_param(jnp.zeros(self.out_shape, param_dtype), self.out_axes) if use_bias else nnx.data(None)
        self.lora_a = nnx.data(None)
        self.lora_b = nnx.data(None)
        self.lora_scaling = 0.0
        self.lora_dropout = 0.0
        self.nf4_codes = self.nf4_absmax = self.nf4_absmax2 = self.nf4_offset = nnx.data(None)

    def set_nf4(self, arrays: nf4.NF4Arrays, lead_axes: Sequence[str] = ()) -> None:
        """Store the kernel as frozen NF4 arrays in place of ``kernel``: ``nf4.quantize`` of the weight in
        transformers' [prod(out), prod(in)] layout (or its placeholders), with ``lead_axes`` (``layers``)
        in front when stacked."""
        self.kernel = nnx.data(None)
        for name, value, axes in zip(arrays._fields, arrays, nf4.NF4_AXES, strict=True):
            var = nnx.data(None) if value is None else make_param(value, (*lead_axes, *axes), nf4.NF4Weight)
            setattr(self, f"nf4_{name}", var)

    def nf4_arrays(self) -> nf4.NF4Arrays | None:
        """The NF4 arrays of the kernel, or None when the kernel is a float ``kernel``."""
        return _stored_nf4(self)

    def __call__(self, x: jax.Array, *, use_adapters: bool = True, dropout_key: jax.Array | None = None) -> jax.Array:
        """x [..., *in_shape] -> [..., *out_shape] in the compute dtype.

        Computed as 2-D matmuls on [rows, prod(in_shape)] x [prod(in_shape), prod(out_shape)] (the
        reshapes are free): the same sums as a tensordot over the trailing axes, but every backward
        dot then contracts a single axis, which XLA:CPU runs without transposing the operands first
        (a 3-D ``[B, T, H]`` contraction made it copy-transpose each activation gradient).
        """
        lead = x.shape[: x.ndim - len(self.in_shape)]
        d_in, d_out = math.prod(self.in_shape), math.prod(self.out_shape)
        x = x.astype(self.dtype).reshape(-1, d_in)
        quantized = self.nf4_arrays()
        if quantized is None:
            y = jnp.dot(x, self.kernel[...].astype(self.dtype).reshape(d_in, d_out))
        else:
            # One layer's weight [d_out, d_in], dequantized where it is used (inside the layer scan); the
            # barrier keeps XLA from hoisting the dequantization of every layer out of the loop.
            w = nf4.dequantize(jax.lax.optimization_barrier(quantized), (d_out, d_in), self.dtype)
            y = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype).reshape(d_out)
        if use_adapters and self.lora_a is not None:
            h = x
            if dropout_key is not None and self.lora_dropout > 0:
                keep = jax.random.bernoulli(dropout_key, 1.0 - self.lora_dropout, h.shape)
                h = jnp.where(keep, h / (1.0 - self.lora_dropout), 0).astype(h.dtype)
            rank = self.lora_a.shape[-1]
            h = jnp.dot(h, self.lora_a[...].astype(self.dtype).reshape(d_in, rank))
            h = jnp.dot(h, self.lora_b[...].astype(self.dtype).reshape(rank, d_out))
            y = y + (h * self.lora_scaling).astype(y.dtype)
        return y.reshape(lead + self.out_shape)


class NF4Table(nnx.Module):
    """A [V, H] table (the embedding, or an LM head) that ``set_nf4`` can store as frozen NF4 arrays
    (``qlora_quantize_embeddings``): ``nf4.quantize_table`` of transformers' [V, H] tensor, rows kept
    (codes [V, H / 2], absmax [V, H / 64]), in place of the float variable named ``_float_name``."""

    _float_name = ""

    def _init_nf4(self) -> None:
        self.nf4_codes = self.nf4_absmax = self.nf4_absmax2 = self.nf4_offset = nnx.data(None)

    def set_nf4(self, arrays: nf4.NF4Arrays) -> None:
        """Replace the float table by ``arrays`` (``nf4.quantize_table`` or its placeholders)."""
        setattr(self, self._float_name, nnx.data(None))
        for name, value, axes in zip(arrays._fields, arrays, nf4.NF4_TABLE_AXES, strict=True):
            var = nnx.data(None) if value is None else make_param(value, axes, nf4.NF4Weight)
            setattr(self, f"nf4_{name}", var)

    def nf4_arrays(self) -> nf4.NF4Arrays | None:
        """The NF4 arrays of the table, or None when it is a float variable."""
        return _stored_nf4(self)

    def dequantized(self, dtype: Any) -> jax.Array:
        """The whole NF4 table [V, H] in ``dtype`` (float32 products, one cast)."""
        q = self.nf4_arrays()
        v, half = q.codes.shape
        return nf4.dequantize(nf4.flat(q), (v, 2 * half), dtype)


class Embed(NF4Table):
    """Token embedding [V, H]; ``embedding_copy`` is the trainable copy when LoRA saves this module.

    Rows are multiplied by ``config.embed_scale`` (Gemma) after the lookup; a tied LM head reads the
    unscaled table. Stored as NF4 (``set_nf4``), a lookup dequantizes only the gathered rows."""

    _float_name = "embedding"

    def __init__(self, config: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        table = _normal(rngs, (config.vocab_size, config.hidden_size), config.initializer_range, param_dtype)
        if config.pad_token_id is not None:
            table = table.at[config.pad_token_id].set(0)
        self.embedding = make_param(table, ("vocab", "embed"))
        self.embedding_copy = nnx.data(None)
        self.dtype = dtype
        self.scale = config.embed_scale
        self._init_nf4()

    def table(self, use_adapters: bool = True) -> jax.Array:
        """The [V, H] table in use (the trainable copy when present and adapters are on); an NF4 table
        dequantized to the compute dtype (the whole table: the LM head's use)."""
        if use_adapters and self.embedding_copy is not None:
            return self.embedding_copy[...]
        if self.nf4_codes is not None:
            return self.dequantized(self.dtype)
        return self.embedding[...]

    def __call__(self, input_ids: jax.Array, *, use_adapters: bool = True, frozen: bool = False) -> jax.Array:
        """int [B, T] -> [B, T, H] in the compute dtype.

        ``frozen``: the table takes no gradient here. On CPU a 16-bit table is then gathered as uint16
        bit patterns: XLA:CPU would otherwise gather from a float32 copy of the whole table (0.6 GiB for
        a 152k x 1024 vocabulary)."""
        if self.nf4_codes is not None and not (use_adapters and self.embedding_copy is not None):
            return self.scaled(nf4.dequantize_rows(self.nf4_arrays(), input_ids, self.dtype))
        table = self.table(use_adapters)
        if frozen and table.dtype.itemsize == 2 and platform.kernel_platform() == "cpu":
            bits = jnp.take(jax.lax.bitcast_convert_type(table, jnp.uint16), input_ids, axis=0)
            return self.scaled(jax.lax.bitcast_convert_type(bits, table.dtype).astype(self.dtype))
        return self.scaled(jnp.take(table, input_ids, axis=0).astype(self.dtype))

    def scaled(self, rows: jax.Array) -> jax.Array:
        """Table rows [..., H] in the compute dtype -> the embeddings the blocks take.

        Gemma multiplies by sqrt(hidden_size) rounded to the compute dtype (as transformers'
        ``Gemma2TextScaledWordEmbedding`` rounds it to the weights' dtype: 55.5, not 55.4256, for
        3072 in bfloat16); other families pass the rows through."""
        if self.scale is None:
            return rows
        return rows * jnp.asarray(self.scale, rows.dtype)


class LMHead(NF4Table):
    """Untied output projection, kernel [H, V]; ``kernel_copy`` as in ``Embed``. Stored as NF4
    (``set_nf4``) in transformers' [V, H] layout of ``lm_head.weight``."""

    _float_name = "kernel"

    def __init__(self, config: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        shape = (config.hidden_size, config.vocab_size)
        self.kernel = make_param(_normal(rngs, shape, config.initializer_range, param_dtype), ("embed", "vocab"))
        self.kernel_copy = nnx.data(None)
        self.dtype = dtype
        self._init_nf4()

    def weight(self, use_adapters: bool = True) -> jax.Array:
        """The [H, V] weight in use; an NF4 one dequantized to the compute dtype."""
        if use_adapters and self.kernel_copy is not None:
            return self.kernel_copy[...]
        if self.nf4_codes is not None:
            return self.dequantized(self.dtype).T
        return self.kernel[...]


class RMSNorm(nnx.Module):
    """RMS normalisation over the last dim, in float32 (as transformers), then scaled.

    Llama: ``w * x_hat`` with x_hat cast to the compute dtype first (``scale`` initialised to ones).
    ``unit_offset`` (Gemma): ``x_hat * (1 + w)`` all in float32, then cast (``scale`` holds w,
    initialised to zeros), as transformers' ``Gemma2RMSNorm`` / ``Gemma3RMSNorm``.
    """

    def __init__(
        self,
        dim: int,
        *,
        eps: float,
        axes: Sequence[str] = ("norm",),
        dtype: Any,
        param_dtype: Any,
        unit_offset: bool = False,
    ):
        init = jnp.zeros if unit_offset else jnp.ones
        self.scale = make_param(init((dim,), param_dtype), axes)
        self.eps, self.dtype, self.unit_offset = eps, dtype, unit_offset

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:
            return (xf * (1.0 + self.scale[...].astype(jnp.float32))).astype(self.dtype)
        return self.scale[...].astype(self.dtype) * xf.astype(self.dtype)


def rms_norm(config: ModelConfig, dim: int, **kwargs: Any) -> RMSNorm:
    """An RMSNorm of ``dim`` in the config's flavour (eps, Gemma's unit offset)."""
    return RMSNorm(dim, eps=config.rms_norm_eps, unit_offset=config.rms_norm_unit_offset, **kwargs)


def _key(keys: jax.Array | None, i: int) -> jax.Array | None:
    return None if keys is None else keys[i]


def per_kind(kinds: Sequence[AttentionKind], kind: jax.Array | int, fn: Any, *args: Any) -> Any:
    """``fn(kinds[kind], *args)``: directly when every layer is of one kind, else by ``lax.switch``
    on ``kind`` (a layer's traced index under the layer scan), so each branch keeps its window and
    RoPE static for the attention kernels."""
    if len(kinds) == 1:
        return fn(kinds[0], *args)
    return jax.lax.switch(kind, [partial(fn, k) for k in kinds], *args)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, optional q/k RMSNorm (Qwen3, Gemma 3) and q/k/v(/o) bias;
    q/k/v as one ``qkv_proj`` for Phi-3 (``config.fused_projections``)."""

    def __init__(self, config: ModelConfig, *, dtype: Any, param_dtype: Any, attention_impl: str, rngs: nnx.Rngs):
        h, n, k, d = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        lin = partial(Linear, init_std=config.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        qkv_bias = config.attention_bias
        self.qkv_split = (n, n + k) if config.fused_projections else None
        if config.fused_projections:
            # Phi-3's one projection: N query heads, then K key heads, then K value heads. Its head axis
            # is "qkv_heads", not split over `tensor` (see jaxpref.sharding.DEFAULT_RULES).
            self.qkv_proj = lin((h,), (n + 2 * k, d), ("embed",), ("qkv_heads", "head_dim"), use_bias=qkv_bias)
        else:
            self.q_proj = lin((h,), (n, d), ("embed",), ("heads", "head_dim"), use_bias=qkv_bias)
            self.k_proj = lin((h,), (k, d), ("embed",), ("kv_heads", "head_dim"), use_bias=qkv_bias)
            self.v_proj = lin((h,), (k, d), ("embed",), ("kv_heads", "head_dim"), use_bias=qkv_bias)
        self.o_proj = lin((n, d), (h,), ("heads", "head_dim"), ("embed",), use_bias=config.o_proj_bias)
        if config.qk_norm:
            norm = partial(rms_norm, config, d, axes=("head_dim",), dtype=dtype, param_dtype=param_dtype)
            self.q_norm, self.k_norm = norm(), norm()
        else:
            self.q_norm = self.k_norm = None
        self.attention_impl = attention_impl
        self.kinds = config.attention_kinds
        self.softcap = config.attn_logit_softcapping
        # None when it is the default 1/sqrt(head_dim) (Gemma's query_pre_attn_scalar usually is head_dim),
        # which leaves the kernels their default path.
        default = config.query_pre_attn_scalar in (None, config.head_dim)
        self.scale = None if default else config.attention_scale

    def __call__(
        self,
        x: jax.Array,
        ropes: Ropes,
        kind: jax.Array | int,
        segment_ids: jax.Array | None,
        *,
        use_adapters: bool,
        dropout_keys: jax.Array | None,
    ) -> jax.Array:
        """x [B, T, H] -> [B, T, H]; ``kind``: this layer's index into ``config.attention_kinds``."""
        q, k, v = self._qkv(x, use_adapters=use_adapters, dropout_keys=dropout_keys)

        def attend(kind: AttentionKind, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
            q, k = self._rotate(kind, ropes, q, k)
            return attention(
                q, k, v, segment_ids=segment_ids, impl=self.attention_impl, window=kind.window,
                softcap=self.softcap, scale=self.scale,
            )  # fmt: skip

        out = per_kind(self.kinds, kind, attend, q, k, v)
        return self.o_proj(out, dropout_key=_key(dropout_keys, 3), use_adapters=use_adapters)

    def _qkv(
        self, x: jax.Array, *, use_adapters: bool, dropout_keys: jax.Array | None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries [B, T, N, D], keys and values [B, T, K, D] (q/k normed, not yet rotated)."""
        kw = dict(use_adapters=use_adapters)
        if self.qkv_split is not None:
            qkv = self.qkv_proj(x, dropout_key=_key(dropout_keys, 0), **kw)
            q, k, v = jnp.split(qkv, self.qkv_split, axis=-2)
        else:
            q = self.q_proj(x, dropout_key=_key(dropout_keys, 0), **kw)
            k = self.k_proj(x, dropout_key=_key(dropout_keys, 1), **kw)
            v = self.v_proj(x, dropout_key=_key(dropout_keys, 2), **kw)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    @staticmethod
    def _rotate(kind: AttentionKind, ropes: Ropes, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        cos, sin = ropes[kind.rope]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def cached(
        self,
        x: jax.Array,
        ropes: Ropes,
        kind: jax.Array | int,
        k_cache: jax.Array,
        v_cache: jax.Array,
        slots: jax.Array,
        *,
        use_adapters: bool,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Attention for generation with this layer's KV cache (no dropout).

        Two modes, by the static length T of ``x`` [B, T, H]:

        * prefill (T > 1): the T tokens are positions 0..T-1 of each row (right-padded prompts),
          attend causally among themselves (``attention``, the training kernel) and go to cache
          slots 0..T-1. Padding tokens after a row's prompt never influence its real tokens.
        * decode (T == 1): row b's token sits at position and cache slot ``slots[b]`` and attends
          to cache slots 0..slots[b] (its own new key included): a plain einsum with GQA grouping.

        Args:
          ropes, kind: as in ``__call__``.
          k_cache, v_cache: [B, S, K, D] this layer's cache before the step (compute dtype).
          slots: int [B] the decode token's slot (ignored in prefill).
        Returns:
          (out [B, T, H], k_cache, v_cache): the cache with this step's keys and values written.
        """
        q, k, v = self._qkv(x, use_adapters=use_adapters, dropout_keys=None)
        opts = dict(softcap=self.softcap, scale=self.scale)

        def attend(kind: AttentionKind, q, k, v, k_cache, v_cache):
            q, k = self._rotate(kind, ropes, q, k)
            k, v = k.astype(k_cache.dtype), v.astype(v_cache.dtype)
            if x.shape[1] > 1:
                out = attention(q, k, v, impl=self.attention_impl, window=kind.window, **opts)
                k_cache = jax.lax.dynamic_update_slice(k_cache, k, (0, 0, 0, 0))
                v_cache = jax.lax.dynamic_update_slice(v_cache, v, (0, 0, 0, 0))
                return out, k_cache, v_cache
            # Row b's slot, written per row (a scatter with a batch dimension: on a mesh every device
            # writes its own rows, where explicit row indices made XLA gather the new keys of all rows).
            write = jax.vmap(lambda cache, new, slot: jax.lax.dynamic_update_slice_in_dim(cache, new, slot, axis=0))
            k_cache, v_cache = write(k_cache, k, slots), write(v_cache, v, slots)
            return decode_attention(q, k_cache, v_cache, slots, window=kind.window, **opts), k_cache, v_cache

        out, k_cache, v_cache = per_kind(self.kinds, kind, attend, q, k, v, k_cache, v_cache)
        return self.o_proj(out, use_adapters=use_adapters), k_cache, v_cache


#: MLP activations by ``ModelConfig.hidden_act`` (transformers' ACT2FN names).
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True)}


class MLP(nnx.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)); act is silu (SwiGLU) or GELU-tanh (Gemma's GeGLU).

    Phi-3 (``config.fused_projections``): one ``gate_up_proj`` with output [2, I] (gate, then up: the
    checkpoint's [2I, H] rows), so its I axis shards over ``tensor`` like ``down_proj``'s."""

    def __init__(self, config: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        h, i = config.hidden_size, config.intermediate_size
        lin = partial(
            Linear,
            init_std=config.initializer_range,
            dtype=dtype,
            param_dtype=param_dtype,
            use_bias=False,
            rngs=rngs,
        )
        self.fused = config.fused_projections
        if self.fused:
            self.gate_up_proj = lin((h,), (2, i), ("embed",), ("gate_up", "mlp"))
        else:
            self.gate_proj = lin((h,), (i,), ("embed",), ("mlp",))
            self.up_proj = lin((h,), (i,), ("embed",), ("mlp",))
        self.down_proj = lin((i,), (h,), ("mlp",), ("embed",))
        self.act = config.hidden_act

    def __call__(self, x: jax.Array, *, use_adapters: bool, dropout_keys: jax.Array | None) -> jax.Array:
        kw = dict(use_adapters=use_adapters)
        if self.fused:
            gate_up = self.gate_up_proj(x, dropout_key=_key(dropout_keys, 4), **kw)
            gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
        else:
            gate = self.gate_proj(x, dropout_key=_key(dropout_keys, 4), **kw)
            up = self.up_proj(x, dropout_key=_key(dropout_keys, 5), **kw)
        return self.down_proj(ACTIVATIONS[self.act](gate) * up, dropout_key=_key(dropout_keys, 6), **kw)


NUM_DROPOUT_SITES = 7  # one LoRA dropout key per projection of a block


class Block(nnx.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(.)).

    With ``config.sandwich_norms`` (Gemma) the attention and MLP outputs are normalised too:
    x + post_attention_layernorm(attn(input_layernorm(x))), then
    + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(.))).
    """

    def __init__(self, config: ModelConfig, *, dtype: Any, param_dtype: Any, attention_impl: str, rngs: nnx.Rngs):
        norm = partial(rms_norm, config, config.hidden_size, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = norm()
        self.self_attn = Attention(
            config, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, rngs=rngs
        )
        self.post_attention_layernorm = norm()
        if config.sandwich_norms:
            self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        else:
            self.pre_feedforward_layernorm = self.post_feedforward_layernorm = None
        self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def _add_attention(self, x: jax.Array, attn: jax.Array) -> jax.Array:
        if self.pre_feedforward_layernorm is None:
            return x + attn
        return x + self.post_attention_layernorm(attn)

    def _mlp_input(self, x: jax.Array) -> jax.Array:
        if self.pre_feedforward_layernorm is None:
            return self.post_attention_layernorm(x)
        return self.pre_feedforward_layernorm(x)

    def _add_mlp(self, x: jax.Array, out: jax.Array) -> jax.Array:
        if self.post_feedforward_layernorm is None:
            return x + out
        return x + self.post_feedforward_layernorm(out)

    def __call__(
        self,
        x: jax.Array,
        ropes: Ropes,
        kind: jax.Array | int,
        segment_ids: jax.Array | None,
        dropout_key: jax.Array | None,
        *,
        use_adapters: bool,
    ) -> jax.Array:
        """x [B, T, H] -> [B, T, H]; ``kind`` as in ``Attention``; dropout_key (or None) seeds this
        layer's LoRA dropout."""
        keys = None if dropout_key is None else jax.random.split(dropout_key, NUM_DROPOUT_SITES)
        attn = self.self_attn(
            self.input_layernorm(x), ropes, kind, segment_ids, use_adapters=use_adapters, dropout_keys=keys
        )
        x = self._add_attention(x, attn)
        return self._add_mlp(x, self.mlp(self._mlp_input(x), use_adapters=use_adapters, dropout_keys=keys))

    def cached(
        self,
        x: jax.Array,
        ropes: Ropes,
        kind: jax.Array | int,
        k_cache: jax.Array,
        v_cache: jax.Array,
        slots: jax.Array,
        *,
        use_adapters: bool,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The block for generation (see ``Attention.cached``): (x [B, T, H], updated k and v cache)."""
        attn, k_cache, v_cache = self.self_attn.cached(
            self.input_layernorm(x), ropes, kind, k_cache, v_cache, slots, use_adapters=use_adapters
        )
        x = self._add_attention(x, attn)
        mlp = self.mlp(self._mlp_input(x), use_adapters=use_adapters, dropout_keys=None)
        return self._add_mlp(x, mlp), k_cache, v_cache
