"""The causal decoder: embeddings, a stack of blocks run under ``lax.scan``, final norm, LM head.

Layer parameters are always stored stacked along a leading ``layers`` axis (one traced block, so
compile time does not grow with depth). ``scan_layers=False`` runs the same stacked parameters in a
Python loop, which tests use to check the scanned + remat gradient.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpref import platform
from jaxpref.errors import ModelError
from jaxpref.models.attention import ATTENTION_IMPLS
from jaxpref.models.config import ModelConfig
from jaxpref.models.layers import Block, Embed, LMHead, Ropes, rms_norm
from jaxpref.models.rope import inverse_frequencies, longrope_cos_sin, rope_cos_sin, sequence_lengths
from jaxpref.pallas import soft_cap

REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _frozen_as_bits(state: Any, frozen_base: bool) -> tuple[Any, Any]:
    """(state for the layer scan, per-layer restore function).

    On CPU, with LoRA (the base weights are frozen: only ``nnx.LoRAParam`` trains), 16-bit base weights
    enter the scan as uint16 bit patterns and each layer's slice is turned back behind an optimization
    barrier. XLA:CPU multiplies bfloat16 in float32 and would otherwise hoist the conversion of every
    stacked weight out of the layer loop: a float32 copy of the whole base model (2.2 GiB of a 3.7 GiB
    step at Qwen3-0.6B). Trained weights keep their dtype (an integer carries no gradient), and other
    platforms multiply bfloat16 natively.
    """
    if not frozen_base or platform.kernel_platform() != "cpu":
        return state, lambda layer_state: layer_state

    def is_frozen_16bit(var: Any) -> bool:
        return not isinstance(var, nnx.LoRAParam) and jnp.dtype(var.dtype).itemsize == 2 and var.dtype != jnp.uint16

    dtypes = jax.tree.map(lambda v: jnp.dtype(v.dtype), state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    to_bits = lambda v: v.replace(jax.lax.bitcast_convert_type(v[...], jnp.uint16)) if is_frozen_16bit(v) else v  # noqa: E731
    bits = jax.tree.map(to_bits, state, is_leaf=lambda v: isinstance(v, nnx.Variable))

    def restore(layer_state: Any) -> Any:
        def back(v: Any, dtype: Any) -> Any:
            if v.dtype == dtype:
                return v
            return v.replace(jax.lax.bitcast_convert_type(jax.lax.optimization_barrier(v[...]), dtype))

        return jax.tree.map(back, layer_state, dtypes, is_leaf=lambda v: isinstance(v, nnx.Variable))

    return bits, restore


class CausalLM(nnx.Module):
    """Causal decoder (Llama 2/3, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 text) returning final hidden states.

    Args:
      config: architecture, usually from ``ModelConfig.from_hf_dict``.
      rngs: initialisation randomness (stream ``params``).
      dtype: compute dtype (activations, matmul inputs); norms, RoPE and softmax run in float32.
      param_dtype: storage dtype of parameters.
      remat_policy: "none", "full", "dots" or "dots_with_no_batch_dims" (per block).
      scan_layers: run blocks under ``lax.scan`` (True) or unrolled (False; same parameters).
      attention_impl: "auto", "xla" or "cudnn" (see ``attention.attention``).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat_policy: str = "none",
        scan_layers: bool = True,
        attention_impl: str = "auto",
    ):
        if remat_policy not in REMAT_POLICIES:
            raise ModelError(f"remat_policy={remat_policy!r} is not one of {sorted(REMAT_POLICIES)}")
        if attention_impl not in ATTENTION_IMPLS:
            raise ModelError(f"attention_impl={attention_impl!r} is not one of {list(ATTENTION_IMPLS)}")
        self.config = config
        self.dtype, self.param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
        self.remat_policy, self.scan_layers, self.attention_impl = remat_policy, scan_layers, attention_impl
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = Embed(config, rngs=rngs, **kw)

        @nnx.split_rngs(splits=config.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(config, attention_impl=attention_impl, rngs=rngs, **kw)

        self.layers = make_blocks(rngs)
        self.norm = rms_norm(config, config.hidden_size, **kw)
        self.lm_head = None if config.tie_word_embeddings else LMHead(config, rngs=rngs, **kw)
        self.quantization = None  # an nf4.NF4Config once jaxpref.models.quantize has quantized the blocks
        # Set by jaxpref.lora.apply_lora.
        self.lora_config = None
        self.lora_dropout = 0.0
        self.dropout_rngs = nnx.data(None)

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        use_adapters: bool = True,
        deterministic: bool = True,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """Final hidden states [B, T, H] (after the last norm, compute dtype); no logits.

        Args:
          input_ids: int [B, T].
          positions: int [B, T] position within each packed segment; default arange(T).
          segment_ids: int [B, T], 1.. per packed sequence, 0 = padding; attention never crosses
            segments. None = one causal sequence per row.
          use_adapters: False runs the base model (LoRA and modules_to_save copies off).
          deterministic: False enables LoRA dropout.
          dropout_key: PRNG key for LoRA dropout; default draws from the model's ``dropout_rngs``.
        """
        batch, length = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        x = self._embed(input_ids, use_adapters)
        ropes = self._rope(positions, sequence_lengths(positions, segment_ids))
        layer_keys = self._layer_dropout_keys(use_adapters, deterministic, dropout_key)
        x = self._run_layers(x, ropes, segment_ids, layer_keys, use_adapters)
        return self.norm(x)

    def _embed(self, input_ids: jax.Array, use_adapters: bool) -> jax.Array:
        # With LoRA the table trains only as its modules_to_save copy (used with the adapters on).
        frozen_table = self.lora_config is not None and (not use_adapters or self.embed_tokens.embedding_copy is None)
        return self.embed_tokens(input_ids, use_adapters=use_adapters, frozen=frozen_table)

    def _rope(self, positions: jax.Array, seq_lengths: jax.Array) -> Ropes:
        """(cos, sin) [B, T, rotary_dim] per ``config.rope_variants`` entry, for int positions [B, T].

        ``seq_lengths``: int [B, T] (or broadcastable), the length of the sequence each token belongs
        to; only LongRoPE reads it (long factors for sequences longer than its original context)."""
        r = self.config.rotary_dim
        tables = []
        for theta, scaling in self.config.rope_variants:
            if scaling is not None and scaling["rope_type"] == "longrope":
                lengths = jnp.broadcast_to(seq_lengths, positions.shape)
                tables.append(longrope_cos_sin(positions, lengths, r, theta, scaling))
            else:
                tables.append(rope_cos_sin(positions, inverse_frequencies(r, theta, scaling)))
        return tuple(tables)

    def _layer_kinds(self) -> jax.Array:
        """int32 [layers]: each layer's index into ``config.attention_kinds``."""
        return jnp.asarray(self.config.layer_kind_ids, jnp.int32)

    # --- generation: a KV cache [layers, B, S, kv_heads, head_dim] for k and v, compute dtype ---

    def init_cache(self, batch: int, max_len: int) -> tuple[jax.Array, jax.Array]:
        """Zero (k, v) caches, each [layers, batch, max_len, kv_heads, head_dim] in the compute dtype."""
        cfg = self.config
        shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        return jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)

    def prefill(
        self,
        input_ids: jax.Array,
        lengths: jax.Array,
        cache: tuple[jax.Array, jax.Array],
        *,
        use_adapters: bool = True,
        embeddings: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Run right-padded prompts and fill cache slots 0..T-1.

        Args:
          input_ids: int [B, T] prompts, row b's tokens at 0..lengths[b]-1, anything after (padding:
            its keys land in slots that decoding overwrites before they become visible).
          lengths: int [B] prompt lengths (at least 1).
          cache: (k, v) from ``init_cache`` with max_len >= T.
          embeddings: [B, T, H] the prompts' embedding-table rows (compute dtype) when the caller looked
            them up (generation on a mesh: ``jaxpref.generation.placement.embed``); None: here. Either
            way they are scaled here (``Embed.scaled``).
        Returns:
          (final hidden state [B, H] at each row's last prompt token (after the norm), cache).
        """
        batch, length = input_ids.shape
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        x = self._embed(input_ids, use_adapters) if embeddings is None else self.embed_tokens.scaled(embeddings)
        ropes = self._rope(positions, lengths.astype(jnp.int32)[:, None])
        x, cache = self._run_layers_cached(x, ropes, cache, jnp.zeros((batch,), jnp.int32), use_adapters)
        last = jnp.take_along_axis(x, (lengths - 1)[:, None, None].astype(jnp.int32), axis=1)[:, 0]
        return self.norm(last), cache

    def decode(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: tuple[jax.Array, jax.Array],
        *,
        use_adapters: bool = True,
        embeddings: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """One generation step: token [B] of row b at position (= cache slot) positions[b], attending to
        slots 0..positions[b]. Returns (final hidden state [B, H], cache with the new keys/values).
        ``embeddings``: [B, 1, H] the tokens' embeddings, as in ``prefill``."""
        positions = positions.astype(jnp.int32)
        x = self._embed(tokens[:, None], use_adapters) if embeddings is None else self.embed_tokens.scaled(embeddings)
        ropes = self._rope(positions[:, None], positions[:, None] + 1)
        x, cache = self._run_layers_cached(x, ropes, cache, positions, use_adapters)
        return self.norm(x[:, 0]), cache

    def _run_layers_cached(self, x, ropes, cache, slots, use_adapters: bool):
        # The cache goes through the layer scan as its scanned input and output: each layer gets its
        # [B, S, K, D] slices, writes its new tokens' keys/values (prefill: slots 0..T-1; decode: one
        # slot per row) and hands them back stacked. (Carrying the whole cache and updating layer i in
        # place measured 25% slower per decode step on CPU: scripts/bench_generate.py's 4 x 512 Llama.)
        graphdef, state = nnx.split(self.layers)
        state, restore = _frozen_as_bits(state, self.lora_config is not None)

        def body(x, xs):
            layer_state, kind, k_layer, v_layer = xs
            block = nnx.merge(graphdef, restore(layer_state))
            x, k_layer, v_layer = block.cached(x, ropes, kind, k_layer, v_layer, slots, use_adapters=use_adapters)
            return x, (k_layer, v_layer)

        return jax.lax.scan(body, x, (state, self._layer_kinds(), *cache))

    def _layer_dropout_keys(
        self, use_adapters: bool, deterministic: bool, dropout_key: jax.Array | None
    ) -> jax.Array | None:
        if deterministic or not use_adapters or self.lora_dropout <= 0:
            return None
        if dropout_key is None:
            if self.dropout_rngs is None:
                raise ModelError("deterministic=False with LoRA dropout needs a dropout_key")
            dropout_key = self.dropout_rngs.dropout()
        return jax.random.split(dropout_key, self.config.num_hidden_layers)

    def _run_layers(self, x, ropes, segment_ids, layer_keys, use_adapters: bool) -> jax.Array:
        # A plain lax.scan over the split layer state (not nnx.scan): every block is re-merged from
        # arrays inside the scan, so the forward also works when callers hand in a model merged from
        # state of an outer trace (nnx transforms reject Variables from a different trace level).
        graphdef, state = nnx.split(self.layers)
        state, restore = _frozen_as_bits(state, self.lora_config is not None and self.scan_layers)

        def body(x, xs):
            layer_state, kind, key = xs
            block = nnx.merge(graphdef, restore(layer_state))
            return block(x, ropes, kind, segment_ids, key, use_adapters=use_adapters), None

        if self.remat_policy != "none":
            # Inside scan the CSE barrier is unnecessary (and costs fusion opportunities).
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=not self.scan_layers)
        kinds = self._layer_kinds()
        if self.scan_layers:
            return jax.lax.scan(body, x, (state, kinds, layer_keys))[0]
        # Unstack each stacked parameter once: its gradient is then one stack of the L layer
        # gradients (indexing a[i] per layer would pad-and-add every layer's gradient to [L, ...]).
        n = self.config.num_hidden_layers
        leaves, treedef = jax.tree.flatten(state)
        per_layer = [jnp.unstack(leaf, axis=0) for leaf in leaves]
        for i in range(n):
            layer_state = jax.tree.unflatten(treedef, [layer[i] for layer in per_layer])
            x, _ = body(x, (layer_state, kinds[i], None if layer_keys is None else layer_keys[i]))
        return x

    def construction_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that rebuild a model like this one (with ``config`` and ``rngs``)."""
        return dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            remat_policy=self.remat_policy,
            scan_layers=self.scan_layers,
            attention_impl=self.attention_impl,
        )

    def lm_head_weight(self, *, use_adapters: bool = True) -> jax.Array:
        """LM-head weight [H, V] in the compute dtype (the embedding transposed when tied)."""
        if self.lm_head is None:
            w = self.embed_tokens.table(use_adapters).T
        else:
            w = self.lm_head.weight(use_adapters)
        return w.astype(self.dtype)

    def logits(self, hidden: jax.Array, *, use_adapters: bool = True) -> jax.Array:
        """Full logits float32 [B, T, V] from hidden [B, T, H] (soft-capped when the config says so);
        tests and generation only."""
        w = self.lm_head_weight(use_adapters=use_adapters)
        z = jnp.einsum("bth,hv->btv", hidden, w, preferred_element_type=jnp.float32)
        return soft_cap(z, self.config.final_logit_softcapping)
