"""Data: tokenizer loading, dataset sources, row formats, the Grain pipeline, the bad-row report.

Trainer-facing API (``settings``: the run's ``DataSettings``, built once from the validated config)::

    settings = DataSettings.from_config(cfg)
    tokenizer = load_tokenizer(settings)
    data = build_lm_data(settings, tokenizer, shard_index=..., shard_count=..., micro_batch_size=...)
    data.report, data.micro_batches_per_epoch, data.train_iterator(num_epochs), data.eval_batches()

With ``streaming: true`` datasets ``build_lm_data`` returns a ``streaming.StreamingData`` with the same
API; its ``micro_batches_per_epoch`` is None (unknown) and the run needs ``max_steps``.
"""

from jaxpref.data.formats import BadRow, get_format, known_types, register_format
from jaxpref.data.lm import build_lm_data
from jaxpref.data.pipeline import LMData
from jaxpref.data.preference import PreferenceData, build_preference_data
from jaxpref.data.report import DataReport
from jaxpref.data.settings import DataSettings
from jaxpref.data.tokenizer import load_tokenizer

__all__ = [
    "BadRow",
    "DataReport",
    "DataSettings",
    "LMData",
    "PreferenceData",
    "build_lm_data",
    "build_preference_data",
    "get_format",
    "known_types",
    "load_tokenizer",
    "register_format",
]
