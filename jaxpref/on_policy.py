"""On-policy distillation (GKD, TRL's ``GKDTrainer`` ``lmbda``): some steps train on the student's own samples.

With ``kd_on_policy_ratio`` r > 0, optimizer step s is on-policy when
``floor((s + 1) * r) > floor(s * r)``: exactly floor(N * r) of the first N steps, a function of the step
number alone (a resumed run picks the same steps). On such a step the loop hands the step's
micro-batches to :func:`on_policy_batches` before the train step:

* every packed segment of every micro-batch gives one prompt: the segment's tokens before its first
  trained token (token t + 1 is trained where ``loss_mask[t]``);
* the current student (adapters on) samples a completion of each prompt with ``jaxpref.generation``
  (``kd_on_policy_temperature``, ``kd_on_policy_max_new_tokens``, the tokenizer's stop tokens), cut to
  ``sequence_len`` with its prompt;
* each micro-batch is rebuilt from its prompts + completions, one sequence per row (right-padded;
  rows hold several sequences, first fit in order, only when there are more sequences than rows; a
  sequence that fits nowhere is dropped and counted), T = the longest row rounded up to a multiple of
  64, at most ``sequence_len``, the same for all micro-batches of the step. The completion tokens (the
  stop token that ended one included) are trained, the prompt is not.

On a mesh (the trainer's, ``OnPolicyStep(mesh=)``) the student samples sharded as it trains
(``jaxpref.generation.placement``); with several processes each process's micro-batches are its own
rows: it passes their prompts and gets their completions back, and the processes agree on the step's
T (a cross-process max), so the global micro-batches keep one shape. The stats are sums over processes.

The teacher then scores the new sequences: ``kd_teacher_model`` inside the train step as always, a
teacher server through ``ServedTargets`` (asked synchronously here). Stored targets cannot score new
sequences, hence the config check.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxpref.batch_keys import KD_TARGETS
from jaxpref.data.packing import bucket_length
from jaxpref.generation.sampler import SamplingSettings, generate
from jaxpref.served_targets import segments

NumpyBatch = dict[str, np.ndarray]
KEYS = ("input_ids", "labels", "loss_mask", "segment_ids", "positions")


def is_on_policy(step: int, ratio: float) -> bool:
    """Whether optimizer step ``step`` (0-based) samples on-policy: floor((s + 1) r) > floor(s r)."""
    return ratio > 0 and math.floor((step + 1) * ratio) > math.floor(step * ratio)


@dataclasses.dataclass(frozen=True)
class OnPolicySettings:
    ratio: float
    max_new_tokens: int
    temperature: float
    sequence_len: int
    stop_token_ids: tuple[int, ...] = ()

    @property
    def sampling(self) -> SamplingSettings:
        return SamplingSettings(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, stop_token_ids=self.stop_token_ids
        )


def prompts_of(batch: NumpyBatch) -> list[list[int]]:
    """The prompt of every packed segment with a trained token (in ``segments`` order)."""
    out = []
    for b, span in segments(batch):
        trained = np.flatnonzero(batch["loss_mask"][b, span])
        if trained.size:
            out.append(batch["input_ids"][b, span][: int(trained[0]) + 1].tolist())
    return out


def _place(lengths: Sequence[int], rows: int, capacity: int) -> list[int | None]:
    """Row of each sequence: one per row when they are no more than the rows, else first fit in order
    (None: fits nowhere)."""
    if len(lengths) <= rows:
        return list(range(len(lengths)))
    free = [capacity] * rows
    out: list[int | None] = []
    for n in lengths:
        row = next((r for r in range(rows) if free[r] >= n), None)
        if row is not None:
            free[row] -= n
        out.append(row)
    return out


def _longest_row(place: Sequence[int | None], lengths: Sequence[int], rows: int) -> int:
    used = [0] * rows
    for row, n in zip(place, lengths):
        if row is not None:
            used[row] += n
    return max(used, default=1)


def build_batch(
    template: NumpyBatch, sequences: Sequence[tuple[list[int], list[int]]], place: Sequence[int | None], length: int
) -> NumpyBatch:
    """The micro-batch of (prompt, completion) ``sequences`` in rows ``place`` (:func:`_place`), T =
    ``length``, with ``template``'s rows and dtypes."""
    rows = template["input_ids"].shape[0]
    batch = {k: np.zeros((rows, length), template[k].dtype) for k in KEYS}
    fill = [0] * rows
    segment = [0] * rows
    for row, (prompt, completion) in zip(place, sequences):
        if row is None:
            continue
        ids = np.asarray(prompt + completion)
        start, n = fill[row], len(ids)
        span = slice(start, start + n)
        segment[row] += 1
        batch["input_ids"][row, span] = ids
        batch["labels"][row, start : start + n - 1] = ids[1:]
        batch["loss_mask"][row, start + len(prompt) - 1 : start + n - 1] = True
        batch["segment_ids"][row, span] = segment[row]
        batch["positions"][row, span] = np.arange(n)
        fill[row] += n
    return batch


def _across_processes(longest: int, dropped: int, tokens: int) -> tuple[int, int, int]:
    """(max of ``longest``, sums of ``dropped`` and ``tokens``) over all processes."""
    if jax.process_count() == 1:
        return longest, dropped, tokens
    table = multihost_utils.process_allgather(np.array([longest, dropped, tokens], np.int64))
    return int(table[:, 0].max()), int(table[:, 1].sum()), int(table[:, 2].sum())


def on_policy_batches(
    model: Any,
    micro_batches: Sequence[NumpyBatch],
    settings: OnPolicySettings,
    key: jax.Array,
    mesh: Mesh | None = None,
) -> tuple[list[NumpyBatch], dict[str, float]]:
    """The step's micro-batches rebuilt from the student's completions of their prompts (module doc),
    and stats (``on_policy_dropped``: sequences that did not fit, ``completion_tokens``; over all
    processes). ``mesh``: sample on it (this process's micro-batches are its rows), else on one device."""
    prompts = [prompts_of(b) for b in micro_batches]
    flat = [p for ps in prompts for p in ps]
    rows = micro_batches[0]["input_ids"].shape[0]
    result = generate(model, flat, settings.sampling, key=key, use_adapters=True, batch_size=rows, mesh=mesh)
    completions = iter(result.tokens)
    sequences = [[(p, next(completions)[: settings.sequence_len - len(p)]) for p in ps] for ps in prompts]
    lengths = [[len(p) + len(c) for p, c in seqs] for seqs in sequences]
    places = [_place(ns, rows, settings.sequence_len) for ns in lengths]
    longest, dropped, tokens = _across_processes(
        max(_longest_row(place, ns, rows) for place, ns in zip(places, lengths)),
        sum(r is None for place in places for r in place),
        sum(len(c) for seqs in sequences for _, c in seqs),
    )
    # one T for the step (on every process): its micro-batches are stacked into one global array
    t_len = bucket_length(longest, settings.sequence_len)
    built = [build_batch(b, seqs, place, t_len) for b, seqs, place in zip(micro_batches, sequences, places)]
    return built, {"on_policy_dropped": float(dropped), "completion_tokens": float(tokens)}


OFF_POLICY = {"on_policy": 0.0, "sampling_seconds": 0.0, "on_policy_dropped": 0.0, "completion_tokens": 0.0}


class OnPolicyStep:
    """The loop's ``prepare_step`` hook: on the selected steps, the micro-batches rebuilt on-policy.

    ``model()`` gives the current student; ``mesh`` (the trainer's) is where it samples (None: one
    device); ``targets`` (a teacher server's ``ServedTargets``) adds KD
    targets to the rebuilt micro-batches, None when the teacher runs in the train step. The sampling key
    of step s is ``fold_in(key(seed), s)``. Every step reports the same metrics (``OFF_POLICY``: 0
    off-policy): ``on_policy`` (1/0), ``sampling_seconds``, ``on_policy_dropped``, ``completion_tokens``;
    so the logging window's means are the on-policy share and the mean sampling time per step (the loop
    adds ``sampling_share`` of the step time); ``total_sampling_s`` sums the sampling time.
    """

    def __init__(
        self,
        model: Callable[[], Any],
        settings: OnPolicySettings,
        seed: int,
        targets: Callable[[NumpyBatch], NumpyBatch] | None = None,
        mesh: Mesh | None = None,
    ):
        self.model, self.settings, self.targets, self.mesh = model, settings, targets, mesh
        self.key = jax.random.key(seed)
        self.total_sampling_s = 0.0
        self.steps = 0

    def __call__(self, step: int, micro: list[NumpyBatch]) -> tuple[list[NumpyBatch], dict[str, float]]:
        if not is_on_policy(step, self.settings.ratio):
            return micro, dict(OFF_POLICY)
        start = time.perf_counter()
        plain = [{k: v for k, v in b.items() if k not in KD_TARGETS} for b in micro]
        key = jax.random.fold_in(self.key, step)
        new, stats = on_policy_batches(self.model(), plain, self.settings, key, mesh=self.mesh)
        seconds = time.perf_counter() - start
        self.total_sampling_s += seconds
        self.steps += 1
        if self.targets is not None:
            new = [self.targets(b) for b in new]
        return new, {"on_policy": 1.0, "sampling_seconds": seconds, **stats}
