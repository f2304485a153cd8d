"""The two wire formats of a teacher's prompt log-probs over HTTP: vLLM's and SGLang's.

One definition of each request and answer field, used by the client (``jaxpref.teacher_client``) and by
jaxpref's own server (``jaxpref.teacher_server``), so that the client talks to vLLM, SGLang or
``python -m jaxpref.serve`` unchanged.

* **vLLM** ``POST /v1/completions`` with ``prompt`` as token ids (one list per row), ``max_tokens: 1``
  and ``prompt_logprobs: k``. Answer: ``choices[i].prompt_logprobs``, one entry per prompt token:
  ``null`` for token 0, then ``{"<token_id>": {"logprob": float, "rank": int, "decoded_token": str}}``
  with the top-k, plus the prompt token itself when it is outside them (k + 1 entries).
* **SGLang** ``POST /generate`` with ``input_ids``, ``return_logprob: true``, ``logprob_start_len: 0``,
  ``top_logprobs_num: k`` and ``sampling_params.max_new_tokens: 0``. Answer (a list for a batch):
  ``[i].meta_info.input_top_logprobs``, one entry per prompt token: ``null`` for token 0, then
  ``[[logprob, token_id, text | null], ...]`` with the top-k.

Entry i is the teacher's distribution over token i given the tokens before it (*token-aligned*, as the
stored KD format's ``logprobs_alignment: token``). The log-probs are at temperature 1, normalised over
the full vocabulary: vLLM's prompt log-probs are the raw model's (its default ``logprobs_mode``), and a
request's ``temperature`` is a sampling parameter. The client asks with ``temperature: 1`` so that a
server that applies it (vLLM's ``processed_logprobs`` mode) answers the same.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxpref.data.formats.kd import TeacherRows

SERVERS = ("vllm", "sglang")
PATHS = {"vllm": "/v1/completions", "sglang": "/generate"}
LOGPROB_FLOOR = -9999.0  # vLLM's floor for -inf log-probs in JSON answers


class AnswerError(ValueError):
    """A server's answer does not have the shape its format promises."""


# ------------------------------------------------------------------------------------------ requests


def request_body(server: str, rows: Sequence[Sequence[int]], k: int, model: str | None = None) -> dict[str, Any]:
    """The JSON body that asks ``server`` for the top-``k`` prompt log-probs of each row of token ids."""
    prompts = [[int(t) for t in row] for row in rows]
    if server == "vllm":
        body: dict[str, Any] = {"prompt": prompts, "max_tokens": 1, "prompt_logprobs": k, "temperature": 1.0}
        if model:
            body["model"] = model
        return body
    if server == "sglang":
        return {
            "input_ids": prompts,
            "return_logprob": True,
            "logprob_start_len": 0,
            "top_logprobs_num": k,
            "return_text_in_logprobs": False,
            "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
        }
    raise ValueError(f"server {server!r} is not one of {', '.join(SERVERS)}")


# ------------------------------------------------------------------------------------------ answers


def _dense(positions: list[list[tuple[int, float]] | None]) -> TeacherRows:
    counts = np.array([len(p) if p else 0 for p in positions], dtype=np.int64)
    width = int(counts.max()) if len(counts) else 0
    valid = np.arange(width) < counts[:, None]
    ids = np.zeros((len(counts), width), dtype=np.int64)
    values = np.zeros((len(counts), width), dtype=np.float64)
    flat = [e for p in positions if p for e in p]
    if flat:
        ids[valid] = [e[0] for e in flat]
        values[valid] = [e[1] for e in flat]
    return TeacherRows(ids, values, valid)


def _check_length(i: int, positions: Any, length: int, field: str) -> list[Any]:
    if not isinstance(positions, list):
        raise AnswerError(f"row {i}: {field} is {type(positions).__name__}, not a list of positions")
    if len(positions) != length:
        raise AnswerError(f"row {i}: {field} has {len(positions)} positions for a prompt of {length} tokens")
    return positions


def _vllm_position(entry: Any) -> list[tuple[int, float]] | None:
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise AnswerError(f"a prompt_logprobs position is {type(entry).__name__}, not an object")
    return [(int(token), float(item["logprob"])) for token, item in entry.items()]


def _sglang_position(entry: Any) -> list[tuple[int, float]] | None:
    if entry is None:
        return None
    if not isinstance(entry, list):
        raise AnswerError(f"an input_top_logprobs position is {type(entry).__name__}, not a list")
    return [(int(item[1]), float(item[0])) for item in entry]


def parse_answer(server: str, answer: Any, lengths: Sequence[int]) -> list[TeacherRows]:
    """Token-aligned teacher rows ([L_i, M] each, row 0 empty) from ``server``'s answer to a request
    for rows of ``lengths`` tokens. :class:`AnswerError` when the answer does not fit the request."""
    try:
        if server == "vllm":
            choices = answer["choices"] if isinstance(answer, dict) else None
            if not isinstance(choices, list) or len(choices) != len(lengths):
                raise AnswerError(f"expected 'choices' with {len(lengths)} entries")
            choices = sorted(choices, key=lambda c: int(c.get("index", 0)))
            fields = [c.get("prompt_logprobs") for c in choices]
            name, position = "prompt_logprobs", _vllm_position
        elif server == "sglang":
            items = answer if isinstance(answer, list) else [answer]
            if len(items) != len(lengths):
                raise AnswerError(f"expected a list of {len(lengths)} answers, got {len(items)}")
            fields = [(item.get("meta_info") or {}).get("input_top_logprobs") for item in items]
            name, position = "meta_info.input_top_logprobs", _sglang_position
        else:
            raise ValueError(f"server {server!r} is not one of {', '.join(SERVERS)}")
        rows = []
        for i, (field, length) in enumerate(zip(fields, lengths)):
            positions = [position(e) for e in _check_length(i, field, length, name)]
            positions[0] = None  # nothing predicts token 0 (a server may score it against a BOS)
            rows.append(_dense(positions))
        return rows
    except AnswerError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise AnswerError(f"{type(e).__name__}: {e}") from None


# ------------------------------------------------------------------------------------------ server side


class TokenFragments:
    """Per token id, the constant parts of an answer's entries as JSON text: vLLM's ``prompt_logprobs``
    ``key[t]`` = ``"t":{"logprob":`` and ``tail[t]`` = ``,"decoded_token":"<text>"}``; SGLang's
    ``sg_null[t]`` = ``,t,null]`` and ``sg_text[t]`` = ``,t,"<text>"]``.

    ``texts``: the decoded text of each id (None: ``decoded_token`` is null).
    """

    def __init__(self, vocab_size: int, texts: Sequence[str] | None = None):
        self.key = [f'"{t}":{{"logprob":' for t in range(vocab_size)]
        null = ',"decoded_token":null}'
        self.tail = [null] * vocab_size if texts is None else [',"decoded_token":' + json.dumps(x) + "}" for x in texts]
        self.rank = [f',"rank":{r}' for r in range(vocab_size + 1)]
        # SGLang's [logprob, id, text] entries after the log-prob, with the text and with null
        self.sg_null = [f",{t},null]" for t in range(vocab_size)]
        self.sg_text = self.sg_null if texts is None else [f",{t},{json.dumps(x)}]" for t, x in enumerate(texts)]


def vllm_prompt_logprobs(
    tokens: np.ndarray,
    top_ids: np.ndarray,
    top_logprobs: np.ndarray,
    next_logprob: np.ndarray,
    next_rank: np.ndarray,
    k: int,
    frags: TokenFragments,
) -> str:
    """vLLM's ``prompt_logprobs`` of one row, as JSON text, from prediction-aligned scores.

    ``tokens`` [L]; ``top_ids``/``top_logprobs`` [L, K >= k] (row t: the prediction after token t);
    ``next_logprob``/``next_rank`` [L] of token t + 1. Entry i >= 1 holds token i first (as vLLM puts
    the prompt token first), then the rest of the top-k by rank: ``{"<id>": {"logprob", "rank",
    "decoded_token"}}``. Written as text (no dict per entry): a k = 20 answer has 21 entries per token.
    """
    key, tail, rank_text = frags.key, frags.tail, frags.rank
    ids = top_ids[:, :k].tolist()
    lps = np.maximum(top_logprobs[:, :k], LOGPROB_FLOOR).tolist()
    nxt_lp, nxt_rank = np.maximum(next_logprob, LOGPROB_FLOOR).tolist(), next_rank.tolist()
    toks = tokens.tolist()
    parts = ["[null"]
    for i in range(1, len(toks)):
        tok = toks[i]
        entries = [key[tok] + repr(nxt_lp[i - 1]) + rank_text[nxt_rank[i - 1]] + tail[tok]]
        top = enumerate(zip(ids[i - 1], lps[i - 1]), 1)
        entries += [key[t] + repr(v) + rank_text[r] + tail[t] for r, (t, v) in top if t != tok]
        parts.append("{" + ",".join(entries) + "}")
    return ",".join(parts) + "]"


def sglang_input_logprobs(
    tokens: np.ndarray,
    top_ids: np.ndarray,
    top_logprobs: np.ndarray,
    next_logprob: np.ndarray,
    k: int,
    frags: TokenFragments,
    *,
    with_text: bool = False,
    start: int = 0,
) -> tuple[str, str]:
    """SGLang's ``input_token_logprobs`` and ``input_top_logprobs`` of one row from position ``start`` on,
    as JSON text (shapes as :func:`vllm_prompt_logprobs`): ``[[logprob | null, id, text | null], ...]``
    and ``[null, [[logprob, id, text | null] x k], ...]`` (texts null unless ``with_text``, as SGLang
    without ``return_text_in_logprobs``)."""
    tail = frags.sg_text if with_text else frags.sg_null
    ids = top_ids[:, :k].tolist()
    lps = np.maximum(top_logprobs[:, :k], LOGPROB_FLOOR).tolist()
    nxt = np.maximum(next_logprob, LOGPROB_FLOOR).tolist()
    toks = tokens.tolist()
    token_lps = ["[null" + tail[toks[0]]] + ["[" + repr(nxt[i - 1]) + tail[toks[i]] for i in range(1, len(toks))]
    top = ["null"] + [
        "[" + ",".join(["[" + repr(v) + tail[t] for t, v in zip(ids[i - 1], lps[i - 1])]) + "]"
        for i in range(1, len(toks))
    ]
    return "[" + ",".join(token_lps[start:]) + "]", "[" + ",".join(top[start:]) + "]"
