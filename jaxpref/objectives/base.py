"""The objective interface: what the trainer needs to know about a training objective.

An objective is a pair of pure functions over a micro-batch. ``count`` says how many items (tokens,
pairs, examples) the micro-batch contributes to the normaliser; the trainer sums it over every
micro-batch and device of an optimizer step to get ``num_items``. ``loss`` returns the micro-batch's
*contribution*: the sum of its per-item losses divided by ``num_items``. Summing contributions over
micro-batches therefore gives exactly the loss of one big batch, so gradient accumulation and data
parallelism never change the loss scale. Metrics are contributions in the same sense; eval calls
``loss`` with ``num_items=1`` to get sums and divides by the summed counts itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax

from jaxpref.batch_keys import SEQUENCE

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, Metrics]]
"""``loss(model, batch, num_items, *, train: bool) -> (loss, metrics)``."""


@dataclasses.dataclass(frozen=True)
class Objective:
    """A training objective: ``count(batch)`` and ``loss(model, batch, num_items, *, train)``."""

    name: str
    count: Callable[[Batch], jax.Array]
    loss: LossFn
    # Keys of the micro-batch this objective reads; the trainer checks the pipeline provides them.
    batch_keys: tuple[str, ...] = SEQUENCE
    # Prefixes of the sequences in ``batch_keys`` that the model trains on (the trainer counts their
    # tokens): "" for one sequence per row, ``PAIR_SIDES`` for pairs.
    sequences: tuple[str, ...] = ("",)
    # Where the loss gets reference log-probs (``preference.REFERENCE_MODES``): "adapter_off" (the policy
    # with its LoRA adapters off), "model" (a frozen copy: the "reference" companion), "precomputed"
    # (batch keys filled once before training by ``jaxpref.reference_pass``) or "none"; None: no such loss.
    reference: str | None = None
    # The model ends in a scalar score head (reward models) instead of the LM head.
    score_head: bool = False
    # Frozen models the loss reads, by name ("teacher", "reference"); the trainer passes them as
    # ``loss(..., companions={name: model})``. Empty: ``loss`` is called without that keyword.
    companions: tuple[str, ...] = ()
    # Which pipeline feeds it: "lm" (SFT/KD batches), "preference" (pairs or KTO rows) or "prompts"
    # (GRPO: prompts whose completions are sampled and scored during training).
    data: str = "lm"
    # Values that change over the run (the KD temperature schedule): ``schedules(total_steps)`` gives
    # {batch key: f(step) -> float32 scalar}; the trainer adds them to every micro-batch and logs them.
    schedules: Callable[[int], Mapping[str, Callable[[jax.Array], jax.Array]]] | None = None
