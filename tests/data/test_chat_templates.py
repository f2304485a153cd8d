"""The chat templates copied from axolotl (gemma, qwen_25, mistral_v3_tekken, phi_3, phi_35) against the
model families' own templates, and what a chat_template dataset trains with each.

The reference templates below are the families' official ``chat_template`` strings, embedded verbatim:
Gemma (google/gemma-2-2b-it, the same as Gemma 1), Qwen2.5 (Qwen/Qwen2.5-*-Instruct), Phi-3
(microsoft/Phi-3-mini-4k-instruct, current revision) and Phi-3.5 (microsoft/Phi-3.5-mini-instruct) as TRL
1.16 stores them for template identification (trl/chat_templates/{gemma,qwen2_5,phi3,phi3_5}.jinja), and
Mistral-Nemo-Instruct-2407 (the tekken v3 tokenizer's template) as llama.cpp stores it
(models/templates/mistralai-Mistral-Nemo-Instruct-2407.jinja). Both sides are rendered by transformers'
``apply_chat_template`` with the same tokenizer; where axolotl's template differs from the family's on
purpose, the test spells the difference out (docs/data.md "Chat templates").
"""

from __future__ import annotations

import pytest

from jaxpref.data.chat_templates import SHIPPED_TEMPLATES, TEMPLATE_CHOICES, shipped_template
from jaxpref.data.formats import get_format
from tests.data.helpers import byte_tokenizer, chatml_tokenizer, data_settings, ds_config

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501

MISTRAL_NEMO = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS][" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST]" + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST]" + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif (message.tool_calls is defined and message.tool_calls is not none) %}
        {{- "[TOOL_CALLS][" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- message["content"] + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS]{"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""  # noqa: E501

PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

PHI35 = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + "
    "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def gemma_tokenizer():
    specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    return byte_tokenizer(specials, eos="<eos>", pad="<pad>", bos="<bos>")


def mistral_tokenizer():
    return byte_tokenizer(["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], eos="</s>", bos="<s>")


def phi3_tokenizer():
    specials = ["<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    return byte_tokenizer(specials, eos="<|endoftext|>", bos="<s>")


SYSTEM = {"role": "system", "content": "You are terse."}
# Contents with edge whitespace: templates that trim show it.
TURNS = [
    {"role": "user", "content": " What is 2+2?\n"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": " 6 \n"},
]
# (messages, add_generation_prompt): one exchange, two, with a system prompt, and a prompt to complete.
CONVERSATIONS = [
    (TURNS[:2], False),
    (TURNS, False),
    ([SYSTEM, *TURNS], False),
    ([SYSTEM, *TURNS[:3]], True),
    (TURNS[:3], True),
]
FAMILIES = {  # jaxpref template -> (the family's own template, tokenizer)
    "gemma": (GEMMA, gemma_tokenizer),
    "qwen_25": (QWEN25, chatml_tokenizer),
    "mistral_v3_tekken": (MISTRAL_NEMO, mistral_tokenizer),
    "phi_3": (PHI3, phi3_tokenizer),
    "phi_35": (PHI35, phi3_tokenizer),
}


def render(template: str, make_tokenizer, messages, add_generation_prompt: bool) -> str:
    tok = make_tokenizer()
    return tok.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def test_the_new_templates_are_shipped_and_selectable():
    for name in FAMILIES:
        assert name in SHIPPED_TEMPLATES and name in TEMPLATE_CHOICES
        assert data_settings(chat_template=name).chat_template == name  # the config accepts the name


@pytest.mark.parametrize("name", ["gemma", "qwen_25", "mistral_v3_tekken"])
def test_renders_like_the_family(name):
    official, make_tokenizer = FAMILIES[name]
    rendered = 0
    for messages, gen in CONVERSATIONS:
        if name == "gemma" and messages[0]["role"] == "system":
            # Gemma has no system role: both raise (jaxpref counts such rows as template_error).
            for template in (official, shipped_template(name)):
                with pytest.raises(Exception, match="System role not supported"):
                    render(template, make_tokenizer, messages, gen)
            continue
        assert render(shipped_template(name), make_tokenizer, messages, gen) == render(
            official, make_tokenizer, messages, gen
        )
        rendered += 1
    assert rendered >= 3


def test_qwen_25_adds_qwens_default_system_prompt():
    text = render(shipped_template("qwen_25"), chatml_tokenizer, TURNS[:2], False)
    assert text.startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n What is 2+2?\n<|im_end|>\n"
    )


def test_phi_35_differs_from_phi35_by_the_final_eos():
    # microsoft/Phi-3.5-mini-instruct ends a conversation without a generation prompt with eos_token;
    # axolotl's phi_35 does not (the turn already ends in <|end|>, the turn end that trains).
    for messages, gen in CONVERSATIONS:
        ours = render(shipped_template("phi_35"), phi3_tokenizer, messages, gen)
        theirs = render(PHI35, phi3_tokenizer, messages, gen)
        assert theirs == (ours if gen else ours + "<|endoftext|>")


def test_phi_3_differs_from_phi3_mini():
    # axolotl's phi_3 is an earlier Phi-3-mini template: BOS in the text, the assistant header written after
    # every user turn (so a prompt ends in it, with or without add_generation_prompt), no final eos. The
    # current microsoft/Phi-3-mini-4k-instruct template has none of these.
    for messages, gen in CONVERSATIONS:
        ours = render(shipped_template("phi_3"), phi3_tokenizer, messages, gen)
        theirs = render(PHI3, phi3_tokenizer, messages, gen)
        assert ours.startswith("<s>")
        if messages[-1]["role"] == "assistant":
            assert theirs == ours[len("<s>") :] + "<|endoftext|>"
        else:  # ends with a user turn: axolotl's phi_3 always follows it with the assistant header
            assert ours[len("<s>") :] == theirs
            assert ours == render(shipped_template("phi_3"), phi3_tokenizer, messages, False)


# What a chat_template dataset trains with each template: the assistant contents and the turn end after
# each (the default end-of-turn tokens: <end_of_turn> for Gemma, <|end|> for Phi-3, eos for the others).
@pytest.mark.parametrize(
    "name, make_tokenizer, trained",
    [
        ("gemma", gemma_tokenizer, "4<end_of_turn>6<end_of_turn>"),
        ("qwen_25", chatml_tokenizer, "4<|im_end|> 6 \n<|im_end|>"),
        ("mistral_v3_tekken", mistral_tokenizer, "4</s> 6 \n</s>"),
        ("phi_3", phi3_tokenizer, "4<|end|> 6 \n<|end|>"),
        ("phi_35", phi3_tokenizer, "4<|end|> 6 \n<|end|>"),
    ],
)
def test_trainable_tokens_with_each_template(name, make_tokenizer, trained):
    tok = make_tokenizer()
    settings = data_settings(chat_template=name)
    tok.chat_template = shipped_template(name)
    f = get_format("chat_template").build(ds_config(type="chat_template"), settings, tok)
    messages = TURNS if name == "gemma" else [SYSTEM, *TURNS]
    ex = f({"messages": messages})
    assert tok.decode(ex["input_ids"][ex["trainable"]]) == trained
    assert tok.decode(ex["input_ids"]) == render(shipped_template(name), make_tokenizer, messages, False)
