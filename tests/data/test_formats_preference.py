"""Preference formats: rendered strings exactly as axolotl's prompt strategies, ids with byte tokenizers.

Expected strings are written out by hand from the axolotl functions cited next to each table
(axolotl-ai-cloud/axolotl, src/axolotl/prompt_strategies/...). Rows come from tests/data/fixtures/
(copies of the shared fixtures, in the shapes of the public datasets) or are written inline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxpref.data.chat_templates import shipped_template
from jaxpref.data.formats import BadRow, get_format, known_types
from jaxpref.data.formats.preference import PairText, UnpairedText
from jaxpref.data.settings import DataSettings
from jaxpref.errors import ConfigError, DataError
from tests.data.helpers import (
    BOT,
    END_HEADER,
    EOT,
    EOT_TEXT,
    IM_END,
    IM_START,
    START_HEADER,
    chatml_tokenizer,
    config,
    ds_config,
    ids,
    llama3_tokenizer,
)

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


ORCA = fixture("orca_dpo_pairs.jsonl")  # system, question, chosen, rejected
UFB = fixture("ultrafeedback_binarized.jsonl")  # instruction, chosen_response, rejected_response
UFC = fixture("ultrafeedback_cleaned_chat.jsonl")  # prompt, chosen/rejected message lists
KTO_ROWS = fixture("ultrafeedback_kto.jsonl")  # prompt, completion, label

SYS = "You are an AI assistant. You will be given a task."
FR = "What is the capital of France?"
PARIS, LYON = "The capital of France is Paris.", "France's capital is Lyon."
HAIKU = "Write a haiku about rain."
POEM, WET = "Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky", "Rain is wet."
ICR = {"system": "Sys", "input": "Q", "chosen": "A", "rejected": "B"}
PROMPT_PAIR = {"prompt": "Q", "chosen": "A", "rejected": "B"}
MIX = {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
       "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]}  # fmt: skip


def fmt(type_: str, kind: str, tokenizer=None, template: str | None = None, cfg=None, entry=None, **ds_kw):
    tokenizer = tokenizer or chatml_tokenizer()
    if template is not None:
        tokenizer.chat_template = shipped_template(template)
    entry = entry if entry is not None else ds_config(type=type_, **ds_kw)
    return get_format(type_, kind=kind).build(entry, DataSettings.from_config(cfg or config()), tokenizer)


# axolotl dpo/chatml.py: default (== the older `argilla`), intel, icr, prompt_pairs, ultra, argilla_chat
CHATML_USER = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
CHATML_PAIRS = [
    ("chatml.intel", ORCA[0], PairText(
        f"<|im_start|>system\n{SYS}<|im_end|>\n<|im_start|>user\n{FR}<|im_end|>\n<|im_start|>assistant\n",
        f"{PARIS}<|im_end|>", f"{LYON}<|im_end|>")),
    ("chatml.intel", ORCA[1], PairText(  # empty system: no system turn
        "<|im_start|>user\nTranslate 'thank you' to Spanish.<|im_end|>\n<|im_start|>assistant\n",
        "Gracias.<|im_end|>", "Merci.<|im_end|>")),
    ("chatml", UFB[0], PairText(CHATML_USER.format(HAIKU), f"{POEM}<|im_end|>", f"{WET}<|im_end|>")),
    ("chatml.default", UFB[1], PairText(CHATML_USER.format("What is 12 * 12?"),
        "12 * 12 = 144.<|im_end|>", "12 * 12 = 124.<|im_end|>")),
    ("chatml.argilla", UFB[2], PairText(CHATML_USER.format("Name three primary colors."),
        "Red, blue and yellow.<|im_end|>", "Green, purple, orange.<|im_end|>")),
    ("chatml.default", ORCA[0], PairText(  # default finds `question` and `system` too
        f"<|im_start|>system\n{SYS}<|im_end|>\n" + CHATML_USER.format(FR), f"{PARIS}<|im_end|>", f"{LYON}<|im_end|>")),
    ("chatml.icr", ICR, PairText("<|im_start|>system\nSys<|im_end|>\n" + CHATML_USER.format("Q"),
        "A<|im_end|>", "B<|im_end|>")),
    ("chatml.prompt_pairs", PROMPT_PAIR, PairText(CHATML_USER.format("Q"), "A<|im_end|>", "B<|im_end|>")),
    ("chatml.ultra", UFC[0], PairText(CHATML_USER.format("What is 2+2?"),
        "2+2 equals 4.<|im_end|>", "2+2 equals 5.<|im_end|>")),
    ("chatml.argilla_chat", MIX, PairText(CHATML_USER.format("Hi"), "Hello!<|im_end|>", "Go away.<|im_end|>")),
]  # fmt: skip

# axolotl dpo/llama3.py: the same functions with Llama 3 headers
L3_USER = "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
L3_SYS = "<|start_header_id|>system<|end_header_id|>\n\n{}<|eot_id|>"
LLAMA3_PAIRS = [
    ("llama3.intel", ORCA[0], PairText(L3_SYS.format(SYS) + L3_USER.format(FR),
        f"{PARIS}<|eot_id|>", f"{LYON}<|eot_id|>")),
    ("llama3", UFB[0], PairText(L3_USER.format(HAIKU), f"{POEM}<|eot_id|>", f"{WET}<|eot_id|>")),
    ("llama3.default", ICR, PairText(L3_SYS.format("Sys") + L3_USER.format("Q"), "A<|eot_id|>", "B<|eot_id|>")),
    ("llama3.argilla", UFB[1], PairText(L3_USER.format("What is 12 * 12?"),
        "12 * 12 = 144.<|eot_id|>", "12 * 12 = 124.<|eot_id|>")),
    ("llama3.icr", ICR, PairText(L3_SYS.format("Sys") + L3_USER.format("Q"), "A<|eot_id|>", "B<|eot_id|>")),
    ("llama3.prompt_pairs", PROMPT_PAIR, PairText(L3_USER.format("Q"), "A<|eot_id|>", "B<|eot_id|>")),
    ("llama3.ultra", UFC[1], PairText(L3_USER.format("Give me a synonym for happy."),
        "Joyful.<|eot_id|>", "Sad.<|eot_id|>")),
    ("llama3.argilla_chat", MIX, PairText(L3_USER.format("Hi"), "Hello!<|eot_id|>", "Go away.<|eot_id|>")),
]  # fmt: skip


@pytest.mark.parametrize("type_, row, expected", CHATML_PAIRS + LLAMA3_PAIRS)
def test_template_pair_strings(type_, row, expected):
    assert fmt(type_, "preference").text(row) == expected


# axolotl kto/chatml.py and kto/llama3.py: argilla, argilla_chat, intel, prompt_pairs, ultra
KTO_INTEL = {"system": "Sys", "question": "Q", "completion": "A", "label": False}
KTO_TEXTS = [
    ("llama3.ultra", KTO_ROWS[0], UnpairedText(L3_USER.format("What is 2+2?"), "4<|eot_id|>", True)),
    ("llama3.ultra", KTO_ROWS[1], UnpairedText(L3_USER.format("What is 2+2?"), "5<|eot_id|>", False)),
    ("llama3.intel", KTO_INTEL, UnpairedText(L3_SYS.format("Sys") + L3_USER.format("Q"), "A<|eot_id|>", False)),
    ("llama3.argilla", {"instruction": "Q", "completion": "A", "label": True},
        UnpairedText(L3_USER.format("Q"), "A<|eot_id|>", True)),
    ("llama3.prompt_pairs", KTO_ROWS[2], UnpairedText(L3_USER.format("Capital of Italy?"), "Rome.<|eot_id|>", True)),
    ("llama3.argilla_chat", {"completion": MIX["chosen"], "label": True},
        UnpairedText(L3_USER.format("Hi"), "Hello!<|eot_id|>", True)),
    ("chatml.intel", KTO_INTEL, UnpairedText("<|im_start|>system\nSys<|im_end|>\n" + CHATML_USER.format("Q"),
        "A<|im_end|>", False)),
    ("chatml.argilla", {"instruction": "Q", "system": "", "completion": "A", "label": True},
        UnpairedText(CHATML_USER.format("Q"), "A<|im_end|>", True)),
    ("chatml.prompt_pairs", KTO_ROWS[3], UnpairedText(CHATML_USER.format("Capital of Italy?"),
        "Milan.<|im_end|>", False)),
    ("chatml.ultra", KTO_ROWS[4], UnpairedText(CHATML_USER.format("Opposite of cold?"), "Hot.<|im_end|>", True)),
    ("chatml.argilla_chat", {"completion": MIX["rejected"], "label": False},
        UnpairedText(CHATML_USER.format("Hi"), "Go away.<|im_end|>", False)),
]  # fmt: skip


@pytest.mark.parametrize("type_, row, expected", KTO_TEXTS)
def test_template_kto_strings(type_, row, expected):
    assert fmt(type_, "kto").text(row) == expected


def test_every_registered_type_is_tested():
    tested = {t for t, _, _ in CHATML_PAIRS + LLAMA3_PAIRS} | {"chat_template.default", "chat_template.argilla",
              "chat_template.argilla_chat", "user_defined.default"}  # fmt: skip
    assert set(known_types("preference")) == tested
    assert set(known_types("kto")) == {t for t, _, _ in KTO_TEXTS} | {"user_defined.default"}


def split_specials(text: str, specials: dict[str, int]) -> list[int]:
    """Expected byte-tokenizer ids of ``text``: utf-8 bytes, special-token strings as their ids."""
    out, i = [], 0
    while i < len(text):
        special = next((s for s in specials if text.startswith(s, i)), None)
        if special:
            out.append(specials[special])
            i += len(special)
        else:
            out.extend(text[i].encode())
            i += 1
    return out


CHATML_IDS = {"<|im_start|>": IM_START, "<|im_end|>": IM_END, "<|endoftext|>": 256}
LLAMA3_IDS = {"<|begin_of_text|>": BOT, "<|end_of_text|>": EOT_TEXT, "<|start_header_id|>": START_HEADER,
              "<|end_header_id|>": END_HEADER, "<|eot_id|>": EOT}  # fmt: skip


@pytest.mark.parametrize("type_, row, expected", CHATML_PAIRS[:3] + LLAMA3_PAIRS[:3])
def test_pair_ids_one_bos_one_eos(type_, row, expected):
    llama = type_.startswith("llama3")
    tok = llama3_tokenizer() if llama else chatml_tokenizer()
    ex = fmt(type_, "preference", tok)(row)
    specials = LLAMA3_IDS if llama else CHATML_IDS
    bos = [BOT] if llama else []
    assert ex["prompt_ids"].tolist() == bos + split_specials(expected.prompt, specials)
    assert ex["chosen_ids"].tolist() == split_specials(expected.chosen, specials)
    assert ex["rejected_ids"].tolist() == split_specials(expected.rejected, specials)
    eos = EOT if llama else IM_END
    for side in ("chosen_ids", "rejected_ids"):
        full = ex["prompt_ids"].tolist() + ex[side].tolist()
        assert full[-1] == eos and ex[side].tolist().count(eos) == 1
        assert full.count(BOT) == (1 if llama else 0) and (not llama or full[0] == BOT)
        assert ex[side].dtype.name == "int32"


def test_eos_appended_once_when_the_template_ends_differently():
    # A Llama 3 *base* tokenizer's eos is <|end_of_text|>: the completion keeps <|eot_id|> and gets EOS
    # once (as TRL appends eos_token to completions that do not end with it).
    ex = fmt("llama3.intel", "preference", llama3_tokenizer(eos="<|end_of_text|>"))(ORCA[1])
    assert ex["chosen_ids"].tolist() == ids("Gracias.", EOT, EOT_TEXT)
    kto = fmt("llama3.ultra", "kto", llama3_tokenizer(eos="<|end_of_text|>"))(KTO_ROWS[0])
    assert kto["completion_ids"].tolist() == ids("4", EOT, EOT_TEXT) and kto["desirable"].item() is True


def test_kto_ids_and_label():
    ex = fmt("llama3.ultra", "kto", llama3_tokenizer())(KTO_ROWS[1])
    prompt = L3_USER.format("What is 2+2?")
    assert ex["prompt_ids"].tolist() == [BOT, *split_specials(prompt, LLAMA3_IDS)]
    assert ex["completion_ids"].tolist() == ids("5", EOT)
    assert ex["desirable"].dtype == np.bool_ and not ex["desirable"]


# axolotl dpo/chat_template.py:default and argilla_chat (render_preference_sample / extract_response),
# orpo/chat_template.py:argilla
CHAT_CASES = [
    ("chat_template.default", {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
                               "chosen": {"role": "assistant", "content": "A"}, "rejected": "B"},
     PairText("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n",
              "A<|im_end|>", "B<|im_end|>")),
    ("chat_template.default", {"messages": "Q",
                               "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                               "rejected": [{"role": "assistant", "content": "B"}]},
     PairText("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n", "A<|im_end|>", "B<|im_end|>")),
    ("chat_template.argilla_chat", UFC[0], PairText("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
                                                    "2+2 equals 4.<|im_end|>", "2+2 equals 5.<|im_end|>")),
    ("chat_template.argilla", UFC[1], PairText(
        "<|im_start|>user\nGive me a synonym for happy.<|im_end|>\n<|im_start|>assistant\n",
        "Joyful.<|im_end|>", "Sad.<|im_end|>")),  # axolotl: "Joyful.<|im_end|>\n" (see ChatTemplateArgilla)
    ("chat_template.argilla", {**UFC[0], "system": "S"}, PairText(
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        "2+2 equals 4.<|im_end|>", "2+2 equals 5.<|im_end|>")),
]  # fmt: skip


@pytest.mark.parametrize("type_, row, expected", CHAT_CASES)
def test_chat_template_pair_strings(type_, row, expected):
    f = fmt(type_, "preference", template="chatml")
    assert f.text(row) == expected
    ex = f(row)
    assert ex["chosen_ids"].tolist() == split_specials(expected.chosen, CHATML_IDS)


def test_chat_template_default_field_mappings_from_a_raw_entry():
    # field_chosen/field_rejected are axolotl keys the config schema does not model: read from the raw entry.
    entry = {"path": "x.jsonl", "type": "chat_template.default", "field_messages": "conversation",
             "field_chosen": "good", "field_rejected": "bad",
             "message_property_mappings": {"role": "from", "content": "value"}}  # fmt: skip
    row = {"conversation": [{"from": "human", "value": "Q"}], "good": {"from": "gpt", "value": "A"}, "bad": "B"}
    f = fmt("chat_template.default", "preference", template="chatml", entry=entry)
    assert f.text(row) == PairText(
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n", "A<|im_end|>", "B<|im_end|>"
    )


def test_chat_template_llama3_one_bos():
    # The llama3 template writes bos_token and the tokenizer prepends BOS: still one BOS.
    f = fmt("chat_template.argilla", "preference", llama3_tokenizer(), template="llama3")
    text = f.text(UFC[1])
    assert text == PairText("<|begin_of_text|>" + L3_USER.format("Give me a synonym for happy."),
                            "Joyful.<|eot_id|>", "Sad.<|eot_id|>")  # fmt: skip
    ex = f(UFC[1])
    assert ex["prompt_ids"].tolist()[:2] == [BOT, START_HEADER] and ex["prompt_ids"].tolist().count(BOT) == 1
    assert ex["chosen_ids"].tolist() == ids("Joyful.", EOT)


def test_chat_template_needs_a_template():
    with pytest.raises(ConfigError, match="needs a chat template"):
        fmt("chat_template.default", "preference")


# axolotl dpo/user_defined.py and kto/user_defined.py (type: given as a mapping)
def test_user_defined_pair():
    entry = {"path": "x.jsonl", "type": {
        "field_prompt": "question", "field_system": "sys", "field_chosen": "good", "field_rejected": "bad",
        "prompt_format": "[{sys}] {question}\nAnswer:", "chosen_format": " {chosen}",
        "rejected_format": " {bad}"}}  # fmt: skip
    f = fmt("user_defined.default", "preference", entry=entry)
    row = {"question": "Q", "sys": "S", "good": "A", "bad": "B"}
    assert f.text(row) == PairText("[S] Q\nAnswer:", " A", " B")
    assert f.text({**row, "sys": None}) == PairText("[] Q\nAnswer:", " A", " B")
    ex = f(row)
    assert ex["prompt_ids"].tolist() == ids("[S] Q\nAnswer:") and ex["chosen_ids"].tolist() == ids(" A", IM_END)
    # defaults: the raw columns
    plain = fmt("user_defined.default", "preference", entry={"path": "x.jsonl", "type": {}})
    assert plain.text(PROMPT_PAIR) == PairText("Q", "A", "B")


def test_user_defined_kto_and_bad_format():
    entry = {"path": "x.jsonl", "type": {"field_completion": "answer", "field_label": "ok",
                                         "prompt_format": "Q: {prompt}\n",
                                         "completion_format": "A: {answer}"}}  # fmt: skip
    f = fmt("user_defined.default", "kto", entry=entry)
    assert f.text({"prompt": "x", "answer": "y", "ok": True}) == UnpairedText("Q: x\n", "A: y", True)
    with pytest.raises(ConfigError, match=r"names typo.*\{prompt\}"):
        fmt("user_defined.default", "preference", entry={"path": "x.jsonl", "type": {"prompt_format": "{typo}"}})


def test_user_defined_bos_in_the_text_is_not_doubled():
    entry = {"path": "x.jsonl", "type": {"prompt_format": "<|begin_of_text|>{prompt}"}}
    ex = fmt("user_defined.default", "preference", llama3_tokenizer(), entry=entry)(PROMPT_PAIR)
    assert ex["prompt_ids"].tolist() == ids(BOT, "Q") and ex["chosen_ids"].tolist() == ids("A", EOT)


BAD_PAIRS = [
    ({"question": "Q", "chosen": "A"}, "missing_field"),
    ({"question": "Q", "chosen": "A", "rejected": None}, "missing_field"),
    ({"question": "Q", "chosen": "  ", "rejected": "B"}, "empty_response"),
    ({"question": "Q", "chosen": "A", "rejected": "A"}, "identical_responses"),
    ({"question": "Q", "chosen": ["A"], "rejected": "B"}, "malformed_row"),
    ({"question": "Q", "chosen": "A", "rejected": "B", "system": 3}, "malformed_row"),
]


@pytest.mark.parametrize("row, reason", BAD_PAIRS)
def test_bad_pair_rows(row, reason):
    with pytest.raises(BadRow) as e:
        fmt("chatml.intel", "preference")(row)
    assert e.value.reason == reason


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "Q", "completion": "A", "label": "yes"}, "bad_label"),
        ({"prompt": "Q", "completion": "A", "label": 1}, "bad_label"),
        ({"prompt": "Q", "completion": "A"}, "missing_field"),
        ({"prompt": "Q", "completion": "", "label": True}, "empty_response"),
    ],
)
def test_bad_kto_rows(row, reason):
    with pytest.raises(BadRow) as e:
        fmt("llama3.ultra", "kto")(row)
    assert e.value.reason == reason


def test_bad_chat_rows():
    f = fmt("chat_template.argilla", "preference", template="chatml")
    with pytest.raises(BadRow, match="not user/assistant pairs"):
        f({"chosen": [{"role": "user", "content": "Q"}], "rejected": [{"role": "user", "content": "Q"}]})
    with pytest.raises(BadRow) as e:
        fmt("chat_template.argilla_chat", "preference", template="chatml")({**UFC[0], "rejected": UFC[0]["chosen"]})
    assert e.value.reason == "identical_responses"


def test_unknown_type_lists_the_types_of_its_kind():
    with pytest.raises(DataError) as e:
        get_format("chatml.nope", kind="preference", where="datasets[1]")
    msg = str(e.value)
    assert "datasets[1]: unknown type 'chatml.nope'; known types for preference:" in msg
    assert "chatml.intel" in msg and "chat_template.argilla" in msg and "alpaca" not in msg
    with pytest.raises(
        DataError, match=r"'chat_template' is a type for .*lm.* datasets\); known types for kto: .*llama3.ultra"
    ):
        get_format("chat_template", kind="kto")
    assert get_format({"field_prompt": "q"}, kind="kto").name == "user_defined.default"  # a mapping type
