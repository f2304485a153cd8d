"""``eval_generation``: the score logged at evaluation is the exact match of the model's greedy
completions of the first eval rows, the same as transformers' greedy decoding of those prompts gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from jaxpref.config import load_config
from jaxpref.data import DataSettings
from jaxpref.data.chat_templates import shipped_template
from jaxpref.data.pipeline import eval_source_rows
from jaxpref.errors import ConfigError
from jaxpref.eval_generation import prompt_and_reference, resolve_metric

REPO = Path(__file__).resolve().parents[2]
TEACHER = REPO / "demo" / "teacher"
SAMPLES, NEW = 6, 12


def config(tmp_path: Path, **extra) -> Path:
    cfg = {
        "base_model": str(TEACHER), "chat_template": "chatml", "learning_rate": 1e-9, "max_steps": 1,
        "datasets": [{"path": str(REPO / "demo" / "data" / "sft_eval.jsonl"), "type": "chat_template"}],
        "val_set_size": 0.1, "sequence_len": 128, "micro_batch_size": 2, "dataset_processes": 1,
        "use_tensorboard": False, "output_dir": str(tmp_path / "out"),
        "eval_generation": {"samples": SAMPLES, "max_new_tokens": NEW}, **extra,
    }  # fmt: skip
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_prompt_and_reference_of_conversations_and_flat_rows():
    cfg = load_config(config(Path("/tmp")))
    section = cfg.eval_generation
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert prompt_and_reference(row, section) == ([{"role": "user", "content": "q"}], "a")
    assert prompt_and_reference({"messages": row["messages"][:1]}, section) is None
    flat = section.model_copy(update={"prompt_field": "question", "reference_field": "answer"})
    assert prompt_and_reference({"question": "q", "answer": "a"}, flat) == ([{"role": "user", "content": "q"}], "a")
    with pytest.raises(ConfigError, match="cannot import"):
        resolve_metric("no_such_module:fn")
    with pytest.raises(ConfigError, match="prompt_field and reference_field"):
        load_config(config(Path("/tmp"), eval_generation={"prompt_field": "q"}))


@pytest.mark.slow
def test_a_run_logs_the_exact_match_of_greedy_completions(tmp_path):
    from jaxpref.train import run

    path = config(tmp_path)
    run(load_config(path), show_progress=False)
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    (logged,) = [r for r in lines if r["split"] == "eval"]
    # the reference: transformers' greedy decoding of the same eval rows with the trained model
    rows = eval_source_rows(DataSettings.from_config(load_config(path)))[:SAMPLES]
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    hits = 0
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], chat_template=shipped_template("chatml"),
                                               tokenize=False, add_generation_prompt=True)  # fmt: skip
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=stops, pad_token_id=0)
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        hits += text.strip() == row["messages"][-1]["content"].strip()
    assert logged["generation_exact_match"] == pytest.approx(hits / SAMPLES)
    assert 0 < logged["generation_tokens"] <= NEW
