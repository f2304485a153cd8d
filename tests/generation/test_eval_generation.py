"""``eval_generation``: the score logged at evaluation is the exact match of the model's greedy
completions of the first eval rows, the same as transformers' greedy decoding of those prompts gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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


# --- preference runs: the prompt is the preference pipeline's prompt, the reference the chosen answer ---

PREF = REPO / "demo" / "data"
PREF_RUNS = {
    # name: (rl, datasets, test_datasets): the four demo shapes; "mixed" takes its eval rows from a
    # val_set_size split of two entries of different types (each row must go through its own format)
    "intel": ("dpo", [], [{"path": str(PREF / "pref_intel_eval.jsonl"), "type": "chatml.intel"}]),
    "argilla": ("orpo", [], [{"path": str(PREF / "pref_argilla_eval.jsonl"), "type": "chat_template.argilla"}]),
    "kto": ("kto", [], [{"path": str(PREF / "pref_kto_eval.jsonl"), "type": "llama3.ultra"}]),
    "mixed": (
        "dpo",
        [{"path": str(PREF / "pref_intel_eval.jsonl"), "type": "chatml.intel"},
         {"path": str(PREF / "pref_ultra_eval.jsonl"), "type": "chatml"}],
        [],
    ),
}  # fmt: skip


def preference_config(tmp_path: Path, name: str, **extra) -> Path:
    rl, train, test = PREF_RUNS[name]
    cfg = {
        "base_model": str(REPO / "demo" / "tiny-llama"), "random_init_weights": True, "chat_template": "chatml",
        "rl": rl, "learning_rate": 1e-3, "max_steps": 2,
        "datasets": train or [{"path": str(PREF / "pref_intel_train.jsonl"), "type": "chatml.intel"}],
        "sequence_len": 160, "micro_batch_size": 4, "dataset_processes": 1, "use_tensorboard": False,
        "output_dir": str(tmp_path / "out"), "eval_generation": {"samples": 1000, "max_new_tokens": 8}, **extra,
    }  # fmt: skip
    if rl == "kto":
        cfg["datasets"] = [{"path": str(PREF / "pref_kto_train.jsonl"), "type": "llama3.ultra"}]
    if test:
        cfg["test_datasets"] = test
    else:
        cfg["val_set_size"] = 0.25
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("name", list(PREF_RUNS))
def test_preference_prompts_are_the_pipelines_prompts(tmp_path, name):
    from jaxpref.data import load_tokenizer
    from jaxpref.data.preference import build_preference_data
    from jaxpref.eval_generation import build_generation_eval

    cfg = load_config(preference_config(tmp_path, name))
    settings = DataSettings.from_config(cfg)
    tokenizer = load_tokenizer(settings)
    evaluate = build_generation_eval(cfg.eval_generation, settings, tokenizer)
    examples = build_preference_data(settings, tokenizer).examples("eval")
    if name == "kto":  # only desirable rows have a reference
        examples = [e for e in examples if e["desirable"]]
        sequences = [(list(e["prompt_ids"]), list(e["input_ids"][len(e["prompt_ids"]) :])) for e in examples]
    else:  # the chosen side: prompt, then the completion from the first trainable prediction on
        cut = [int(np.argmax(e["chosen_loss_mask"])) + 1 for e in examples]
        sequences = [(list(e["chosen_input_ids"][:c]), list(e["chosen_input_ids"][c:])) for e, c in zip(examples, cut)]
    assert len(evaluate.prompts) == len(sequences) > 40
    for prompt, (pipeline_prompt, completion), reference in zip(evaluate.prompts, sequences, evaluate.references):
        assert prompt == pipeline_prompt
        assert reference == tokenizer.decode(completion, skip_special_tokens=True)
    if name in ("intel", "argilla", "mixed"):  # chatml shapes: the run's chat template renders the same tokens
        rows = eval_source_rows(settings)
        row = next(r for r in rows if r.get("system")) if name == "intel" else rows[0]
        i = rows.index(row)
        question = row.get("question") or row.get("prompt") or row.get("instruction")
        messages = ([{"role": "system", "content": row["system"]}] if row.get("system") else []) + [
            {"role": "user", "content": question}]  # fmt: skip
        assert evaluate.prompts[i] == evaluate.render(messages)
        answer = row.get("chosen_response") or row["chosen"]
        assert evaluate.references[i] == (answer if isinstance(answer, str) else answer[-1]["content"])


def test_flat_fields_override_the_preference_format_and_reward_models_do_not_generate(tmp_path):
    from jaxpref.data import load_tokenizer
    from jaxpref.eval_generation import build_generation_eval

    path = preference_config(tmp_path, "intel", eval_generation={"samples": 4, "prompt_field": "question",
                                                                 "reference_field": "chosen"})  # fmt: skip
    cfg = load_config(path)
    settings = DataSettings.from_config(cfg)
    evaluate = build_generation_eval(cfg.eval_generation, settings, load_tokenizer(settings))
    rows = eval_source_rows(settings)[:4]
    assert evaluate.references == [r["chosen"] for r in rows]
    assert evaluate.prompts[2] == evaluate.render([{"role": "user", "content": rows[2]["question"]}])  # no system
    bad = yaml.safe_load(path.read_text())
    bad.pop("rl")
    bad["reward_model"] = True
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="reward model"):
        load_config(path)


@pytest.mark.slow
def test_a_dpo_run_logs_the_exact_match_of_greedy_completions_of_the_pair_prompts(tmp_path):
    """DPO from the demo teacher (it sorts digits) with a tiny learning rate: the logged exact match on the
    held-out pairs equals transformers' greedy decoding of the same prompts (system turns included)."""
    from jaxpref.train import run

    n = 8
    path = preference_config(
        tmp_path, "intel", base_model=str(TEACHER), random_init_weights=False, learning_rate=1e-9, max_steps=1,
        eval_generation={"samples": n, "max_new_tokens": NEW},
    )
    run(load_config(path), show_progress=False)
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    (logged,) = [r for r in lines if r["split"] == "eval"]
    assert "rewards/accuracies" in logged  # the preference eval, with the generation score next to it
    rows = eval_source_rows(DataSettings.from_config(load_config(path)))[:n]
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    hits = 0
    for row in rows:
        system = f"<|im_start|>system\n{row['system']}<|im_end|>\n" if row["system"] else ""
        prompt = f"{system}<|im_start|>user\n{row['question']}<|im_end|>\n<|im_start|>assistant\n"  # chatml.intel
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=stops, pad_token_id=0)
        hits += tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip() == row["chosen"]
    assert hits >= 2  # the teacher sorts short digit strings: the score is not a trivial 0
    assert logged["generation_exact_match"] == pytest.approx(hits / n)
    assert 0 < logged["generation_tokens"] <= NEW
