"""The prepared-data cache under ``dataset_prepared_path``: tokenized, filtered examples, reused by key.

What is cached is the result of the per-row stages (load, shuffle, eval split, format, tokenize,
truncate, shift, filter; for KD also the run's common top-k), i.e. the train and eval examples
*before* packing plus their reports. Packing and batching are cheap and depend on keys
(``sample_packing``, ``micro_batch_size``, shards) that should not force re-tokenizing.

The key is a SHA-256 over (JSON, see :meth:`PreparedCache.material`): the cache format version and
the source of ``jaxpref/data`` (a code change invalidates old caches); the data kind; every dataset
entry (all its keys) with a fingerprint of its files (path, size, mtime of every local file; the
resolved commit for hub datasets); the config fields that change examples (the data keys except
packing/batching/cache ones, plus ``seed``, ``kd_temperature``, ``kd_trainer``, ``objective``, ``rl``,
``reward_model``, ``eot_tokens``); the tokenizer (its ``tokenizer.json`` serialisation, special tokens, size) and
chat template (the resolved text, and ``chat_template_jinja``).

Layout: ``<dataset_prepared_path>/<kind>-<key>/`` with ``meta.json`` (material and reports) and per
split and array key ``<split>/<name>.npy`` (examples concatenated along their first axis) plus
``<split>/<name>.lengths.npy``; arrays are memory-mapped when read. A cache is written into a
temporary directory next to it and renamed into place, so readers never see a partial one and
concurrent writers (several hosts) cannot corrupt it.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from jaxpref.data._cfg import opt
from jaxpref.data.formats import Example
from jaxpref.data.report import DataReport
from jaxpref.data.settings import DataSettings
from jaxpref.data.sources import looks_local

log = logging.getLogger(__name__)

CACHE_VERSION = 1
Prepared = tuple[list[Example], list[Example], DataReport, "DataReport | None"]

# Data keys (docs/design.md "Config") that do not change the per-row examples.
_NOT_KEYED = {
    "datasets",
    "test_datasets",
    "dataset_prepared_path",
    "dataset_processes",
    "sample_packing",
    "pad_to_sequence_len",
    "max_bad_row_fraction",  # re-checked on every load
}
_EXTRA_KEYED = (
    "seed", "kd_temperature", "kd_temperature_min", "kd_trainer", "objective", "rl", "reward_model", "eot_tokens"
)
_DATA_SOURCE = Path(__file__).resolve().parent


def _keyed_fields() -> list[str]:
    from jaxpref.config.sections import DataSection  # lazy: only the field names are needed

    return sorted(set(DataSection.model_fields) - _NOT_KEYED) + list(_EXTRA_KEYED)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def file_stats(path: str) -> list[tuple[str, int, int]]:
    """(absolute path, size, mtime in ns) of a file, or of every file below a directory."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(path):
        st = os.stat(path)
        return [(path, st.st_size, st.st_mtime_ns)]
    out = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            out.extend(file_stats(os.path.join(root, name)))
    return out


def _hub_revision(repo_id: str, revision: str | None) -> str | None:
    """The commit a hub dataset resolves to: a pinned sha, else the Hub, else the local hub cache."""
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from huggingface_hub import HfApi, constants

    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().dataset_info(repo_id, revision=revision).sha
        except Exception:  # offline, private, rate-limited: fall back to the local cache
            pass
    ref = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}" / "refs" / (revision or "main")
    return ref.read_text().strip() if ref.is_file() else None


def entry_fingerprint(entry: Any) -> dict[str, Any]:
    """What identifies the data of one ``datasets:`` entry: local file stats, or a hub commit."""
    path = opt(entry, "path")
    data_files = list(opt(entry, "data_files", []) or [])
    if path and not os.path.exists(os.path.expanduser(path)) and not looks_local(path):
        revision = _hub_revision(path, opt(entry, "revision"))
        if revision is None:
            log.warning(
                "dataset %r: its hub revision is unknown offline, so the prepared-data cache cannot notice "
                "updates; pin `revision:` to a commit to be sure",
                path,
            )
        return {"hub": path, "revision": revision}
    stats = []
    base = os.path.expanduser(path) if path and os.path.isdir(os.path.expanduser(path)) else None
    for f in ([path] if path else []) + data_files:
        expanded = os.path.expanduser(f)
        if base and f in data_files and not os.path.exists(expanded):
            expanded = os.path.join(base, f)  # data_files relative to a `path` directory
        for match in sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]:
            stats.extend(file_stats(match) if os.path.exists(match) else [(match, -1, -1)])
    return {"files": sorted(set(stats))}


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """SHA-256 of everything about the tokenizer that changes ids: model, specials, size, template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return _digest(
        {
            "class": type(tokenizer).__name__,
            "model": model,
            "special": _jsonable(tokenizer.special_tokens_map),
            "size": len(tokenizer),
            "chat_template": tokenizer.chat_template,
        }
    )


def code_fingerprint() -> str:
    """SHA-256 of the data package's source files."""
    h = hashlib.sha256()
    for f in sorted(_DATA_SOURCE.rglob("*.py")):
        h.update(f.relative_to(_DATA_SOURCE).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _save_split(directory: Path, examples: list[Example]) -> dict[str, Any]:
    directory.mkdir()
    keys: dict[str, Any] = {}
    for key in examples[0] if examples else ():
        values = [np.asarray(e[key]) for e in examples]
        scalar = values[0].ndim == 0
        np.save(directory / f"{key}.npy", np.stack(values) if scalar else np.concatenate(values))
        if not scalar:
            np.save(directory / f"{key}.lengths.npy", np.array([len(v) for v in values], dtype=np.int64))
        keys[key] = {"scalar": scalar}
    return {"count": len(examples), "keys": keys}


def _load_split(directory: Path, info: dict[str, Any]) -> list[Example]:
    n = info["count"]
    columns: dict[str, list[np.ndarray]] = {}
    for key, spec in info["keys"].items():
        data = np.load(directory / f"{key}.npy", mmap_mode="r")
        if spec["scalar"]:
            columns[key] = [data[i] for i in range(n)]
        else:
            ends = np.cumsum(np.load(directory / f"{key}.lengths.npy"))
            columns[key] = np.split(data, ends[:-1]) if n else []
    return [{key: columns[key][i] for key in columns} for i in range(n)]


class PreparedCache:
    """The cache entry of one config: ``path``, ``key``, ``material``; :meth:`load` and :meth:`save`."""

    def __init__(
        self, settings: DataSettings, tokenizer: PreTrainedTokenizerBase, kind: str, root: str | Path | None = None
    ):
        self.root = Path(root or settings.dataset_prepared_path)
        self.material = self._material(settings, tokenizer, kind)
        self.key = _digest(self.material)[:32]
        self.path = self.root / f"{kind}-{self.key}"

    @staticmethod
    def _material(settings: DataSettings, tokenizer: PreTrainedTokenizerBase, kind: str) -> dict[str, Any]:
        jinja = settings.chat_template_jinja
        if jinja and os.path.isfile(os.path.expanduser(jinja)):
            jinja = Path(os.path.expanduser(jinja)).read_text()
        entries = {
            key: [{"entry": _jsonable(e), "data": entry_fingerprint(e)} for e in getattr(settings, key)]
            for key in ("datasets", "test_datasets")
        }
        return {
            "version": CACHE_VERSION,
            "code": code_fingerprint(),
            "kind": kind,
            "entries": entries,
            "config": {name: _jsonable(getattr(settings, name)) for name in _keyed_fields()},
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "chat_template_jinja": jinja,
        }

    def exists(self) -> bool:
        return (self.path / "meta.json").is_file()

    def load(self) -> Prepared | None:
        """The cached examples and reports, or None when absent or unreadable (a warning says why)."""
        if not self.exists():
            return None
        try:
            meta = json.loads((self.path / "meta.json").read_text())
            train = _load_split(self.path / "train", meta["splits"]["train"])
            evals = _load_split(self.path / "eval", meta["splits"]["eval"])
            report = DataReport(**meta["reports"]["train"])
            eval_report = DataReport(**meta["reports"]["eval"]) if meta["reports"]["eval"] else None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring the unreadable prepared data in %s (%s: %s)", self.path, type(e).__name__, e)
            return None
        return train, evals, report, eval_report

    def save(self, prepared: Prepared) -> bool:
        """Write atomically (temp dir + rename); False when another writer was first or it failed."""
        train, evals, report, eval_report = prepared
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.root))
        try:
            splits = {"train": _save_split(tmp / "train", train), "eval": _save_split(tmp / "eval", evals)}
            meta = {
                "material": self.material,
                "splits": splits,
                "reports": {
                    "train": dataclasses.asdict(report),
                    "eval": dataclasses.asdict(eval_report) if eval_report else None,
                },
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
            os.rename(tmp, self.path)
            return True
        except OSError as e:
            if not self.exists():
                log.warning("could not write the prepared data to %s (%s)", self.path, e)
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def cached_examples(
    settings: DataSettings, tokenizer: PreTrainedTokenizerBase, kind: str, build: Callable[[], Prepared]
) -> Prepared:
    """``build()`` through the cache when ``dataset_prepared_path`` is set (hit: load; miss: build, write).

    On a hit the reports are checked against the current ``max_bad_row_fraction``.
    """
    if not settings.dataset_prepared_path:
        return build()
    cache = PreparedCache(settings, tokenizer, kind)
    prepared = cache.load()
    if prepared is not None:
        log.info("using the prepared data in %s", cache.path)
        max_bad = float(settings.max_bad_row_fraction)
        for report in prepared[2:]:
            if report is not None:
                report.check(max_bad)
        return prepared
    prepared = build()
    if cache.save(prepared):
        log.info("prepared data written to %s", cache.path)
    return prepared
