"""The preference data pipeline: chosen/rejected pairs (DPO, IPO, SimPO, ORPO, reward models) and KTO.

``settings.rl == "kto"`` builds KTO batches from ``"kto"`` formats; any other ``rl`` or ``reward_model: true``
builds pair batches from ``"preference"`` formats (docs/design.md "Batches" has both tables).
Loading, shuffling, the eval split, the per-row bad-row report, the epoch reshuffle, sharding of global
batches across processes, padding of the last batch and bucketing of T are the LM pipeline's
(``pipeline.load_examples``, ``pipeline.MicroBatches``); only the per-row processing and the collation
differ. Pairs are never packed: one pair per row, one segment per sequence.

Per row: the format gives prompt and completion ids (``formats/preference.py``); each sequence is
prompt + completion, shifted into prediction-aligned ``labels`` / ``loss_mask`` (the predictions of
completion tokens). Rows longer than ``sequence_len`` follow ``excess_length_strategy``: ``drop``,
``raise``, or ``truncate`` = TRL 1.16's ``max_length`` truncation (``truncation_mode="keep_start"``):
each sequence keeps its first ``sequence_len`` tokens (the whole prompt, the start of the completion),
and a row whose prompt alone fills ``sequence_len`` is dropped (no completion token would be left).

KTO's mismatched pairs (for the KL estimate) are built per micro-batch, as TRL's ``KTOTrainer`` builds
them per batch: row i's prompt with row i-1's completion, cyclically over the real rows of the
micro-batch (row 0 takes the last row's completion), cut to ``sequence_len`` (keep start).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from jaxpref.batch_keys import REF_KTO, REF_PAIR, SEQUENCE
from jaxpref.data.formats import BadRow, Example, RowFormatter
from jaxpref.data.packing import collate, single_segment
from jaxpref.data.pipeline import EXCESS_LENGTH_STRATEGIES, Dropped, LMData, load_examples, shift
from jaxpref.data.settings import DataSettings
from jaxpref.data.streaming import StreamingData, build_streaming_data, streaming_requested
from jaxpref.errors import ConfigError

log = logging.getLogger(__name__)

PAIR_SIDES = {"chosen_": "chosen_ids", "rejected_": "rejected_ids"}  # batch key prefix -> completion ids
KTO_SIDES = {"": "completion_ids"}
_TEMPLATE = {
    "input_ids": np.zeros(0, np.int32),
    "labels": np.zeros(0, np.int32),
    "loss_mask": np.zeros(0, bool),
    "segment_ids": np.zeros(0, np.int32),
    "positions": np.zeros(0, np.int32),
}


def preference_kind(settings: DataSettings) -> str:
    """``"kto"`` for ``rl: kto``, ``"preference"`` for the other ``rl`` values and ``reward_model: true``."""
    rl = settings.rl
    if rl == "kto":
        return "kto"
    if rl or settings.reward_model:
        return "preference"
    raise ConfigError("Preference data needs `rl` (dpo, ipo, orpo, simpo, kto) or `reward_model: true`")


def sequence(prompt: np.ndarray, completion: np.ndarray, sequence_len: int) -> Example:
    """prompt [P] + completion [C], first ``sequence_len`` tokens kept, shifted: ``input_ids``,
    ``labels``, ``loss_mask`` [min(P + C, sequence_len)] (trainable = predictions of completion tokens)."""
    ids = np.concatenate([prompt, completion]).astype(np.int32)[:sequence_len]
    trainable = np.zeros(len(ids), dtype=bool)
    trainable[len(prompt) :] = True
    return shift({"input_ids": ids, "trainable": trainable})


class ProcessPreference:
    """Grain map: raw row -> (example, truncated) or :class:`Dropped`.

    The example holds, per side (``sides``: batch key prefix -> completion key of the format),
    ``<prefix>input_ids`` / ``labels`` / ``loss_mask`` [L_side]; with ``keep_parts`` (KTO) also the
    format's ``prompt_ids``, ``completion_ids`` and ``desirable``, from which the KL sequences are built.
    """

    def __init__(
        self,
        formatter: RowFormatter,
        *,
        sides: dict[str, str],
        sequence_len: int,
        excess_length_strategy: str,
        keep_parts: bool = False,
    ):
        self.formatter = formatter
        self.sides = sides
        self.sequence_len = sequence_len
        self.truncate = excess_length_strategy == "truncate"
        self.keep_parts = keep_parts

    def __call__(self, row: dict[str, Any]) -> tuple[Example, bool] | Dropped:
        try:
            parts = self.formatter(row)
        except BadRow as e:
            return Dropped(e.reason, e.detail, row)
        except Exception as e:  # a formatter bug or an odd row must not stop the run
            return Dropped("format_error", f"{type(e).__name__}: {e}", row)
        prompt, n = parts["prompt_ids"], self.sequence_len
        longest = len(prompt) + max(len(parts[key]) for key in self.sides.values())
        truncated = longest > n
        if truncated and not self.truncate:
            return Dropped("too_long", f"{longest} tokens > sequence_len {n}", row)
        if truncated and len(prompt) >= n:
            return Dropped("too_long", f"the prompt alone has {len(prompt)} tokens >= sequence_len {n}", row)
        example = dict(parts) if self.keep_parts else {}
        for prefix, key in self.sides.items():
            seq = sequence(prompt, parts[key], n)
            if not seq["loss_mask"].any():
                return Dropped("no_trainable_tokens", f"no trainable token in {key}", row)
            example.update({prefix + k: v for k, v in seq.items()})
        return example, truncated


def measure(example: Example, sides: dict[str, str]) -> tuple[int, int, int]:
    """(longest sequence, trainable positions, tokens) over the sides of a kept example."""
    lengths = [len(example[p + "input_ids"]) for p in sides]
    return max(lengths), sum(int(example[p + "loss_mask"].sum()) for p in sides), sum(lengths)


def pad_sequences(seqs: list[Example | None], length: int, prefix: str = "") -> dict[str, np.ndarray]:
    """Shifted sequences (None = padding row) -> the five [B, length] keys of one side, prefixed."""
    batch = collate([single_segment(s) if s is not None else None for s in seqs], length, template=_TEMPLATE)
    return {prefix + k: batch[k] for k in SEQUENCE}


def _side(row: Example | None, prefix: str) -> Example | None:
    return None if row is None else {k: row[prefix + k] for k in ("input_ids", "labels", "loss_mask")}


def pair_longest(rows: list[Example]) -> int:
    return max(max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in rows)


def collate_pairs(rows: list[Example | None], length: int) -> dict[str, np.ndarray]:
    """Pair micro-batch: ``chosen_*`` / ``rejected_*`` [B, length] and ``pair_mask`` [B]."""
    batch = {}
    for prefix in PAIR_SIDES:
        batch.update(pad_sequences([_side(r, prefix) for r in rows], length, prefix))
    batch["pair_mask"] = np.array([r is not None for r in rows], dtype=bool)
    batch.update(reference_columns(rows, REF_PAIR))
    return batch


# Reference log-probs computed once before training (``precompute_ref_log_probs``), per example.


def reference_columns(rows: list[Example | None], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """float32 [B] columns of the per-example scalars ``keys`` (0 for padding rows); {} when the
    examples carry none (no precomputed reference)."""
    first = next((r for r in rows if r is not None), None)
    if first is None or keys[0] not in first:
        return {}
    return {k: np.array([0.0 if r is None else float(r[k]) for r in rows], dtype=np.float32) for k in keys}


def kl_sequences(rows: list[Example], sequence_len: int) -> list[Example]:
    """Row i's prompt with row i-1's completion (row 0: the last row's), as TRL's KTOTrainer rotates.

    Examples with a fixed partner (``kl_completion_ids``, set when reference log-probs are
    precomputed, since those must belong to a fixed mismatched pair) use it instead.
    """
    return [
        sequence(
            r["prompt_ids"],
            r["kl_completion_ids"] if "kl_completion_ids" in r else rows[i - 1]["completion_ids"],
            sequence_len,
        )
        for i, r in enumerate(rows)
    ]


def kto_longest(rows: list[Example], *, shard_count: int, sequence_len: int) -> int:
    """Longest matched or KL sequence of a global batch; shard s collates ``rows[s::shard_count]``."""
    longest = max(len(r["input_ids"]) for r in rows)
    for s in range(shard_count):
        mine = rows[s::shard_count]
        longest = max([longest, *(len(k["input_ids"]) for k in kl_sequences(mine, sequence_len))])
    return longest


class CollateKTO:
    """KTO micro-batch: matched and ``kl_`` sequences [B, length], ``desirable``, ``example_mask`` [B]."""

    def __init__(self, sequence_len: int):
        self.sequence_len = sequence_len

    def __call__(self, rows: list[Example | None], length: int) -> dict[str, np.ndarray]:
        real = [r for r in rows if r is not None]  # padding rows come last
        kl: list[Example | None] = [*kl_sequences(real, self.sequence_len), *[None] * (len(rows) - len(real))]
        batch = pad_sequences([_side(r, "") for r in rows], length)
        batch.update(pad_sequences(kl, length, "kl_"))
        batch["desirable"] = np.array([r is not None and bool(r["desirable"]) for r in rows], dtype=bool)
        batch["example_mask"] = np.array([r is not None for r in rows], dtype=bool)
        batch.update(reference_columns(rows, REF_KTO))
        return batch


class PreferenceData(LMData):
    """Micro-batches of one process's shard; the API of :class:`LMData`. Build with :func:`build_preference_data`.

    Pair batches ([B, T] per side, one row per pair): ``chosen_input_ids``, ``chosen_labels``,
    ``chosen_loss_mask``, ``chosen_positions``, ``chosen_segment_ids``, the same five ``rejected_*``,
    ``pair_mask`` bool [B]. KTO batches: ``input_ids``, ``labels``, ``loss_mask``, ``positions``,
    ``segment_ids``, the same five ``kl_*`` (mismatched pairs), ``desirable`` and ``example_mask``
    bool [B]. ids/labels/positions/segment_ids int32, masks bool; padding rows are all zero/False.
    The report counts tokens and trainable positions of both sides (pairs) or of the matched sequence (KTO).
    With precomputed reference log-probs (``jaxpref.reference_pass``) the examples carry them
    and batches add ``ref_chosen_logps``/``ref_rejected_logps`` (pairs) or ``ref_logps``/``ref_kl_logps``
    (KTO), float32 [B].
    """

    def examples(self, split: str) -> list[Example]:
        """The examples (every shard's, in stored order) of ``"train"`` or ``"eval"``; mutable in place."""
        source = self._train if split == "train" else self._eval
        return [] if source is None else source.examples


def build_preference_data(
    settings: DataSettings,
    tokenizer: PreTrainedTokenizerBase,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    micro_batch_size: int | None = None,
) -> PreferenceData | StreamingData:
    """Load, format, filter and shard ``settings.datasets`` (and the eval set) for preference training.

    Pairs for ``rl`` dpo/ipo/simpo/orpo and ``reward_model``, KTO rows for ``rl: kto`` (module docstring).
    ``micro_batch_size`` is per process (default ``settings.micro_batch_size``). Raises :class:`DataError`
    for missing or unreadable datasets and when more than ``settings.max_bad_row_fraction`` of the rows are
    unusable; the per-reason counts are in ``.report`` / ``.eval_report``. With ``streaming: true``
    entries: a :class:`streaming.StreamingData` (same API; T = ``sequence_len``).
    """
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
    kind = preference_kind(settings)
    sequence_len = int(settings.sequence_len)
    strategy = settings.excess_length_strategy
    if strategy not in EXCESS_LENGTH_STRATEGIES:
        raise ConfigError(f"excess_length_strategy: {strategy!r} is not one of {', '.join(EXCESS_LENGTH_STRATEGIES)}")
    if not settings.datasets:
        raise ConfigError("`datasets` is empty: add at least one dataset entry")
    if settings.sample_packing:
        log.warning("sample_packing is ignored for preference data: each pair is its own sequence")
    micro_batch_size = int(micro_batch_size or settings.micro_batch_size)

    sides = KTO_SIDES if kind == "kto" else PAIR_SIDES
    make_processor = functools.partial(
        ProcessPreference,
        sides=sides,
        sequence_len=sequence_len,
        excess_length_strategy=strategy,
        keep_parts=kind == "kto",
    )
    batching: dict[str, Callable]
    if kind == "kto":  # micro_batch_size >= 2 (the KL pairs) is checked with the config
        longest = functools.partial(kto_longest, shard_count=shard_count, sequence_len=sequence_len)
        batching = {"longest": longest, "collate_fn": CollateKTO(sequence_len)}
    else:
        batching = {"longest": pair_longest, "collate_fn": collate_pairs}
    if streaming_requested(settings):
        return build_streaming_data(
            settings,
            tokenizer,
            kind=kind,
            make_processor=make_processor,
            measure=functools.partial(measure, sides=sides),
            shard_index=shard_index,
            shard_count=shard_count,
            micro_batch_size=micro_batch_size,
            fixed_length=bool(settings.pad_to_sequence_len),
            batching=batching,
        )

    train, evals, report, eval_report = load_examples(
        settings, tokenizer, kind=kind, make_processor=make_processor, measure=functools.partial(measure, sides=sides)
    )
    for rep, examples in ((report, train), (eval_report, evals)):
        if rep is not None:
            rep.sequences = len(examples)
    return PreferenceData(
        train,
        evals,
        report=report,
        eval_report=eval_report,
        micro_batch_size=micro_batch_size,
        eval_batch_size=int(settings.eval_batch_size),
        shard_index=shard_index,
        shard_count=shard_count,
        sequence_len=sequence_len,
        fixed_length=bool(settings.pad_to_sequence_len),
        seed=int(settings.seed),
        batching=batching,
    )
