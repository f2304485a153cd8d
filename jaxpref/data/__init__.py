"""Data: tokenizer loading, dataset sources, row formats, the Grain pipeline, the bad-row report.

Trainer-facing API::

    tokenizer = load_tokenizer(cfg)
    data = build_lm_data(cfg, tokenizer, shard_index=..., shard_count=..., micro_batch_size=...)
    data.report, data.micro_batches_per_epoch, data.train_iterator(num_epochs), data.eval_batches()

With ``streaming: true`` datasets ``build_lm_data`` returns a ``streaming.StreamingData`` with the same
API; its ``micro_batches_per_epoch`` is None (unknown) and the run needs ``max_steps``.
"""

from jaxpref.data.formats import BadRow, get_format, known_types, register_format
from jaxpref.data.lm import build_lm_data
from jaxpref.data.pipeline import LMData
from jaxpref.data.preference import PreferenceData, build_preference_data
from jaxpref.data.report import DataReport
from jaxpref.data.tokenizer import load_tokenizer

__all__ = [
    "BadRow",
    "DataReport",
    "LMData",
    "PreferenceData",
    "build_lm_data",
    "build_preference_data",
    "get_format",
    "known_types",
    "load_tokenizer",
    "register_format",
]
