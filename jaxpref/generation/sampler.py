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
  ``model.lm_head_weight()``.
* The decode steps run in one ``jax.lax.while_loop`` that stops when every row has emitted a stop
  token or ``max_new_tokens`` tokens are out. Finished rows keep running (their outputs are ignored).
* Sampling: temperature, then top-k, then top-p, as transformers' warpers in that order; greedy
  (temperature 0) is argmax. Keys: ``key`` (default ``jax.random.key(0)``) folded with the group
  index, then split once per step.
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
    w = model.lm_head_weight(use_adapters=use_adapters)
    return jnp.einsum("bh,hv->bv", hidden, w, preferred_element_type=jnp.float32)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "mode", "use_adapters"))
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
) -> tuple[jax.Array, jax.Array]:
    """(new tokens int32 [B, max_new_tokens] (-1 after a row finished), steps run)."""
    model = nnx.merge(graphdef, state)
    greedy, uses_top_k, uses_top_p = mode
    sample = partial(
        sample_logits,
        greedy=greedy,
        temperature=temperature,
        top_k=top_k if uses_top_k else None,
        top_p=top_p if uses_top_p else None,
    )
    batch, prompt_len = ids.shape
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    hidden, cache = model.prefill(ids, lengths, cache, use_adapters=use_adapters)
    key, sub = jax.random.split(key)
    token = sample(_logits(model, hidden, use_adapters), sub)
    out = jnp.full((batch, max_new_tokens), -1, jnp.int32).at[:, 0].set(token)
    done = ~active | jnp.isin(token, stop_ids)

    def cond(carry):
        step, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, token, cache, out, done, key = carry
        hidden, cache = model.decode(token, lengths + step - 1, cache, use_adapters=use_adapters)
        key, sub = jax.random.split(key)
        token = sample(_logits(model, hidden, use_adapters), sub)
        out = jax.lax.dynamic_update_slice(out, jnp.where(done, -1, token)[:, None], (0, step))
        done = done | jnp.isin(token, stop_ids)
        return step + 1, token, cache, out, done, key

    carry = (jnp.int32(1), token, cache, out, done, key)
    step, _, _, out, _, _ = jax.lax.while_loop(cond, body, carry)
    return out, step


def generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    settings: SamplingSettings,
    *,
    key: jax.Array | None = None,
    use_adapters: bool = True,
    batch_size: int | None = None,
) -> GenerationResult:
    """Prompts of different lengths, batched (batch_size rows per compiled call; default all).

    Args:
      model: a ``jaxpref.models.CausalLM`` (LoRA adapters used when ``use_adapters``).
      prompts: token ids per prompt (each at least one token).
      settings: sampling settings (max_new_tokens, temperature 0 = greedy, top_k, top_p, stop ids).
      key: PRNG key for sampling (a fixed key gives the same tokens); None means ``jax.random.key(0)``.
      batch_size: rows per compiled call; the prompt length is padded to a multiple of 64.
    Returns:
      per prompt, the new tokens (a stop token that ended the row included) and whether a stop
      token ended it.
    """
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        return GenerationResult(tokens=[], finished=[])
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    n_new = settings.max_new_tokens
    if n_new == 0:
        return GenerationResult(tokens=[[] for _ in prompts], finished=[False] * len(prompts))
    if key is None:
        key = jax.random.key(0)
    rows = batch_size or len(prompts)
    prompt_len = PROMPT_BUCKET * math.ceil(max(len(p) for p in prompts) / PROMPT_BUCKET)
    stop = settings.stop_token_ids
    stop_ids = jnp.asarray(stop if stop else (-1,), jnp.int32)  # -1 never sampled
    mode = (settings.greedy, settings.uses_top_k, settings.uses_top_p)
    scalars = (
        jnp.float32(settings.temperature if not settings.greedy else 1.0),
        jnp.int32(settings.top_k or 0),
        jnp.float32(settings.top_p if settings.top_p is not None else 1.0),
    )
    graphdef, state = nnx.split(model)
    tokens: list[list[int]] = []
    finished: list[bool] = []
    for g, start in enumerate(range(0, len(prompts), rows)):
        group = prompts[start : start + rows]
        ids = np.zeros((rows, prompt_len), np.int32)
        lengths = np.ones((rows,), np.int32)
        active = np.zeros((rows,), bool)
        for i, p in enumerate(group):
            ids[i, : len(p)] = p
            lengths[i], active[i] = len(p), True
        out, _ = _generate_group(
            graphdef,
            state,
            jnp.asarray(ids),
            jnp.asarray(lengths),
            jnp.asarray(active),
            jax.random.fold_in(key, g),
            *scalars,
            stop_ids,
            max_new_tokens=n_new,
            mode=mode,
            use_adapters=use_adapters,
        )
        out = np.asarray(out)
        for i in range(len(group)):
            row = out[i].tolist()
            ended = next((j for j, t in enumerate(row) if t in stop), None)
            tokens.append(row if ended is None else row[: ended + 1])
            finished.append(ended is not None)
    return GenerationResult(tokens=tokens, finished=finished)
