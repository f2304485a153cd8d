"""SFT formats against hand-written token ids and trainable masks (byte tokenizers: id = byte)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from jaxpref.data.chat_templates import shipped_template
from jaxpref.data.formats import BadRow, get_format
from jaxpref.data.settings import DataSettings
from jaxpref.errors import ConfigError, DataError
from tests.data.helpers import (
    BOT,
    DEMO_MODEL,
    END_HEADER,
    EOT,
    EOT_TEXT,
    IM_END,
    IM_START,
    START_HEADER,
    chatml_tokenizer,
    config,
    data_settings,
    ds_config,
    ids,
    llama3_tokenizer,
    spec,
)

CONV = [
    {"role": "system", "content": "Sys"},
    {"role": "user", "content": "Q1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "Q2"},
    {"role": "assistant", "content": "A2"},
]


def formatter(type_: str, tokenizer, template: str | None = None, cfg=None, **ds_kw):
    if template is not None:
        tokenizer.chat_template = shipped_template(template)
    return get_format(type_).build(ds_config(type=type_, **ds_kw), DataSettings.from_config(cfg or config()), tokenizer)


def check(example, expected):
    want_ids, want_mask = expected
    assert example["input_ids"].tolist() == want_ids
    assert example["trainable"].tolist() == want_mask
    assert example["input_ids"].dtype.name == "int32" and example["trainable"].dtype.name == "bool"


def chatml_turn(role: str, content: str, train_content: bool, train_eot: bool):
    return [
        (IM_START, False),
        (f"{role}\n", False),
        (content, train_content),
        (IM_END, train_eot),
        ("\n", False),
    ]


@pytest.mark.parametrize(
    "train_on_eos, eot_after",
    [
        ("turn", (False, False, True, False, True)),
        ("last", (False, False, False, False, True)),
        ("all", (True, True, True, True, True)),
        ("none", (False,) * 5),
    ],
)
def test_chatml_train_on_eos_modes(train_on_eos, eot_after):
    f = formatter("chat_template", chatml_tokenizer(), "chatml", train_on_eos=train_on_eos)
    parts = []
    for m, eot in zip(CONV, eot_after):
        parts += chatml_turn(m["role"], m["content"], m["role"] == "assistant", eot)
    check(f({"messages": CONV}), spec(*parts))


def test_chatml_roles_to_train_and_train_on_inputs():
    f = formatter("chat_template", chatml_tokenizer(), "chatml", roles_to_train=["user", "assistant"])
    parts = []
    for m in CONV:
        trained = m["role"] != "system"
        parts += chatml_turn(m["role"], m["content"], trained, trained)
    check(f({"messages": CONV}), spec(*parts))

    # train_on_inputs: every turn's content (system included) trains; headers never do.
    f = formatter("chat_template", chatml_tokenizer(), "chatml", cfg=config(train_on_inputs=True))
    parts = []
    for m in CONV:
        parts += chatml_turn(m["role"], m["content"], True, True)
    check(f({"messages": CONV}), spec(*parts))


def test_chatml_sharegpt_fields_and_row_system():
    f = formatter(
        "chat_template",
        chatml_tokenizer(),
        "chatml",
        field_messages="conversations",
        message_property_mappings={"role": "from", "content": "value"},
    )
    row = {"system": "Sys", "conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"}]}
    parts = chatml_turn("system", "Sys", False, False) + chatml_turn("user", "Q1", False, False)
    parts += chatml_turn("assistant", "A1", True, True)
    check(f(row), spec(*parts))


def test_llama3_single_bos_trimmed_content_and_eot():
    # The tokenizer adds BOS on plain encode and the template writes bos_token: one BOS in total.
    f = formatter("chat_template", llama3_tokenizer(), "llama3")
    row = {"messages": [{"role": "user", "content": "  Q1 "}, {"role": "assistant", "content": "A1\n"}]}
    expected = spec(
        (BOT, False),
        (START_HEADER, False),
        ("user", False),
        (END_HEADER, False),
        ("\n\nQ1", False),
        (EOT, False),
        (START_HEADER, False),
        ("assistant", False),
        (END_HEADER, False),
        ("\n\n", False),
        ("A1", True),
        (EOT, True),
    )
    check(f(row), expected)


def test_llama3_base_tokenizer_trains_eot_id():
    # A Llama 3 base tokenizer's eos is <|end_of_text|>, but turns end in <|eot_id|>: still trained.
    f = formatter("chat_template", llama3_tokenizer(eos="<|end_of_text|>"), "llama3")
    ex = f({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]})
    assert ex["input_ids"].tolist()[-2:] == ids("A", EOT)
    assert ex["trainable"].tolist()[-2:] == [True, True]
    assert EOT_TEXT not in ex["input_ids"].tolist()


def test_qwen3_think_blocks():
    f = formatter("chat_template", chatml_tokenizer(), "qwen3")
    conv = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>r1</think>A1"},  # earlier turn: reasoning dropped
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "<think>\nr2\n</think>\n\nA2"},
    ]
    expected = spec(
        *chatml_turn("user", "Q1", False, False),
        *chatml_turn("assistant", "A1", True, True),
        *chatml_turn("user", "Q2", False, False),
        (IM_START, False),
        ("assistant\n<think>\n", False),
        ("r2\n</think>\n\nA2", True),
        (IM_END, True),
        ("\n", False),
    )
    check(f({"messages": conv}), expected)

    # Without reasoning the last turn gets Qwen3's empty think block, which is template, not content.
    ex = f({"messages": conv[:1] + [{"role": "assistant", "content": "A1"}]})
    expected = spec(
        *chatml_turn("user", "Q1", False, False),
        (IM_START, False),
        ("assistant\n<think>\n\n</think>\n\n", False),
        ("A1", True),
        (IM_END, True),
        ("\n", False),
    )
    check(ex, expected)


def test_content_merged_with_template_text_by_bpe(demo_tokenizer):
    # Real BPE merges: every content token is trainable, every header token is not, the text round-trips.
    f = get_format("chat_template").build(ds_config(type="chat_template"), data_settings(), demo_tokenizer)
    conv = [{"role": "user", "content": "Reverse the word apple"}, {"role": "assistant", "content": " elppa x"}]
    ex = f({"messages": conv})
    trained = ex["input_ids"][ex["trainable"]]
    assert demo_tokenizer.decode(trained) == " elppa x<|im_end|>"
    assert demo_tokenizer.decode(ex["input_ids"]) == demo_tokenizer.apply_chat_template(conv, tokenize=False)


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"text": "no messages"}, "missing_field"),
        ({"messages": []}, "malformed_row"),
        ({"messages": "hi"}, "malformed_row"),
        ({"messages": [{"role": "user"}]}, "missing_field"),
        ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": " "}]}, "empty_response"),
        ({"messages": [{"role": "user", "content": ["a list"]}]}, "malformed_row"),
    ],
)
def test_chat_template_bad_rows(row, reason):
    f = formatter("chat_template", chatml_tokenizer(), "chatml")
    with pytest.raises(BadRow) as e:
        f(row)
    assert e.value.reason == reason


def test_template_error_is_a_bad_row():
    tok = chatml_tokenizer()
    tok.chat_template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}x"
    f = get_format("chat_template").build(ds_config(type="chat_template"), data_settings(), tok)
    with pytest.raises(BadRow) as e:
        f({"messages": [{"role": "assistant", "content": "A"}]})
    assert e.value.reason == "template_error" and "user first" in e.value.detail


def test_completion_eos_once_bos_once():
    f = formatter("completion", chatml_tokenizer())
    check(f({"text": "abc"}), spec(("abc", True), (IM_END, True)))
    check(f({"text": "abc<|im_end|>"}), spec(("abc", True), (IM_END, True)))  # EOS not doubled
    f = formatter("completion", llama3_tokenizer(), field="body")
    check(f({"body": "abc"}), spec((BOT, True), ("abc", True), (EOT, True)))
    check(f({"body": "<|begin_of_text|>abc"}), spec((BOT, True), ("abc", True), (EOT, True)))  # BOS not doubled
    with pytest.raises(BadRow, match="missing_field"):
        f({"text": "wrong field"})


def test_alpaca_prompt_and_mask():
    f = formatter("alpaca", llama3_tokenizer())
    row = {"instruction": "Add", "input": "1 2", "output": "3"}
    prompt = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd\n\n### Input:\n1 2\n\n### Response:\n"
    )
    check(f(row), spec((BOT, False), (prompt, False), ("3", True), (EOT, True)))
    prompt = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nAdd\n\n### Response:\n"
    )
    check(f({"instruction": "Add", "output": "3"}), spec((BOT, False), (prompt, False), ("3", True), (EOT, True)))
    f = formatter("alpaca", llama3_tokenizer(), cfg=config(train_on_inputs=True))
    assert f(row)["trainable"].all()
    with pytest.raises(BadRow, match="empty_response"):
        f({"instruction": "Add", "output": ""})


def test_unknown_type_lists_known_types():
    with pytest.raises(DataError) as e:
        get_format("sharegpt", where="datasets[1]")
    msg = str(e.value)
    assert "datasets[1]" in msg and "'sharegpt'" in msg
    for name in ("alpaca", "chat_template", "completion"):
        assert name in msg


# eot_tokens / train_on_eot, worked through with the shipped demo tokenizer (eos <|im_end|>; <|endoftext|> and
# <|im_start|> are single tokens). TURN_END is a chatml variant whose turns end in <|endoftext|>, not in eos.
# Every expected mask below was also produced by axolotl's own ChatTemplateStrategy (axolotl main 067b021c,
# prompt_strategies/chat_template.py, run on the same tokenizer, template and conversation): token for token.
TURN_END = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
EOT_CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you."},
]
A1, A2 = ["H", "e", "ll", "o", "!"], ["S", "e", "e", "Ġy", "ou", "."]


def demo_trained_tokens(template: str | None, eot_tokens: list[str] | None = None, **ds_kw) -> list[str]:
    """The trainable tokens (as strings) of EOT_CONV with the demo tokenizer and ``template``."""
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    if template is not None:
        tok.chat_template = template
    cfg = config() if eot_tokens is None else config(eot_tokens=eot_tokens)
    f = get_format("chat_template").build(ds_config(type="chat_template", **ds_kw), DataSettings.from_config(cfg), tok)
    ex = f({"messages": EOT_CONV})
    return tok.convert_ids_to_tokens(ex["input_ids"][ex["trainable"]].tolist())


@pytest.mark.parametrize(
    "eot_tokens, ds_kw, trained",
    [
        # Unset: <|endoftext|> is neither eos nor a known turn end, so no turn end trains (axolotl: the same,
        # with its warning that eos is not in the template).
        (None, {}, A1 + A2),
        # The template's turn end named: trained after each trained turn (train_on_eot defaults to train_on_eos).
        (["<|endoftext|>"], {}, [*A1, "<|endoftext|>", *A2, "<|endoftext|>"]),
        (["<|endoftext|>"], {"train_on_eot": "last"}, [*A1, *A2, "<|endoftext|>"]),
        # all: after every turn, system and user included (their content stays untrained).
        (
            ["<|endoftext|>"],
            {"train_on_eot": "all"},
            ["<|endoftext|>"] * 2 + A1 + ["<|endoftext|>"] * 2 + A2 + ["<|endoftext|>"],
        ),
        # train_on_eos is for the eos token (<|im_end|>, not in this template): nothing to train.
        (["<|endoftext|>"], {"train_on_eot": "none", "train_on_eos": "all"}, A1 + A2),
        (
            ["<|endoftext|>"],
            {"roles_to_train": ["user"]},
            ["H", "i", "Ġt", "h", "er", "e", "<|endoftext|>", "B", "y", "e", "<|endoftext|>"],
        ),
    ],
)
def test_eot_tokens_turn_end_other_than_eos(eot_tokens, ds_kw, trained):
    assert demo_trained_tokens(TURN_END, eot_tokens, **ds_kw) == trained


@pytest.mark.parametrize(
    "eot_tokens, ds_kw, trained",
    [
        (None, {}, [*A1, "<|im_end|>", *A2, "<|im_end|>"]),
        (["<|im_end|>"], {"train_on_eos": "last"}, [*A1, *A2, "<|im_end|>"]),
        # Any token within 3 of the content's end is that turn's end: the next turn's <|im_start|> (2 tokens
        # after) trains, and the last assistant turn has none; the eos <|im_end|> trains per train_on_eos.
        (["<|im_start|>"], {}, [*A1, "<|im_end|>", "<|im_start|>", *A2, "<|im_end|>"]),
        (["<|im_start|>"], {"train_on_eot": "none"}, [*A1, "<|im_end|>", *A2, "<|im_end|>"]),
        # <|endoftext|> is not in the chatml template: left out (a warning), as axolotl does.
        (
            ["<|endoftext|>", "<|im_start|>"],
            {"train_on_eot": "last"},
            [*A1, "<|im_end|>", "<|im_start|>", *A2, "<|im_end|>"],
        ),
    ],
)
def test_eot_tokens_with_chatml(eot_tokens, ds_kw, trained):
    assert demo_trained_tokens(None, eot_tokens, **ds_kw) == trained  # the demo tokenizer's template: chatml


def test_eot_tokens_errors():
    # Not one token of the tokenizer: axolotl raises too (it cannot mark a turn end).
    with pytest.raises(ConfigError, match=r"eot_tokens: '<\|end\|>' is 6 tokens.*additional_special_tokens"):
        demo_trained_tokens("{{ '<|end|>' }}{% for m in messages %}{{ m['content'] }}{% endfor %}", ["<|end|>"])
    # The eos token listed, and train_on_eos / train_on_eot disagreeing about it.
    with pytest.raises(
        ConfigError, match="lists the eos token '<\\|im_end\\|>'.*train_on_eos \\(turn\\).*train_on_eot \\(all\\)"
    ):
        demo_trained_tokens(None, ["<|im_end|>"], train_on_eot="all")
    assert demo_trained_tokens(None, ["<|im_end|>"], train_on_eot="last", train_on_eos="last") == [
        *A1,
        *A2,
        "<|im_end|>",
    ]
