"""The embedded demo assets load offline, fit together, and are rebuilt byte-identically by the script."""

from __future__ import annotations

import json
import subprocess
import sys

from transformers import AutoConfig, AutoTokenizer

from jaxpref.data import build_lm_data, load_tokenizer
from jaxpref.data.chat_templates import shipped_template
from jaxpref.data.settings import DataSettings
from tests.data.helpers import DEMO_MODEL, REPO, config, dataset

DATA = REPO / "demo" / "data"


def test_demo_model_dir_loads_offline():
    hf = AutoConfig.from_pretrained(DEMO_MODEL)
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    assert hf.model_type == "llama" and hf.tie_word_embeddings
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads) == (128, 4, 4, 2)
    assert hf.vocab_size % 64 == 0 and len(tok) <= hf.vocab_size
    assert (hf.eos_token_id, hf.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    assert tok.chat_template == shipped_template("chatml")
    text = "<|im_start|>user\nCompute 47+385<|im_end|>\n"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.convert_ids_to_tokens(tok("<|im_start|><|im_end|>")["input_ids"]) == ["<|im_start|>", "<|im_end|>"]


def test_demo_data_is_chat_rows_with_held_out_eval():
    train = [json.loads(line) for line in (DATA / "sft_train.jsonl").open()]
    evals = [json.loads(line) for line in (DATA / "sft_eval.jsonl").open()]
    assert (len(train), len(evals)) == (4000, 200)
    for row in train[:50] + evals[:50]:
        roles = [m["role"] for m in row["messages"]]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"])

    def prompts(rows):
        return {r["messages"][-2]["content"] for r in rows}

    assert not prompts(train) & prompts(evals)
    # This demo's files stay small; other demos (demo/teacher, demo/data/kd_*, ...) check their own sizes.
    sft_assets = [*(REPO / "demo" / "tiny-llama").rglob("*"), *DATA.glob("sft_*")]
    assert sum(p.stat().st_size for p in sft_assets if p.is_file()) < 3_000_000


def test_demo_sft_pipeline_keeps_every_row():
    cfg = config(
        base_model=str(DEMO_MODEL),
        datasets=[dataset(path=str(DATA / "sft_train.jsonl"), type="chat_template")],
        test_datasets=[dataset(path=str(DATA / "sft_eval.jsonl"), type="chat_template")],
        sequence_len=128,
        sample_packing=True,
        micro_batch_size=8,
    )
    data = build_lm_data(DataSettings.from_config(cfg), load_tokenizer(DataSettings.from_config(cfg)))
    assert data.report.rows_out == 4000 and not data.report.dropped
    assert data.eval_report.rows_out == 200
    assert data.report.tokens / (data.report.sequences * 128) > 0.9  # packs well
    batch = next(data.train_iterator())
    assert batch["input_ids"].shape == (8, 128)


def test_build_script_is_deterministic():
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_demo_assets.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
