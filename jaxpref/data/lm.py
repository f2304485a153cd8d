"""``build_lm_data``: the SFT/KD data of a config, map-style (``pipeline.py``) or streamed
(``streaming.py``, for ``streaming: true`` entries)."""

from __future__ import annotations

import functools

from transformers import PreTrainedTokenizerBase

from jaxpref.data.formats.kd import lm_kind
from jaxpref.data.packing import pack, single_segment
from jaxpref.data.pipeline import EXCESS_LENGTH_STRATEGIES, LMData, ProcessRow, lm_measure, load_examples
from jaxpref.data.settings import DataSettings
from jaxpref.data.streaming import StreamingData, build_streaming_data, streaming_requested
from jaxpref.errors import ConfigError


def build_lm_data(
    settings: DataSettings,
    tokenizer: PreTrainedTokenizerBase,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    micro_batch_size: int | None = None,
) -> LMData | StreamingData:
    """Load, format, filter, pack and shard ``settings.datasets`` (and the eval set) for SFT/KD training.

    ``micro_batch_size`` is per process (default ``settings.micro_batch_size``). Raises :class:`DataError`
    for missing or unreadable datasets and when more than ``settings.max_bad_row_fraction`` (default 0.5)
    of the rows are unusable; the per-reason counts are in ``.report`` / ``.eval_report``. With
    ``streaming: true`` entries: a :class:`streaming.StreamingData` (same API, ``streaming.py``).
    """
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
    sequence_len = int(settings.sequence_len)
    strategy = settings.excess_length_strategy
    if strategy not in EXCESS_LENGTH_STRATEGIES:
        raise ConfigError(f"excess_length_strategy: {strategy!r} is not one of {', '.join(EXCESS_LENGTH_STRATEGIES)}")
    if not settings.datasets:
        raise ConfigError("`datasets` is empty: add at least one dataset entry")
    seed = int(settings.seed)
    make_processor = functools.partial(ProcessRow, sequence_len=sequence_len, excess_length_strategy=strategy)
    kind = lm_kind(settings)  # "kd": chat_template rows with teacher targets (formats/kd.py)
    packing = bool(settings.sample_packing)
    micro_batch_size = int(micro_batch_size or settings.micro_batch_size)
    fixed_length = packing or bool(settings.pad_to_sequence_len)
    if streaming_requested(settings):
        return build_streaming_data(
            settings,
            tokenizer,
            kind=kind,
            make_processor=make_processor,
            measure=lm_measure,
            shard_index=shard_index,
            shard_count=shard_count,
            micro_batch_size=micro_batch_size,
            fixed_length=fixed_length,
        )
    train, evals, report, eval_report = load_examples(settings, tokenizer, kind=kind, make_processor=make_processor)

    if packing:
        train, evals = pack(train, sequence_len), pack(evals, sequence_len)
    else:
        train, evals = [single_segment(e) for e in train], [single_segment(e) for e in evals]
    for rep, examples in ((report, train), (eval_report, evals)):
        if rep is not None:
            rep.sequences = len(examples)
            rep.sequence_len = sequence_len if packing else 0

    return LMData(
        train,
        evals,
        report=report,
        eval_report=eval_report,
        micro_batch_size=micro_batch_size,
        eval_batch_size=int(settings.eval_batch_size),
        shard_index=shard_index,
        shard_count=shard_count,
        sequence_len=sequence_len,
        fixed_length=fixed_length,
        seed=seed,
    )
