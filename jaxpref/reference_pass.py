"""``precompute_ref_log_probs``: reference log-probs computed once, before training, stored with the data
(a step of the run, between building the data and the trainer; ``assembly.build_trainer`` calls it).

The reference is the model before training with its adapters switched off (``use_adapters=False``):
with full fine-tuning that *is* the initial policy, with LoRA it is the base model (what a frozen
copy or the adapter-off forward gives online). One pass over the train and eval examples, in stored
order, computes per example the summed completion log-probs

* pairs: ``ref_chosen_logps``, ``ref_rejected_logps``;
* KTO: ``ref_logps`` and ``ref_kl_logps``. The KL term needs log-probs of a *fixed* mismatched pair,
  so each example gets a fixed partner first, ``kl_completion_ids`` = the completion of the example
  before it in stored order (cyclically), which the collator then uses instead of rotating within
  the micro-batch (TRL 1.16 likewise fixes the KL pairs when it prepares the dataset).

The values are attached to the examples (batches then carry them; the objective reads them and
runs only the policy). With ``dataset_prepared_path`` they are also written next to the prepared
data, as ``ref-logps-<key>/{train,eval}.npz``, keyed by the prepared data's key and a fingerprint of
the reference model (checkpoint file stats or random-init seed, dtypes), so a changed model or
changed data computes them again. Multi-process: every process holds every example; the pass runs
over global batches (each process feeds its slice) and every process receives all values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxpref import sharding as shd
from jaxpref.batch_keys import REF_KTO, REF_PAIR
from jaxpref.data.cache import PreparedCache, file_stats
from jaxpref.data.packing import bucket_length
from jaxpref.data.preference import (
    CollateKTO,
    PreferenceData,
    collate_pairs,
    kto_longest,
    pair_longest,
    preference_kind,
)
from jaxpref.data.settings import DataSettings
from jaxpref.errors import ConfigError
from jaxpref.objectives.preference import concat_sides, sequence_stats
from jaxpref.objectives.sft import kernel_options

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def needs_precompute(cfg: Any, objective: Any) -> bool:
    """True when the objective reads precomputed reference log-probs from its batches."""
    return objective.reference == "precomputed"


def model_fingerprint(cfg: Any) -> dict[str, Any]:
    """What identifies the reference model: checkpoint files (or hub name) / random-init seed, dtypes."""

    source = cfg.base_model_config or cfg.base_model if cfg.random_init_weights else cfg.base_model
    local = os.path.expanduser(str(source))
    files = file_stats(local) if os.path.exists(local) else [(str(source), -1, -1)]
    return {
        "model": str(source),
        "files": sorted(files),
        "random_init": bool(cfg.random_init_weights),
        "seed": int(cfg.seed) if cfg.random_init_weights else None,
        "param_dtype": cfg.param_dtype,
        "compute_dtype": cfg.compute_dtype,
    }


def assign_kl_partners(examples: list[dict[str, Any]]) -> None:
    """KTO: fix each example's mismatched completion to that of the previous example (cyclic)."""
    completions = [e["completion_ids"] for e in examples]
    for i, e in enumerate(examples):
        e["kl_completion_ids"] = np.asarray(completions[i - 1])


def _reference_fn(model: Any, mesh: Any, kind: str, kopts: dict[str, Any]) -> Callable:
    graphdef, state = nnx.split(model)
    prefixes = ("", "kl_") if kind == "kto" else ("chosen_", "rejected_")

    @jax.jit
    def logps(state: Any, batch: dict[str, jax.Array]) -> jax.Array:
        m = nnx.merge(graphdef, state)
        stats = sequence_stats(m, concat_sides(batch, prefixes), train=False, use_adapters=False, kopts=kopts)
        return jax.lax.with_sharding_constraint(stats.logps, NamedSharding(mesh, PartitionSpec()))

    return lambda batch: logps(state, batch)


def reference_logps_for(
    examples: list[dict[str, Any]],
    model: Any,
    mesh: Any,
    *,
    kind: str,
    batch_size: int,
    sequence_len: int,
    kopts: dict[str, Any],
) -> dict[str, np.ndarray]:
    """Reference log-probs [len(examples)] per key (``REF_PAIR`` or ``REF_KTO``), in order.

    ``batch_size`` rows per process per forward pass; each process collates rows ``s::shard_count``
    of each global batch, as the data pipeline does.
    """
    keys = REF_KTO if kind == "kto" else REF_PAIR
    n = len(examples)
    out = {k: np.zeros(n, np.float32) for k in keys}
    if not n:
        return out
    shards, me = jax.process_count(), jax.process_index()
    per_global = batch_size * shards
    fn = _reference_fn(model, mesh, kind, kopts)
    collate = CollateKTO(sequence_len) if kind == "kto" else collate_pairs
    for first in range(0, n, per_global):
        rows = examples[first : first + per_global]
        longest = kto_longest(rows, shard_count=1, sequence_len=sequence_len) if kind == "kto" else pair_longest(rows)
        length = bucket_length(int(longest), sequence_len)
        index = [first + b * shards + me for b in range(batch_size)]
        mine = [examples[g] if g < n else None for g in index]
        batch = {k: v for k, v in collate(mine, length).items() if k not in keys}
        values = np.asarray(jax.device_get(fn(shd.global_batch(batch, mesh))))  # [2 * per_global]
        half = values.shape[0] // 2
        for s in range(shards):  # the global batch is the processes' local batches in process order
            for b in range(batch_size):
                g = first + b * shards + s
                if g < n:
                    out[keys[0]][g] = values[s * batch_size + b]
                    out[keys[1]][g] = values[half + s * batch_size + b]
    return out


def _cache_dir(cfg: Any, tokenizer: Any, kind: str) -> Path | None:
    if not cfg.dataset_prepared_path:
        return None

    data_key = PreparedCache(DataSettings.from_config(cfg), tokenizer, kind).key
    material = {"version": FORMAT_VERSION, "data": data_key, "model": model_fingerprint(cfg), "kind": kind}
    key = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return Path(cfg.dataset_prepared_path) / f"ref-logps-{key}"


def precompute_reference(cfg: Any, data: Any, model: Any, mesh: Any, tokenizer: Any) -> None:
    """Attach reference log-probs to ``data``'s train and eval examples (from the cache when present)."""

    if not isinstance(data, PreferenceData):
        raise ConfigError(
            "precompute_ref_log_probs needs map-style datasets (their examples are stored); it does not work "
            "with streaming: true. Turn one of them off."
        )
    kind = preference_kind(DataSettings.from_config(cfg))
    cache = _cache_dir(cfg, tokenizer, kind)
    splits = {split: data.examples(split) for split in ("train", "eval")}
    if kind == "kto":
        for examples in splits.values():
            assign_kl_partners(examples)
    batch_size = int(cfg.eval_batch_size or cfg.micro_batch_size)
    for split, examples in splits.items():
        if not examples:
            continue
        path = None if cache is None else cache / f"{split}.npz"
        values = _load(path, len(examples))
        if values is None:
            log.info("precomputing reference log-probs for %d %s examples", len(examples), split)
            values = reference_logps_for(
                examples,
                model,
                mesh,
                kind=kind,
                batch_size=batch_size,
                sequence_len=int(cfg.sequence_len),
                kopts=kernel_options(cfg),
            )
            if path is not None and jax.process_index() == 0:
                _save(path, values)
        else:
            log.info("using the reference log-probs in %s", path)
        for i, e in enumerate(examples):
            for k, v in values.items():
                e[k] = np.float32(v[i])


def _load(path: Path | None, n: int) -> dict[str, np.ndarray] | None:
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path) as f:
            values = {k: np.asarray(f[k]) for k in f.files}
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable reference log-probs %s (%s)", path, e)
        return None
    if any(v.shape != (n,) for v in values.values()):
        log.warning("ignoring reference log-probs %s: they do not match the %d examples", path, n)
        return None
    return values


def _save(path: Path, values: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    try:
        np.savez(tmp, **values)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not write the reference log-probs to %s (%s)", path, e)
        tmp.unlink(missing_ok=True)


def prepare_preference_run(cfg: Any, objective: Any, model: Any, data: Any, mesh: Any, tokenizer: Any) -> None:
    """Run set-up that preference objectives need once ``model`` and ``data`` exist (before the Trainer):
    the reward model's score head, TRL's KTO weight warning, and the reference log-prob pass."""
    if objective.score_head:
        from jaxpref.models.reward import add_score_head

        add_score_head(model, seed=int(cfg.seed) + 2)
    if objective.name == "kto" and hasattr(data, "examples"):
        from jaxpref.objectives.kto import check_kto_balance

        check_kto_balance(cfg, data.examples("train"))
    if needs_precompute(cfg, objective):
        precompute_reference(cfg, data, model, mesh, tokenizer)
