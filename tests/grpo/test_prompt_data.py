"""GRPO's prompt data: TRL's prompt shapes and axolotl transforms, bad rows counted, one batch per step,
repeated for num_iterations, resumable; and the trl section as axolotl users write it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxpref.assembly import build_data
from jaxpref.config import load_config
from jaxpref.data import DataSettings, load_tokenizer
from jaxpref.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
TEACHER = REPO / "demo" / "teacher"


def write_config(tmp_path: Path, rows: list[dict], **extra) -> Path:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "base_model": str(TEACHER), "chat_template": "tokenizer_default", "learning_rate": 1e-5,
        "rl": "grpo", "trl": {"num_generations": 2, "reward_funcs": ["configs.grpo_rewards.exact_answer"]},
        "datasets": [{"path": str(data), "ds_type": "json"}], "sequence_len": 64, "micro_batch_size": 2,
        "gradient_accumulation_steps": 2, "dataset_processes": 1, "output_dir": str(tmp_path / "out"), **extra,
    }  # fmt: skip
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def load(path: Path):
    cfg = load_config(path)
    settings = DataSettings.from_config(cfg)
    tokenizer = load_tokenizer(settings)
    return cfg, tokenizer, build_data(settings, tokenizer, "prompts")


def test_conversational_and_string_prompts_are_rendered_as_trl_does(tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": "How many times does a appear in banana?"}], "answer": "3"},
        {"prompt": "Sort the digits 312", "answer": "123", "extra": [1, 2]},
    ]
    _, tok, data = load(write_config(tmp_path, rows))
    assert data.micro_batches_per_epoch == 1  # 2 prompts per step (2 x 2 completions / G=2)
    (batch,) = list(data.train_iterator(1))
    texts = {}
    for ids, n, row in zip(batch["prompt_ids"], batch["prompt_lengths"], batch["rows"]):
        texts[json.loads(row)["answer"]] = (ids[:n].tolist(), json.loads(row))
    chat = tok.apply_chat_template(rows[0]["prompt"], tokenize=False, add_generation_prompt=True)
    assert texts["3"][0] == tok(chat, add_special_tokens=False)["input_ids"]
    assert texts["123"][0] == tok("Sort the digits 312", add_special_tokens=False)["input_ids"]
    assert texts["123"][1] == rows[1]  # every column travels to the reward functions


def test_bad_rows_are_counted_and_long_prompts_dropped_or_cut_from_the_left(tmp_path):
    long = "word " * 100
    rows = [{"prompt": "fine", "answer": "1"}, {"answer": "no prompt"}, {"prompt": 7}, {"prompt": long}] * 3
    _, _, data = load(write_config(tmp_path, rows, max_bad_row_fraction=0.9))
    assert data.report.rows_in == 12 and data.report.dropped == {"missing_field": 3, "malformed_row": 3, "too_long": 3}
    _, tok, data = load(write_config(tmp_path, rows, excess_length_strategy="truncate", max_bad_row_fraction=0.9))
    batches = list(data.train_iterator(1))
    lengths = sorted(int(n) for b in batches for n in b["prompt_lengths"] if n)
    assert lengths[-1] == 63  # sequence_len - 1: room for one completion token
    ids = tok(long, add_special_tokens=False)["input_ids"]
    kept = [b["prompt_ids"][i, :63].tolist() for b in batches for i, n in enumerate(b["prompt_lengths"]) if n == 63]
    assert kept[0] == ids[-63:]


def test_an_axolotl_transform_module_makes_the_rows(tmp_path, monkeypatch):
    (tmp_path / "my_transforms.py").write_text(
        "def gsm8k_like(cfg, *args, **kwargs):\n"
        "    def fn(example, tokenizer=None):\n"
        "        return {'prompt': [{'role': 'user', 'content': example['question']}], 'answer': example['a']}\n"
        "    return fn, {'remove_columns': ['question']}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [{"question": f"q{i}", "a": str(i)} for i in range(4)]
    path = write_config(tmp_path, rows)
    cfg = yaml.safe_load(path.read_text())
    cfg["datasets"][0]["type"] = "my_transforms.gsm8k_like"
    path.write_text(yaml.safe_dump(cfg))
    _, _, data = load(path)
    got = sorted(json.loads(r)["answer"] for b in data.train_iterator(1) for r in b["rows"] if r)
    assert got == ["0", "1", "2", "3"]
    cfg["datasets"][0]["type"] = "no_such_module.fn"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="neither the prompt format"):
        load(path)
    sys.modules.pop("my_transforms", None)


def test_num_iterations_repeats_each_batch_and_resume_continues_exactly(tmp_path):
    rows = [{"prompt": f"p{i}", "answer": str(i)} for i in range(8)]
    path = write_config(tmp_path, rows)
    cfg = yaml.safe_load(path.read_text())
    cfg["trl"]["num_iterations"] = 3
    path.write_text(yaml.safe_dump(cfg))
    _, _, data = load(path)
    assert data.micro_batches_per_epoch == 4 * 3
    seq = [tuple(b["rows"]) for b in data.train_iterator(1)]
    assert len(seq) == 12 and all(seq[3 * k] == seq[3 * k + 1] == seq[3 * k + 2] for k in range(4))
    assert len(set(seq)) == 4
    it = data.train_iterator(1)
    for _ in range(5):
        next(it)
    state = it.get_state()
    fresh = data.train_iterator(1)
    fresh.set_state(state)
    assert [tuple(b["rows"]) for b in fresh] == seq[5:]


def test_the_trl_section_as_axolotl_users_write_it(tmp_path):
    rows = [{"prompt": "p", "answer": "1"}]
    base = yaml.safe_load(write_config(tmp_path, rows).read_text())

    def cfg_with(**trl):
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({**base, "trl": {**base["trl"], **trl}}))
        return load_config(path)

    cfg = cfg_with(use_vllm=True, vllm_server_host="1.2.3.4", scale_rewards=False, epsilon_high=0.28)
    assert cfg.trl.scale_rewards == "none" and cfg.trl.epsilon_upper == 0.28 and cfg.trl.beta == 0.0
    assert any("trl.use_vllm" in w for w in cfg.warnings)
    with pytest.raises(ConfigError, match="trl.sync_ref_model"):
        cfg_with(sync_ref_model=True)
    with pytest.raises(ConfigError, match="whole groups"):
        cfg_with(num_generations=3)
    with pytest.raises(ConfigError, match="reward_weights"):
        cfg_with(reward_weights=[1.0, 2.0])
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump({**base, "rl_beta": 0.1}))
    with pytest.raises(ConfigError, match="trl.beta"):
        load_config(path)
    path.write_text(yaml.safe_dump({**base, "trl": {"num_generations": 2}}))
    with pytest.raises(ConfigError, match="reward_funcs"):
        load_config(path)
    # the preference objectives still read only trl.beta
    pref = {**base, "rl": "dpo", "trl": {"beta": 0.3, "num_generations": 4}}
    pref["datasets"] = [{"path": "x.jsonl", "type": "chatml.intel"}]
    path.write_text(yaml.safe_dump(pref))
    cfg = load_config(path)
    assert cfg.rl_beta == 0.3 and cfg.trl is None
    assert np.isclose(cfg.rl_beta, 0.3)
