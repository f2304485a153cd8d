"""Loading ``datasets:`` entries as axolotl writes them, through ``datasets.load_dataset``.

``path`` may be a hub id, a local file or a local directory (a ``save_to_disk`` dataset or data
files); without ``path``, ``ds_type`` + ``data_files`` name local files. Every failure is a
:class:`DataError` that names the entry and the path. ``streaming=True`` gives a
``datasets.IterableDataset`` that reads the rows lazily (``streaming.py``).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import datasets

from jaxpref.data._cfg import opt
from jaxpref.errors import DataError

log = logging.getLogger(__name__)

# ds_type -> datasets builder name
BUILDERS = {
    "json": "json",
    "jsonl": "json",
    "parquet": "parquet",
    "csv": "csv",
    "arrow": "arrow",
    "text": "text",
}
EXTENSIONS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
    ".txt": "text",
}


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _builder_for(files: list[str], ds_type: str | None, where: str) -> str:
    if ds_type:
        if ds_type not in BUILDERS:
            raise DataError(f"{where}: unknown ds_type {ds_type!r}; known: {', '.join(BUILDERS)}")
        return BUILDERS[ds_type]
    for f in files:
        for ext, builder in EXTENSIONS.items():
            if f.endswith(ext) or f.endswith(ext + ".gz"):
                return builder
    raise DataError(f"{where}: cannot tell the file format of {files[0]!r}; set `ds_type` (json, parquet, csv, arrow)")


def looks_local(path: str) -> bool:
    """A path that cannot be a hub id ("name" or "org/name")."""
    return (
        path.startswith((".", "/", "~"))
        or path.count("/") > 1
        or any(path.endswith(ext) for ext in EXTENSIONS)
        or os.sep != "/"
        and os.sep in path
    )


def _missing(files: list[str]) -> list[str]:
    return [f for f in files if "*" not in f and "://" not in f and not os.path.exists(os.path.expanduser(f))]


def _only_split(loaded: Any, split: str | None, where: str) -> Any:
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        name = split or "train"
        if name not in loaded:
            raise DataError(f"{where}: split {name!r} not found; the dataset has {', '.join(loaded)}")
        return loaded[name]
    return loaded


def load_entry(entry: Any, *, where: str = "datasets[0]", streaming: bool = False) -> Any:
    """Load one ``datasets:`` entry: a ``datasets.Dataset`` of raw rows (map-style), or with
    ``streaming`` a ``datasets.IterableDataset`` (nothing is read before iterating it). The entry's
    own ``streaming`` key is the caller's business."""
    path = opt(entry, "path")
    ds_type = opt(entry, "ds_type")
    data_files = _as_list(opt(entry, "data_files"))
    name = opt(entry, "name")
    split = opt(entry, "split", "train")
    load = functools.partial(_load, streaming=True) if streaming else _load

    if path is None:
        if not data_files:
            raise DataError(f"{where}: needs `path` (hub id, file or directory) or `data_files`")
        if missing := _missing(data_files):
            raise DataError(f"{where}: data file(s) not found: {', '.join(missing)}")
        return load(where, data_files[0], _builder_for(data_files, ds_type, where), data_files=data_files, split=split)

    local = os.path.expanduser(path)
    if os.path.isdir(local):
        if os.path.exists(os.path.join(local, "dataset_info.json")) or os.path.exists(
            os.path.join(local, "dataset_dict.json")
        ):
            try:
                saved = _only_split(datasets.load_from_disk(local), split, where)
                return saved.to_iterable_dataset() if streaming else saved
            except (OSError, ValueError) as e:
                raise DataError(f"{where}: could not read the saved dataset {path!r}: {e}") from None
        if ds_type:
            files = [os.path.join(local, f) for f in data_files] if data_files else None
            return load(where, path, _builder_for([], ds_type, where), data_dir=local, data_files=files, split=split)
        return load(where, path, local, name=name, data_files=data_files or None, split=split)
    if os.path.isfile(local):
        return load(where, path, _builder_for([local], ds_type, where), data_files=[local], split=split)
    if looks_local(path):
        raise DataError(f"{where}: path {path!r} does not exist (relative paths start at {os.getcwd()})")
    revision = opt(entry, "revision")
    return load(where, path, path, name=name, data_files=data_files or None, split=split, revision=revision, hub=True)


def _load(where: str, shown: str, builder: str, *, hub: bool = False, streaming: bool = False, **kwargs: Any) -> Any:
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return _only_split(datasets.load_dataset(builder, streaming=streaming, **kwargs), kwargs.get("split"), where)
    except DataError:
        raise
    except (ConnectionError, OSError) as e:  # includes FileNotFoundError and hub "not found" errors
        if hub:
            raise DataError(
                f"{where}: dataset {shown!r} could not be downloaded from the Hugging Face Hub "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Check the name and the "
                "network, or download it and point `path` at the local copy."
            ) from None
        raise DataError(f"{where}: could not read {shown!r}: {type(e).__name__}: {e}") from None
    except Exception as e:  # malformed files, unknown split or config name, ...
        raise DataError(f"{where}: could not load {shown!r}: {type(e).__name__}: {e}") from None


def load_entries(entries: list[Any], *, key: str = "datasets") -> list[datasets.Dataset]:
    """Load every entry of ``settings.datasets`` (or ``settings.test_datasets``), in order, map-style.

    Eval sets are always loaded map-style (every eval row is needed, in a fixed order): a
    ``test_datasets`` entry with ``streaming: true`` is loaded in memory, with a warning.
    """
    for i, entry in enumerate(entries):
        if key == "test_datasets" and opt(entry, "streaming", False):
            log.warning("%s[%d]: eval sets are loaded in memory; `streaming: true` is ignored for them", key, i)
    return [load_entry(entry, where=f"{key}[{i}]") for i, entry in enumerate(entries)]
