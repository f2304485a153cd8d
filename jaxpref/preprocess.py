"""``python -m jaxpref.preprocess --config FILE.yaml [--force] [key=value ...]``: prepare the data once.

Runs the config's whole data pipeline (load, format, tokenize, shift, filter, KD targets, packing),
writes the tokenized examples to the cache under ``dataset_prepared_path`` (default
``last_run_prepared``, as axolotl's) and prints the report: rows in/out, drops per reason with an
example, tokens, trainable tokens, a row-length histogram. Training with the same
``dataset_prepared_path`` and an unchanged key (``jaxpref/data/cache.py`` lists what it covers) loads
the examples instead of tokenizing again. Bad input: one paragraph on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from typing import Any, TextIO

import numpy as np

from jaxpref.cli import run_command, setup_logging
from jaxpref.errors import ConfigError

DEFAULT_PREPARED_PATH = "last_run_prepared"
HISTOGRAM_BINS = 8
BAR_WIDTH = 40


def data_builder(settings: Any) -> tuple[str, Callable[..., Any]]:
    """(cache kind, ``build_*_data`` function) for a config: preference data for ``rl``/``reward_model``,
    else language-model data (SFT, or KD with teacher targets)."""
    if settings.rl or settings.reward_model:  # the schema sets them from objective: dpo, reward, ...
        from jaxpref.data.preference import build_preference_data, preference_kind

        return preference_kind(settings), build_preference_data
    from jaxpref.data.formats.kd import lm_kind
    from jaxpref.data.lm import build_lm_data

    return lm_kind(settings), build_lm_data


def example_length(example: dict[str, np.ndarray]) -> int:
    """Tokens of an example's longest sequence (``input_ids``, or the longer side of a pair)."""
    return max(len(v) for k, v in example.items() if k.endswith("input_ids"))


def length_histogram(lengths: list[int], bins: int = HISTOGRAM_BINS) -> list[str]:
    """Text histogram lines ``"  lo-hi | ####  count"``: equal-width bins (lo and hi included) up to the longest."""
    if not lengths:
        return ["  (no rows)"]
    width = max(1, -(-max(lengths) // bins))
    counts = np.bincount((np.maximum(np.asarray(lengths), 1) - 1) // width, minlength=bins)
    digits = len(str(width * bins))
    scale = BAR_WIDTH / max(1, counts.max())
    return [
        f"  {b * width + 1:>{digits}}-{(b + 1) * width:<{digits}} | {'#' * round(c * scale):<{BAR_WIDTH}} {c}"
        for b, c in enumerate(counts)
    ]


def preprocess(cfg: Any, *, force: bool = False, out: TextIO | None = None) -> dict[str, Any]:
    """Run the data pipeline of ``cfg`` through the cache and print the report to ``out`` (stdout).

    Returns ``{"kind", "cache", "hit", "reports": [DataReport, ...]}``.
    """
    from jaxpref.data import DataSettings, load_tokenizer
    from jaxpref.data.cache import PreparedCache
    from jaxpref.data.streaming import streaming_requested

    if streaming_requested(DataSettings.from_config(cfg)):
        raise ConfigError(
            "the datasets stream (streaming: true): they are read while training and never prepared ahead. "
            "Remove streaming: true to prepare them in memory and cache them."
        )
    out = out or sys.stdout
    if not cfg.dataset_prepared_path:
        cfg.dataset_prepared_path = DEFAULT_PREPARED_PATH
        print(f"dataset_prepared_path is not set: using {DEFAULT_PREPARED_PATH}/ (set it in the training "
              "config too, to train from this cache)", file=out)
    settings = DataSettings.from_config(cfg)
    tokenizer = load_tokenizer(settings)
    kind, build = data_builder(settings)
    cache = PreparedCache(settings, tokenizer, kind)
    if force and cache.path.exists():
        shutil.rmtree(cache.path)
    hit = cache.exists()
    data = build(settings, tokenizer)
    prepared = cache.load()
    if prepared is None:
        raise ConfigError(
            f"dataset_prepared_path: could not write the prepared data to {cache.path}; choose a writable directory"
        )
    state = "already prepared, loaded" if hit else "written"
    print(f"{kind} data: {cache.path} ({state})", file=out)
    reports = [r for r in (data.report, data.eval_report) if r is not None]
    for report, examples in zip(reports, prepared[:2]):
        print(report.summary(), file=out)
        if examples and "target_token_ids" in examples[0]:
            print(f"  KD: top-k K = {examples[0]['target_token_ids'].shape[-1]} teacher entries per position", file=out)
        print("  row lengths (tokens):", file=out)
        print("\n".join(length_histogram([example_length(e) for e in examples])), file=out)
    return {"kind": kind, "cache": str(cache.path), "hit": hit, "reports": reports}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxpref.preprocess", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML config file (axolotl key names)")
    p.add_argument("--force", action="store_true", help="prepare again even when the cache has this key")
    p.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nesting (datasets.0.path=x)")
    return p.parse_intermixed_args(argv)  # flags may follow the key=value overrides


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    from jaxpref.config import load_config

    return run_command(lambda: preprocess(load_config(args.config, args.overrides), force=args.force))


if __name__ == "__main__":
    sys.exit(main())
