"""``python -m jaxpref.generate``: chat-formatted prompts, one JSON line each (equal to ``generate`` on the
same ids), bad lines counted and skipped, exit code 2 when nothing is usable."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer

from jaxpref import models
from jaxpref.data.chat_templates import shipped_template
from jaxpref.generate import main
from jaxpref.generation import SamplingSettings, generate
from jaxpref.generation.prompts import stop_token_ids

REPO = Path(__file__).resolve().parents[2]
TEACHER = REPO / "demo" / "teacher"
ROWS = [
    {"messages": [{"role": "user", "content": "Sort: 3 1 2"}, {"role": "assistant", "content": "1 2 3"}]},
    "not json at all",
    {"prompt": "Count the letters in abc"},
    {"messages": []},
    {"text": "no prompt field"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse: a b c"}]},
]


def write_prompts(path: Path) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in ROWS) + "\n")
    return path


def test_generate_cli_writes_one_line_per_usable_prompt(tmp_path, capsys):
    prompts, out = write_prompts(tmp_path / "p.jsonl"), tmp_path / "out.jsonl"
    args = ["--model", str(TEACHER), "--prompts", str(prompts), "--output", str(out), "--chat_template", "chatml",
            "--max_new_tokens", "8", "--batch_size", "2", "--no_progress"]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["index"] for x in lines] == [0, 2, 5]
    assert lines[0]["reference"] == "1 2 3" and "reference" not in lines[1]
    for reason in ("not_json", "bad_messages", "missing_field"):
        assert f"skipped 1 line(s): {reason}" in err
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    template = shipped_template("chatml")
    messages = [ROWS[0]["messages"][:1], [{"role": "user", "content": ROWS[2]["prompt"]}], ROWS[5]["messages"]]
    texts = [tokenizer.apply_chat_template(m, chat_template=template, tokenize=False, add_generation_prompt=True)
             for m in messages]  # fmt: skip
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    expected = generate(models.from_pretrained(TEACHER), ids,
                        SamplingSettings(max_new_tokens=8, stop_token_ids=stop_token_ids(tokenizer)))  # fmt: skip
    for line, text, tokens in zip(lines, texts, expected.tokens):
        assert line["prompt"] == text and line["token_ids"] == tokens
        assert line["completion"] == tokenizer.decode(tokens, skip_special_tokens=True)


def test_no_usable_prompt_or_no_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("nope\n{}\n")
    for prompts in (bad, tmp_path / "missing.jsonl"):
        assert main(["--model", str(TEACHER), "--prompts", str(prompts), "--no_progress"]) == 2
        assert "--prompts" in capsys.readouterr().err
