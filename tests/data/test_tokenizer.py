"""Tokenizer loading, chat-template selection, special tokens, and the shipped templates' renderings."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from jaxpref.data import load_tokenizer
from jaxpref.data.chat_templates import end_of_turn_ids, shipped_template
from jaxpref.data.settings import DataSettings
from jaxpref.errors import ConfigError
from tests.data.helpers import (
    DEMO_MODEL,
    EOT,
    byte_tokenizer,
    chatml_tokenizer,
    config,
    data_settings,
    dataset,
    llama3_tokenizer,
    save_tokenizer,
)

CONV = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
]


def render(template: str, messages, **kw) -> str:
    tok = chatml_tokenizer()
    tok.chat_template = shipped_template(template)
    return tok.apply_chat_template(messages, tokenize=False, **kw)


def test_shipped_chatml_renders_like_chatml():
    assert render("chatml", CONV) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    )
    assert render("chatml", CONV[:2], add_generation_prompt=True).endswith("<|im_start|>assistant\n")


def test_shipped_llama3_renders_like_llama3_instruct():
    tok = llama3_tokenizer()
    tok.chat_template = shipped_template("llama3")
    assert tok.apply_chat_template([{"role": "user", "content": " Hi\n"}, *CONV[2:]], tokenize=False) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
    )
    ids = tok.apply_chat_template(CONV, add_generation_prompt=True, return_dict=False)
    assert ids.count(tok.bos_token_id) == 1  # apply_chat_template does not add a second BOS


def test_shipped_qwen3_renders_like_qwen3():
    conv = [
        *CONV,
        {"role": "user", "content": "More"},
        {"role": "assistant", "content": "Ok", "reasoning_content": "think"},
    ]
    assert render("qwen3", conv) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nMore<|im_end|>\n<|im_start|>assistant\n<think>\nthink\n</think>\n\nOk<|im_end|>\n"
    )
    assert render("qwen3", CONV[1:2], add_generation_prompt=True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_load_demo_tokenizer_and_template_choices(tmp_path):
    tok = load_tokenizer(data_settings(base_model=str(DEMO_MODEL)))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.chat_template == shipped_template("chatml")  # its own template (tokenizer_default)
    assert load_tokenizer(data_settings(base_model=str(DEMO_MODEL), chat_template="qwen3")).chat_template == (
        shipped_template("qwen3")
    )
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    for value in (str(jinja), jinja.read_text()):
        jinja_settings = data_settings(base_model=str(DEMO_MODEL), chat_template="jinja", chat_template_jinja=value)
        tok = load_tokenizer(jinja_settings)
        assert tok.chat_template == jinja.read_text()
    with pytest.raises(ConfigError, match="chat_template_jinja"):
        load_tokenizer(
            data_settings(base_model=str(DEMO_MODEL), chat_template="jinja", chat_template_jinja="nope.jinja")
        )


def test_tokenizer_config_wins_over_base_model(tmp_path):
    path = save_tokenizer(llama3_tokenizer(), tmp_path / "tok")
    tok = load_tokenizer(data_settings(base_model=str(DEMO_MODEL), tokenizer_config=path))
    assert tok.bos_token == "<|begin_of_text|>"


def test_missing_chat_template_is_a_config_error(tmp_path):
    path = save_tokenizer(chatml_tokenizer(), tmp_path / "tok")  # has no chat template
    with pytest.raises(ConfigError, match=r"datasets\[0\] has type 'chat_template'.*has none.*chat_template: chatml"):
        load_tokenizer(data_settings(base_model=path, datasets=[dataset(path="x.jsonl", type="chat_template")]))
    assert load_tokenizer(data_settings(base_model=path, datasets=[dataset(path="x.jsonl", type="completion")]))
    cfg = config(base_model=path, chat_template="chatml", datasets=[dataset(path="x.jsonl", type="chat_template")])
    assert load_tokenizer(DataSettings.from_config(cfg)).chat_template == shipped_template("chatml")


def test_special_tokens_and_pad_fallback(tmp_path, caplog):
    path = save_tokenizer(byte_tokenizer(["<|a|>", "<|b|>"], eos="<|a|>"), tmp_path / "tok")
    with caplog.at_level(logging.WARNING, logger="jaxpref.data.tokenizer"):
        tok = load_tokenizer(data_settings(base_model=path))
    assert tok.pad_token == "<|a|>" and "no pad token" in caplog.text
    tok = load_tokenizer(data_settings(base_model=path, special_tokens={"pad_token": "<|b|>", "eos_token": "<|b|>"}))
    assert (tok.pad_token, tok.eos_token, len(tok)) == ("<|b|>", "<|b|>", 258)
    with caplog.at_level(logging.WARNING, logger="jaxpref.data.tokenizer"):
        tok = load_tokenizer(data_settings(base_model=path, special_tokens={"additional_special_tokens": ["<|new|>"]}))
    assert tok.convert_tokens_to_ids("<|new|>") == 258 and "vocab_size" in caplog.text


def test_missing_tokenizer_paths_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="'./no/such/dir' does not exist"):
        load_tokenizer(data_settings(base_model="./no/such/dir"))
    with pytest.raises(ConfigError, match="'org/some-model'.*could not be downloaded"):
        load_tokenizer(data_settings(base_model="org/some-model"))  # offline in tests
    with pytest.raises(ConfigError, match="base_model"):
        load_tokenizer(dataclasses.replace(data_settings(), base_model=None, tokenizer_config=None))


def test_end_of_turn_ids():
    assert end_of_turn_ids(chatml_tokenizer()) == {258}
    assert end_of_turn_ids(llama3_tokenizer(eos="<|end_of_text|>")) == {257, EOT}
