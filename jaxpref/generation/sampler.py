"""Batched sampling from a ``CausalLM`` with a KV cache.

Design:

* Prompts are right-padded to one length P, a multiple of 64 (``PROMPT_BUCKET``) covering the
  longest prompt of the call, and grouped into rows of ``batch_size`` (the last group is filled with
  inactive dummy rows), so one compiled program serves every group and every call with the same
  (P, batch_size, max_new_tokens, sampling mode).
* The cache is ``CausalLM.init_cache``: k and v, each [layers, B, P + max_new_tokens, kv_heads,
  head_dim] in the compute dtype. ``CausalLM.prefill`` fills slots 0..P-1 (padding slots hold junk);
  row b's i-th new token sits at position and slot ``len_b + i``, so decoding overwrites a row's
  padding slots before they become visible (each query sees slots 0..its own).
* Logits are only ever [B, V]: prefill returns each row's last prompt hidden state, multiplied by
  ``model.lm_head_weight()`` (and soft-capped, before the temperature, when the model has a
  ``final_logit_softcapping``).
* The decode steps run in one ``jax.lax.while_loop`` that stops when every row has emitted a stop
  token or ``max_new_tokens`` tokens are out. Finished rows keep running (their outputs are ignored).
* Sampling: temperature, then top-k, then top-p, as transformers' warpers in that order; greedy
  (temperature 0) is argmax. Keys: ``key`` (default ``jax.random.key(0)``) folded with the group
  index, then split once per step.
* Phi-3 LongRoPE: a row whose decode token reaches position ``original_max_position_embeddings``
  re-encodes its whole sequence (a prefill over prompt + new tokens, under ``lax.cond``), as
  transformers' Phi-3 generation drops its cache there: every earlier key moves to the long factors.
* On a mesh (``generate(..., mesh=)``): rows over the batch axes, the KV cache over batch and KV heads,
  tensor-sharded weights never gathered, every process passing its own prompts; see
  ``jaxpref.generation.placement``. Group g's rows are each process's g-th ``batch_size`` prompts in
  process order, then padding rows up to a multiple of the batch axes' devices. A row's tokens do not
  depend on the padding rows after it, so one process on a mesh samples what one device samples.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpref import platform
from jaxpref.generation import placement
from jaxpref.pallas import soft_cap

PROMPT_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None  # None/0: off
    top_p: float | None = None  # None/1.0: off
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 or None, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_top_k(self) -> bool:
        return bool(self.top_k)

    @property
    def uses_top_p(self) -> bool:
        return self.top_p is not None and self.top_p < 1.0


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt, the ending stop token included
    finished: list[bool]  # True: ended by a stop token; False: max_new_tokens reached


def top_k_filter(logits: jax.Array, k: jax.Array | int) -> jax.Array:
    """Logits [B, V] with every token below the k-th largest set to -inf (ties kept; transformers'
    TopKLogitsWarper). ``k`` may be traced; it is clamped to [1, V]."""
    vocab = logits.shape[-1]
    k = jnp.clip(jnp.asarray(k, jnp.int32), 1, vocab)
    kth = jnp.take(jnp.sort(logits, axis=-1), vocab - k, axis=-1)[..., None]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, top_p: jax.Array | float) -> jax.Array:
    """Nucleus filtering as transformers' TopPLogitsWarper: sort ascending, drop the tokens whose
    cumulative probability is <= 1 - top_p (the most likely token always stays); -inf for dropped."""
    order = jnp.argsort(logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cumulative <= 1.0 - top_p
    remove_sorted = remove_sorted.at[..., -1].set(False)
    rows = jnp.arange(logits.shape[0])[:, None]
    remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
    return jnp.where(remove, -jnp.inf, logits)


def first_argmax(x: jax.Array) -> jax.Array:
    """int32 ``jnp.argmax(x, axis=-1)`` (the first index of the largest entry; NaN counts as largest) as
    two plain reductions, a max and a min over indices. XLA:CPU runs ``argmax``'s variadic (value, index)
    reduce about 6x slower than these at [16..64, 32000] (scripts/bench_grpo_step.py, "Where the time goes")."""
    top = jnp.max(x, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    hit = (x == top) | jnp.isnan(x)
    return jnp.min(jnp.where(hit, iota, x.shape[-1]), axis=-1)


def sample_logits(
    logits: jax.Array,
    key: jax.Array,
    *,
    greedy: bool,
    temperature: jax.Array | float = 1.0,
    top_k: jax.Array | int | None = None,
    top_p: jax.Array | float | None = None,
) -> jax.Array:
    """Next tokens int32 [B] from float32 logits [B, V]."""
    if greedy:
        return first_argmax(logits)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    # jax.random.categorical(key, logits) draws exactly this (Gumbel-max, the same noise); its argmax is slow on CPU
    return first_argmax(logits + jax.random.gumbel(key, logits.shape, logits.dtype))


def _logits(model: Any, hidden: jax.Array, use_adapters: bool) -> jax.Array:
    """Last-token logits float32 [B, V], soft-capped when the model has a final logit cap (before the
    sampling temperature, as transformers does)."""
    w = model.lm_head_weight(use_adapters=use_adapters)
    logits = jnp.einsum("bh,hv->bv", hidden, w, preferred_element_type=jnp.float32)
    return soft_cap(logits, model.config.final_logit_softcapping)


def _constrain(x: Any, mesh: Mesh | None, spec: PartitionSpec) -> Any:
    """``x`` (an array or a tuple of arrays) pinned to ``spec`` on ``mesh``; unchanged without a mesh."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, jax.tree.map(lambda _: NamedSharding(mesh, spec), x))


def longrope_restart_position(config: Any) -> int | None:
    """The position whose decode step re-encodes the whole sequence, or None: for Phi-3 LongRoPE, the
    first token past ``original_max_position_embeddings`` (transformers switches to the long factors
    there and recomputes the cache; jaxpref's forward picks the factors per sequence the same way)."""
    scaling = config.rope_scaling
    if config.model_type != "phi3" or not scaling or scaling.get("rope_type") != "longrope":
        return None
    return int(scaling["original_max_position_embeddings"])


def _sequences(ids: jax.Array, lengths: jax.Array, out: jax.Array, token: jax.Array, positions: jax.Array) -> jax.Array:
    """int32 [B, P + N]: each row's prompt, its new tokens so far and ``token`` at ``positions`` (junk after)."""
    new = jnp.maximum(out, 0)
    rows = jnp.concatenate([ids, jnp.zeros_like(new)], axis=1)
    rows = jax.vmap(lambda row, n, at: jax.lax.dynamic_update_slice(row, n, (at,)))(rows, new, lengths)
    return rows.at[jnp.arange(ids.shape[0]), positions].set(token)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "mode", "use_adapters", "mesh", "split_vocab"))
def _generate_group(
    graphdef: Any,
    state: Any,
    ids: jax.Array,
    lengths: jax.Array,
    active: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    stop_ids: jax.Array,
    *,
    max_new_tokens: int,
    mode: tuple[bool, bool, bool],
    use_adapters: bool,
    mesh: Mesh | None = None,
    split_vocab: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """(new tokens int32 [B, max_new_tokens] (-1 after a row finished), steps run).

    ``mesh``: None on one device; else the rows' and cache's shardings are pinned (module doc) and the
    new tokens are returned replicated. ``split_vocab``: the embedding table's vocabulary is split over
    ``tensor`` (the tokens are then embedded by ``placement.embed``).
    """
    model = nnx.merge(graphdef, state)

    def embeddings(tokens: jax.Array) -> jax.Array | None:
        if not split_vocab:
            return None
        return placement.embed(model.embed_tokens.table(use_adapters), tokens, mesh).astype(model.dtype)

    rows_1d = placement.batch_spec(1)
    rows_2d = placement.batch_spec(2)
    kv = placement.cache_spec(mesh, model.config.num_key_value_heads) if mesh is not None else None
    ids = _constrain(ids, mesh, rows_2d)
    lengths, active = _constrain((lengths, active), mesh, rows_1d)
    greedy, uses_top_k, uses_top_p = mode
    sample = partial(
        sample_logits,
        greedy=greedy,
        temperature=temperature,
        top_k=top_k if uses_top_k else None,
        top_p=top_p if uses_top_p else None,
    )
    batch, prompt_len = ids.shape
    cache = _constrain(model.init_cache(batch, prompt_len + max_new_tokens), mesh, kv)
    hidden, cache = model.prefill(ids, lengths, cache, use_adapters=use_adapters, embeddings=embeddings(ids))
    cache = _constrain(cache, mesh, kv)
    key, sub = jax.random.split(key)
    token = _constrain(sample(_logits(model, hidden, use_adapters), sub), mesh, rows_1d)
    out = _constrain(jnp.full((batch, max_new_tokens), -1, jnp.int32).at[:, 0].set(token), mesh, rows_2d)
    done = ~active | jnp.isin(token, stop_ids)

    def cond(carry):
        step, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode(token, cache, positions):
        return model.decode(token, positions, cache, use_adapters=use_adapters, embeddings=embeddings(token[:, None]))

    restart = longrope_restart_position(model.config)

    def body(carry):
        step, token, cache, out, done, key = carry
        positions = lengths + step - 1
        if restart is None:
            hidden, cache = decode(token, cache, positions)
        else:
            # Rows whose token sits at the restart position re-encode their whole sequence, as transformers'
            # Phi3ForCausalLM.prepare_inputs_for_generation drops its cache there (LongRoPE's long factors
            # then apply to every earlier token too).
            crossing = positions == restart

            def reencode(token, cache):
                hidden, stepped = decode(token, cache, positions)
                seqs = _sequences(ids, lengths, out, token, positions)
                full, recomputed = model.prefill(
                    seqs, positions + 1, cache, use_adapters=use_adapters, embeddings=embeddings(seqs)
                )
                hidden = jnp.where(crossing[:, None], full, hidden)
                pick = crossing[None, :, None, None, None]
                return hidden, tuple(jnp.where(pick, r, c) for r, c in zip(recomputed, stepped))

            step_on = lambda token, cache: decode(token, cache, positions)  # noqa: E731
            hidden, cache = jax.lax.cond(jnp.any(crossing), reencode, step_on, token, cache)
        cache = _constrain(cache, mesh, kv)
        key, sub = jax.random.split(key)
        token = _constrain(sample(_logits(model, hidden, use_adapters), sub), mesh, rows_1d)
        out = jax.lax.dynamic_update_slice(out, jnp.where(done, -1, token)[:, None], (0, step))
        done = done | jnp.isin(token, stop_ids)
        return step + 1, token, cache, _constrain(out, mesh, rows_2d), done, key

    carry = (jnp.int32(1), token, cache, out, done, key)
    step, _, _, out, _, _ = jax.lax.while_loop(cond, body, carry)
    return _constrain(out, mesh, PartitionSpec()), step


def generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    settings: SamplingSettings,
    *,
    key: jax.Array | None = None,
    use_adapters: bool = True,
    batch_size: int | None = None,
    mesh: Mesh | None = None,
) -> GenerationResult:
    """Prompts of different lengths, batched (batch_size rows per compiled call; default all).

    Args:
      model: a ``jaxpref.models.CausalLM`` (LoRA adapters used when ``use_adapters``); on a ``mesh``
        its arrays placed on it (the trainer's shardings or ``sharding.shard_module``; else copied
        there by the default rules).
      prompts: token ids per prompt (each at least one token); with a mesh over several processes,
        this process's prompts (every process calls ``generate`` with the same other arguments).
      settings: sampling settings (max_new_tokens, temperature 0 = greedy, top_k, top_p, stop ids).
      key: PRNG key for sampling (a fixed key gives the same tokens); None means ``jax.random.key(0)``.
      batch_size: rows per compiled call (per process on a mesh; default: all prompts, on a mesh the
        most any process has); the prompt length is padded to a multiple of 64.
      mesh: a ``jaxpref.sharding.make_mesh`` mesh to run on (module doc), or None for one device.
    Returns:
      per prompt (this process's), the new tokens (a stop token that ended the row included) and
      whether a stop token ended it.
    """
    prompts = [list(map(int, p)) for p in prompts]
    # Every process's prompts (one list without a mesh or on one process) and this process's index.
    everyone, me = ([prompts], 0) if mesh is None else (placement.allgather_prompts(prompts), jax.process_index())
    if not any(everyone):
        return GenerationResult(tokens=[], finished=[])
    if any(len(p) == 0 for ps in everyone for p in ps):
        raise ValueError("generate: every prompt needs at least one token")
    n_new = settings.max_new_tokens
    if n_new == 0:
        return GenerationResult(tokens=[[] for _ in prompts], finished=[False] * len(prompts))
    if key is None:
        key = jax.random.key(0)
    rows = batch_size or max(map(len, everyone))
    batch = rows * len(everyone) if mesh is None else placement.padded_rows(rows * len(everyone), mesh)
    prompt_len = PROMPT_BUCKET * math.ceil(max(len(p) for ps in everyone for p in ps) / PROMPT_BUCKET)
    stop = settings.stop_token_ids
    stop_ids = np.asarray(stop if stop else (-1,), np.int32)  # -1 never sampled
    mode = (settings.greedy, settings.uses_top_k, settings.uses_top_p)
    scalars = (
        np.float32(settings.temperature if not settings.greedy else 1.0),
        np.int32(settings.top_k or 0),
        np.float32(settings.top_p if settings.top_p is not None else 1.0),
    )
    graphdef, state = nnx.split(model)
    split_vocab = False
    if mesh is not None:
        state = placement.on_mesh(state, mesh)
        embed = nnx.merge(graphdef, state).embed_tokens
        # an NF4 table (qlora_quantize_embeddings) is looked up by its own row gather
        split_vocab = embed.nf4_codes is None and placement.vocab_split(embed.table(use_adapters))
    run = partial(
        _run_group,
        graphdef,
        state,
        mesh=mesh,
        n_new=n_new,
        mode=mode,
        use_adapters=use_adapters,
        split_vocab=split_vocab,
    )
    tokens: list[list[int]] = []
    finished: list[bool] = []
    for g in range(max(math.ceil(len(ps) / rows) for ps in everyone)):
        ids = np.zeros((batch, prompt_len), np.int32)
        lengths = np.ones((batch,), np.int32)
        active = np.zeros((batch,), bool)
        for p, ps in enumerate(everyone):  # process p's g-th prompts in rows p * rows ...
            for i, prompt in enumerate(ps[g * rows : (g + 1) * rows]):
                ids[p * rows + i, : len(prompt)] = prompt
                lengths[p * rows + i], active[p * rows + i] = len(prompt), True
        out = run(ids, lengths, active, jax.random.fold_in(key, g), *scalars, stop_ids)
        for i in range(len(everyone[me][g * rows : (g + 1) * rows])):
            row = out[me * rows + i].tolist()
            ended = next((j for j, t in enumerate(row) if t in stop), None)
            tokens.append(row if ended is None else row[: ended + 1])
            finished.append(ended is not None)
    return GenerationResult(tokens=tokens, finished=finished)


def _run_group(
    graphdef: Any,
    state: Any,
    *arrays: Any,
    mesh: Mesh | None,
    n_new: int,
    mode: tuple,
    use_adapters: bool,
    split_vocab: bool,
) -> np.ndarray:
    """One group through ``_generate_group``: its new tokens [B, n_new] as numpy (all rows).

    ``arrays``: ids [B, P], lengths [B], active [B], key, temperature, top_k, top_p, stop ids (numpy
    but the key). On a mesh they are placed as global arrays (the rows over the batch axes, the rest
    replicated) and the step is traced with ``platform.kernel_mesh``.
    """
    ids, lengths, active, key, *rest = arrays
    kw = dict(max_new_tokens=n_new, mode=mode, use_adapters=use_adapters)
    if mesh is None:
        args = [jnp.asarray(a) for a in (ids, lengths, active)] + [key] + [jnp.asarray(a) for a in rest]
        out, _ = _generate_group(graphdef, state, *args, **kw)
        return np.asarray(out)
    rows = [
        placement.global_array(a, NamedSharding(mesh, placement.batch_spec(a.ndim))) for a in (ids, lengths, active)
    ]
    replicated = NamedSharding(mesh, PartitionSpec())
    rest = [placement.global_array(np.asarray(a), replicated) for a in rest]
    key = placement.replicated_key(key, mesh)
    with platform.kernel_mesh(mesh):
        out, _ = _generate_group(graphdef, state, *rows, key, *rest, mesh=mesh, split_vocab=split_vocab, **kw)
    return placement.host_value(out)
