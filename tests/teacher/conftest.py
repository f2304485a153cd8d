"""Fixtures of the teacher-pass tests: a tiny random teacher saved as a Hugging Face checkpoint (demo
tiny-llama's config and tokenizer) and a small chat dataset with two bad rows."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import yaml

from jaxpref import models

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "demo" / "tiny-llama"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
GOOD_ROWS = 22


def save_teacher(out: Path, *, seed: int, **config_changes) -> Path:
    config = models.load_model_config(DEMO_MODEL)
    if config_changes:
        config = dataclasses.replace(config, **config_changes)
    models.save_pretrained(models.from_config(config, seed=seed), out)
    for name in TOKENIZER_FILES:
        shutil.copy(DEMO_MODEL / name, out / name)
    return out


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("teacher") / "teacher", seed=3)


@pytest.fixture(scope="session")
def chat_rows(tmp_path_factory) -> Path:
    """22 demo conversations, then a row without messages and one too long for sequence_len 96."""
    lines = (REPO / "demo" / "data" / "sft_eval.jsonl").read_text().splitlines()[:GOOD_ROWS]
    lines.insert(5, json.dumps({"conversation": [{"role": "user", "content": "hi"}]}))
    long_text = " ".join(f"word{i}" for i in range(120))
    lines.insert(
        13, json.dumps({"messages": [{"role": "user", "content": long_text}, {"role": "assistant", "content": "ok"}]})
    )
    path = tmp_path_factory.mktemp("rows") / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def teacher_config(tmp_path: Path, teacher_dir: Path, rows: Path, **overrides) -> Path:
    """A teacher-pass YAML: K=5, T_gen=1.5, shards of 10 rows (3 shards for 24 rows)."""
    cfg = {
        "kd_teacher_model": str(teacher_dir),
        "chat_template": "chatml",
        "datasets": [{"path": str(rows), "type": "chat_template"}],
        "sequence_len": 96,
        "kd_teacher_top_k": 5,
        "teacher_temperature": 1.5,
        "micro_batch_size": 4,
        "teacher_shard_rows": 10,
        "teacher_output_dir": str(tmp_path / "kd"),
    }
    cfg.update(overrides)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "teacher.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if v is not None}))
    return path
