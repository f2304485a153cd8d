"""Relative paths in a config: the current directory first, then the config file's directory.

A path that exists nowhere locally (a hub id such as ``Intel/orca_dpo_pairs``, or a file that is
missing) is left as written: the model and dataset loaders report it with their own errors.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from jaxpref.config.nested import DatasetConfig
from jaxpref.config.schema import JaxprefConfig

MODEL_PATH_FIELDS = (
    "base_model",
    "base_model_config",
    "tokenizer_config",
    "lora_model_dir",
    "kd_teacher_model",
)


def resolve(path: str, config_dir: Path | None) -> str:
    """``path`` if it exists relative to the CWD (or is absolute), else relative to ``config_dir`` if
    it exists there, else unchanged. Globs count as existing when they match something."""
    expanded = os.path.expanduser(path)
    if os.path.isabs(expanded) or _exists(expanded):
        return expanded
    if config_dir is not None:
        candidate = os.path.normpath(os.path.join(config_dir, expanded))
        if _exists(candidate):
            return candidate
    return path


def resolve_config_paths(cfg: JaxprefConfig, config_dir: Path | None) -> None:
    """Resolve every path-valued key of ``cfg`` in place (see ``resolve``)."""
    for name in MODEL_PATH_FIELDS:
        value = getattr(cfg, name)
        if value:
            setattr(cfg, name, resolve(value, config_dir))
    if cfg.chat_template_jinja and _looks_like_path(cfg.chat_template_jinja):
        cfg.chat_template_jinja = resolve(cfg.chat_template_jinja, config_dir)
    for ds in [*(cfg.datasets or []), *(cfg.test_datasets or [])]:
        _resolve_dataset(ds, config_dir)


def _resolve_dataset(ds: DatasetConfig, config_dir: Path | None) -> None:
    if ds.path:
        ds.path = resolve(ds.path, config_dir)
    if ds.data_files:
        ds.data_files = [resolve(f, config_dir) for f in ds.data_files]


def _exists(path: str) -> bool:
    if glob.has_magic(path):
        return bool(glob.glob(path))
    return os.path.exists(path)


def _looks_like_path(text: str) -> bool:
    """``chat_template_jinja`` holds either template text or a file path."""
    return "\n" not in text and "{" not in text and len(text) < 4096
