"""The shipped preference demo data: rebuilt byte-identically, chosen follows the task's rule and rejected
breaks it, held-out prompts, and every file loads through the preference pipeline with its config type."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from jaxpref.data import build_preference_data, load_tokenizer
from jaxpref.data.settings import DataSettings
from tests.data.helpers import DEMO_MODEL, REPO, config

DATA = REPO / "demo" / "data"
SHAPES = {
    "intel": ("chatml.intel", {"system", "question", "chosen", "rejected"}),
    "ultra": (
        "chatml",
        {"source", "instruction", "chosen_response", "chosen_rating", "rejected_response", "rejected_rating"},
    ),
    "argilla": (
        "chat_template.argilla",
        {
            "source",
            "prompt",
            "chosen",
            "chosen-rating",
            "chosen-model",
            "rejected",
            "rejected-rating",
            "rejected-model",
        },
    ),
    "kto": ("llama3.ultra", {"prompt", "completion", "label"}),
}


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).open()]


def follows_rule(prompt: str, answer: str) -> bool:
    """Whether ``answer`` is the correct answer to one of the demo task prompts (an independent check)."""
    if m := re.fullmatch(r"Sort the digits (\d+)", prompt):
        return answer == "".join(sorted(m[1]))
    if m := re.fullmatch(r"Sort the letters of (\w+)", prompt):
        return answer == "".join(sorted(m[1]))
    raise AssertionError(f"not a demo prompt: {prompt!r}")


def pairs(shape: str, split: str) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) of a pair file; (prompt, completion, label) rows for KTO."""
    out = []
    for r in rows(f"pref_{shape}_{split}.jsonl"):
        if shape == "intel":
            out.append((r["question"], r["chosen"], r["rejected"]))
        elif shape == "ultra":
            out.append((r["instruction"], r["chosen_response"], r["rejected_response"]))
        elif shape == "argilla":
            assert r["chosen"][0] == r["rejected"][0] == {"role": "user", "content": r["prompt"]}
            out.append((r["prompt"], r["chosen"][1]["content"], r["rejected"][1]["content"]))
        else:
            out.append((r["prompt"], r["completion"], r["label"]))
    return out


def test_build_script_reproduces_the_shipped_files():
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_preference_demo.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sum((DATA / f"pref_{s}_{p}.jsonl").stat().st_size for s in SHAPES for p in ("train", "eval")) < 600_000


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_chosen_follows_the_rule_and_rejected_breaks_it(shape):
    fields = SHAPES[shape][1]
    for split in ("train", "eval"):
        assert all(set(r) == fields for r in rows(f"pref_{shape}_{split}.jsonl"))
        for prompt, a, b in pairs(shape, split):
            if shape == "kto":
                assert isinstance(b, bool) and follows_rule(prompt, a) == b
            else:
                assert follows_rule(prompt, a) and not follows_rule(prompt, b) and a != b


def test_prompts_are_held_out():
    sft = {m["content"] for f in ("sft_train.jsonl", "sft_eval.jsonl") for r in rows(f) for m in r["messages"]}
    seen: dict[str, str] = {}
    for shape in SHAPES:
        for split in ("train", "eval"):
            prompts = {p[0] for p in pairs(shape, split)}
            assert not prompts & sft
            for p in prompts:
                assert seen.setdefault(p, f"{shape}_{split}") == f"{shape}_{split}"  # one file per prompt
    kto = pairs("kto", "train")
    assert sum(label for _, _, label in kto) * 2 == len(kto)  # one desirable, one undesirable per prompt


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_file_loads_with_its_type(shape):
    ds_type = SHAPES[shape][0]
    rl = "kto" if shape == "kto" else "dpo"
    cfg = config(
        base_model=str(DEMO_MODEL),
        chat_template="chatml",
        rl=rl,
        sequence_len=160,
        micro_batch_size=4,
        datasets=[{"path": str(DATA / f"pref_{shape}_train.jsonl"), "type": ds_type}],
        test_datasets=[{"path": str(DATA / f"pref_{shape}_eval.jsonl"), "type": ds_type}],
    )
    data = build_preference_data(DataSettings.from_config(cfg), load_tokenizer(DataSettings.from_config(cfg)))
    n_train, n_eval = len(rows(f"pref_{shape}_train.jsonl")), len(rows(f"pref_{shape}_eval.jsonl"))
    assert (data.report.rows_in, data.report.rows_out) == (n_train, n_train)
    assert (data.eval_report.rows_in, data.eval_report.rows_out) == (n_eval, n_eval)


def test_sft_warm_start_files_are_the_chosen_answers_of_the_dpo_pairs():
    """pref_sft_*: chat rows (system turn where the intel row has one) answering with the chosen answer."""
    for name, sources in (("train", [("intel", "train"), ("ultra", "train")]), ("eval", [("intel", "eval")])):
        sft = rows(f"pref_sft_{name}.jsonl")
        expected = [(p, c) for shape, split in sources for p, c, _ in pairs(shape, split)]
        assert [(r["messages"][-2]["content"], r["messages"][-1]["content"]) for r in sft] == expected
        assert all([m["role"] for m in r["messages"]][-2:] == ["user", "assistant"] for r in sft)
    intel = rows("pref_intel_eval.jsonl")
    sft = rows("pref_sft_eval.jsonl")
    assert [r["system"] for r in intel] == [r["messages"][0]["content"] if len(r["messages"]) == 3 else "" for r in sft]
