"""GRPO's rollout: each step's prompts -> groups of sampled completions -> rewards -> advantages -> batches.

The loop hands :class:`GRPORollout` (its ``prepare_step`` hook) one prompt batch per optimizer step
(``data/prompts.py``: micro_batch_size x gradient_accumulation_steps / G prompts on this process). The
current policy (adapters on) samples G = ``trl.num_generations`` completions of each prompt with
``jaxpref.generation`` (``trl.temperature``/``top_p``/``top_k``, at most ``trl.max_completion_length``
new tokens, the tokenizer's stop tokens; the key of step s is ``fold_in(key(seed), s // mu)``, so a resumed
run samples the same). The reward functions score the decoded completions (``reward_calls.py``), the
advantages are normalised within each group of G (``rewards.group_advantages``, TRL's formulas), and
the completions become ``gradient_accumulation_steps`` micro-batches of micro_batch_size rows: one prompt +
completion per row (right-padded, T = the longest rounded up to a multiple of 64, at most
``sequence_len``; the same T for the whole step), ``loss_mask`` on the completion's tokens (the stop token
that ended one included; off for completions cut at the length limit with ``mask_truncated_completions``),
the row's ``advantages``, and ``old_logps`` (batch_keys.GRPO).

With ``trl.num_iterations`` = mu > 1 a batch of completions trains mu consecutive steps (the data gives
the same prompts mu times): ``old_logps`` are the sampling policy's log-probs, computed once, before the
first of those steps (after a resume in the middle of such a run of steps the completions are sampled
again from the resumed policy).

Metrics per step, under TRL's names: ``reward``, ``reward_std``, ``rewards/<function>/mean`` and ``/std``,
``frac_reward_zero_std``, ``completions/mean_length``, ``/min_length``, ``/max_length``,
``/clipped_ratio``, ``/mean_terminated_length``; and ``sampling_seconds``, ``reward_seconds`` (the loop
derives ``sampling_share`` of the step time).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import TrainerState

from jaxpref.data.formats.prompts import is_conversation
from jaxpref.data.packing import bucket_length
from jaxpref.generation.sampler import SamplingSettings, generate
from jaxpref.objectives.grpo import token_logps
from jaxpref.reward_calls import RewardFunctions
from jaxpref.rewards import group_advantages

logger = logging.getLogger("jaxpref")

NumpyBatch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    """What the rollout reads of the run's config (``from_config``), resolved once."""

    num_generations: int
    max_completion_length: int
    temperature: float
    top_p: float
    top_k: int
    micro_batch_size: int  # rows (completions) per micro-batch
    micro_batches: int  # per step: gradient_accumulation_steps
    sequence_len: int
    num_iterations: int
    mask_truncated_completions: bool
    scale_rewards: str
    aggregation: str
    reward_weights: tuple[float, ...]
    log_completions: bool
    stop_token_ids: tuple[int, ...]

    @classmethod
    def from_config(cls, cfg: Any, stop_token_ids: Sequence[int]) -> RolloutSettings:
        trl = cfg.trl
        return cls(
            num_generations=trl.num_generations,
            max_completion_length=trl.max_completion_length,
            temperature=trl.temperature,
            top_p=trl.top_p,
            top_k=trl.top_k,
            micro_batch_size=cfg.micro_batch_size,
            micro_batches=cfg.gradient_accumulation_steps,
            sequence_len=cfg.sequence_len,
            num_iterations=trl.num_iterations,
            mask_truncated_completions=trl.mask_truncated_completions,
            scale_rewards=trl.scale_rewards,
            aggregation=trl.multi_objective_aggregation,
            reward_weights=tuple(trl.reward_weights or [1.0] * len(trl.reward_funcs)),
            log_completions=trl.log_completions,
            stop_token_ids=tuple(stop_token_ids),
        )

    @property
    def sampling(self) -> SamplingSettings:
        return SamplingSettings(
            max_new_tokens=self.max_completion_length,
            temperature=self.temperature,
            top_k=self.top_k or None,
            top_p=self.top_p,
            stop_token_ids=self.stop_token_ids,
        )


@dataclasses.dataclass
class Rollout:
    """Completions of one prompt batch: per completion (N = prompts x G, grouped by prompt)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    truncated: list[bool]  # cut at max_completion_length or at sequence_len
    rows: list[dict[str, Any]]


def sample_groups(
    model: Any, batch: NumpyBatch, settings: RolloutSettings, key: jax.Array, mesh: Any = None
) -> Rollout:
    """G completions of every real prompt of this process's prompt batch (``data/prompts.py``), grouped by
    prompt; on ``mesh`` (the trainer's) the sampler shards rows and cache as training does."""
    prompts, rows = [], []
    for ids, n, text in zip(batch["prompt_ids"], batch["prompt_lengths"], batch["rows"]):
        if n > 0:
            prompts += [ids[:n].tolist()] * settings.num_generations
            rows += [json.loads(text)] * settings.num_generations
    rows_per_call = settings.micro_batch_size
    result = generate(
        model, prompts, settings.sampling, key=key, use_adapters=True, batch_size=rows_per_call, mesh=mesh
    )
    completions, truncated = [], []
    for prompt, tokens, finished in zip(prompts, result.tokens, result.finished):
        room = settings.sequence_len - len(prompt)
        completions.append(tokens[:room])
        truncated.append(not finished or len(tokens) > room)
    return Rollout(prompts, completions, truncated, rows)


def reward_inputs(rollout: Rollout, tokenizer: Any) -> tuple[list[Any], list[Any], dict[str, list[Any]]]:
    """(prompts, completions, other columns) in TRL's shapes for the reward functions."""
    texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    prompts = [row.get("prompt") for row in rollout.rows]
    conversational = bool(prompts) and is_conversation(prompts[0])
    completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
    keys = [k for k in rollout.rows[0] if k not in ("prompt", "completion", "completion_ids")] if rollout.rows else []
    columns = {k: [row.get(k) for row in rollout.rows] for k in keys}
    return prompts, completions, columns


def build_micro_batches(rollout: Rollout, advantages: np.ndarray, settings: RolloutSettings) -> list[NumpyBatch]:
    """``settings.micro_batches`` micro-batches of ``micro_batch_size`` rows (batch_keys.GRPO; padding
    rows all zero), one T for all of them."""
    rows, count = settings.micro_batch_size, settings.micro_batches
    longest = max((len(p) + len(c) for p, c in zip(rollout.prompt_ids, rollout.completion_ids)), default=1)
    length = bucket_length(longest, settings.sequence_len)
    out = []
    for m in range(count):
        batch = {
            "input_ids": np.zeros((rows, length), np.int32),
            "labels": np.zeros((rows, length), np.int32),
            "loss_mask": np.zeros((rows, length), bool),
            "positions": np.zeros((rows, length), np.int32),
            "segment_ids": np.zeros((rows, length), np.int32),
            "advantages": np.zeros((rows,), np.float32),
            "old_logps": np.zeros((rows, length), np.float32),
        }
        for r in range(rows):
            i = m * rows + r
            if i >= len(rollout.prompt_ids):
                break
            prompt, completion = rollout.prompt_ids[i], rollout.completion_ids[i]
            ids = np.asarray(prompt + completion, np.int32)
            n = len(ids)
            batch["input_ids"][r, :n] = ids
            batch["labels"][r, : n - 1] = ids[1:]
            if not (settings.mask_truncated_completions and rollout.truncated[i]):
                batch["loss_mask"][r, len(prompt) - 1 : n - 1] = True
            batch["positions"][r, :n] = np.arange(n)
            batch["segment_ids"][r, :n] = 1
            batch["advantages"][r] = advantages[i]
        out.append(batch)
    return out


def step_shapes(cfg: Any, longest_prompt: int) -> dict[str, jax.ShapeDtypeStruct]:
    """[accum, micro_batch, ...] shapes of a step's micro-batches when completions run to
    ``trl.max_completion_length`` after a ``longest_prompt``-token prompt (the longest T a step can have)."""
    accum, rows = cfg.gradient_accumulation_steps, cfg.micro_batch_size
    length = bucket_length(longest_prompt + cfg.trl.max_completion_length, cfg.sequence_len)
    ints, floats, bools = np.int32, np.float32, np.bool_
    dtypes = {"input_ids": ints, "labels": ints, "loss_mask": bools, "positions": ints, "segment_ids": ints,
              "old_logps": floats}  # fmt: skip
    out = {k: jax.ShapeDtypeStruct((accum, rows, length), d) for k, d in dtypes.items()}
    out["advantages"] = jax.ShapeDtypeStruct((accum, rows), floats)
    return out


def completion_metrics(rollout: Rollout) -> dict[str, float]:
    """TRL's ``completions/*`` metrics of a rollout."""
    lengths = np.asarray([len(c) for c in rollout.completion_ids], np.float32)
    ended = lengths[~np.asarray(rollout.truncated, bool)]
    return {
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(np.mean(rollout.truncated)),
        "completions/mean_terminated_length": float(ended.mean()) if ended.size else 0.0,
    }


@partial(jax.jit, static_argnames=("graphdef", "temperature"))
def _policy_logps(graphdef: Any, state: Any, batch: dict[str, jax.Array], temperature: float) -> jax.Array:
    return token_logps(nnx.merge(graphdef, state), batch, temperature=temperature, use_adapters=True)


def sampling_policy_logps(model: Any, batch: NumpyBatch, temperature: float) -> np.ndarray:
    """[B, T] log-probs of the labels under ``model`` at ``temperature`` (the rollout's ``old_logps``)."""
    graphdef, state = nnx.split(model)
    keys = ("input_ids", "labels", "loss_mask", "positions", "segment_ids")
    out = _policy_logps(graphdef, state, {k: jnp.asarray(batch[k]) for k in keys}, temperature)
    return np.asarray(out, np.float32) * batch["loss_mask"]


class GRPORollout:
    """The loop's ``prepare_step`` hook for ``rl: grpo`` (module docstring).

    ``model()`` gives the current policy; ``rewards`` the run's reward functions; ``total_steps`` goes to the
    reward functions' ``trainer_state.max_steps``; ``mesh``: the trainer's, which the sampler shards on.
    """

    def __init__(
        self,
        model: Callable[[], Any],
        settings: RolloutSettings,
        rewards: RewardFunctions,
        tokenizer: Any,
        *,
        seed: int,
        total_steps: int,
        mesh: Any = None,
    ):
        self.model, self.settings, self.rewards, self.tokenizer = model, settings, rewards, tokenizer
        self.key = jax.random.key(seed)
        self.total_steps, self.mesh = total_steps, mesh
        self.total_sampling_s = 0.0
        self.steps = 0  # rollouts sampled
        self.evaluation: Callable[[int], dict[str, float]] | None = None  # set by the run: GRPOEval of the step
        self._cached: tuple[int, list[NumpyBatch], dict[str, float]] | None = None

    def __call__(self, step: int, items: list[NumpyBatch]) -> tuple[list[NumpyBatch], dict[str, float]]:
        (batch,) = items  # one prompt batch per step
        group_step = step // self.settings.num_iterations
        if self._cached is not None and self._cached[0] == group_step:
            return self._cached[1], {**self._cached[2], "sampling_seconds": 0.0, "reward_seconds": 0.0}
        model = self.model()
        start = time.perf_counter()
        rollout = sample_groups(model, batch, self.settings, jax.random.fold_in(self.key, group_step), self.mesh)
        sampled = time.perf_counter()
        prompts, completions, columns = reward_inputs(rollout, self.tokenizer)
        state = TrainerState(global_step=step, max_steps=self.total_steps)
        scores = self.rewards(prompts, completions, rollout.completion_ids, columns, state)
        advantages, _, reward_metrics = group_advantages(
            scores,
            np.asarray(self.settings.reward_weights, np.float32),
            self.settings.num_generations,
            scale_rewards=self.settings.scale_rewards,
            aggregation=self.settings.aggregation,
            names=self.rewards.names,
        )
        rewarded = time.perf_counter()
        micro = build_micro_batches(rollout, advantages, self.settings)
        if self.settings.num_iterations > 1:
            for mb in micro:
                mb["old_logps"] = sampling_policy_logps(model, mb, self.settings.temperature)
        metrics = {
            **reward_metrics,
            **completion_metrics(rollout),
            "sampling_seconds": sampled - start,
            "reward_seconds": rewarded - sampled,
        }
        self.total_sampling_s += sampled - start
        self.steps += 1
        if self.settings.log_completions and completions:
            logger.info(
                "step %d: completion 0 %r, rewards %s", step, completions[0],
                dict(zip(self.rewards.names, scores[0].tolist())),
            )  # fmt: skip
        self._cached = (group_step, micro, metrics)
        return micro, metrics


class GRPOEval:
    """Held-out scores by generation for ``rl: grpo``, at each evaluation of the run:

    * as TRL's ``GRPOTrainer`` evaluates: ``trl.num_generations`` completions of every eval prompt sampled
      as in training (temperature, top_p, top_k), scored by the reward functions: ``reward`` (the weighted
      sum) and ``rewards/<function>/mean``, means over all completions. The sampling key is the same at
      every evaluation, so evaluations differ by the policy only;
    * one greedy completion per prompt: ``greedy/reward`` and ``greedy/rewards/<function>/mean``.
    """

    def __init__(
        self, batches: Sequence[NumpyBatch], settings: RolloutSettings, rewards: RewardFunctions, tokenizer: Any,
        *, seed: int = 0, mesh: Any = None,
    ):  # fmt: skip
        self.batches, self.rewards, self.tokenizer, self.mesh = list(batches), rewards, tokenizer, mesh
        self.sampled = settings
        self.greedy = dataclasses.replace(settings, num_generations=1, temperature=0.0, top_k=0, top_p=1.0)
        self.key = jax.random.fold_in(jax.random.key(seed), 2**31 - 1)  # not a training step's key
        self.weights = np.asarray(settings.reward_weights, np.float32)

    def _scores(self, model: Any, settings: RolloutSettings, step: int) -> np.ndarray:
        """Rewards [completions, F] of every eval prompt's completions under ``settings``."""
        scores = []
        for i, batch in enumerate(self.batches):
            rollout = sample_groups(model, batch, settings, jax.random.fold_in(self.key, i), self.mesh)
            if rollout.prompt_ids:
                prompts, completions, columns = reward_inputs(rollout, self.tokenizer)
                state = TrainerState(global_step=step, max_steps=step)
                scores.append(self.rewards(prompts, completions, rollout.completion_ids, columns, state))
        return np.concatenate(scores) if scores else np.zeros((0, len(self.rewards.names)), np.float32)

    def __call__(self, model: Any, step: int) -> dict[str, float]:
        out = {}
        for prefix, settings in (("", self.sampled), ("greedy/", self.greedy)):
            table = self._scores(model, settings, step)
            for j, name in enumerate(self.rewards.names):
                out[f"{prefix}rewards/{name}/mean"] = float(np.nanmean(table[:, j]))
            out[f"{prefix}reward"] = float(np.nanmean(np.nansum(table * self.weights, axis=1)))
        return out
