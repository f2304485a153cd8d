"""The teacher over HTTP: ``jaxpref.serve``'s answers (float64 brute force, vLLM/SGLang shapes, the
stock openai client, 64 concurrent requests, bad requests) and the client (recorded vLLM and SGLang
answers, retries, a server that stays down)."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from jaxpref import models
from jaxpref.serve import build_api
from jaxpref.teacher_client import ServerSettings, TeacherClient, TeacherServerError
from jaxpref.teacher_pass import load_teacher_config
from jaxpref.teacher_server import BackgroundServer, ServeSettings
from jaxpref.teacher_wire import AnswerError, parse_answer, request_body
from tests.teacher.conftest import teacher_config

FIXTURES = Path(__file__).parent / "fixtures"
MAX_K, MAX_LEN = 8, 96


@pytest.fixture(scope="module")
def server(tmp_path_factory, teacher_dir, chat_rows):
    cfg = load_teacher_config(teacher_config(tmp_path_factory.mktemp("serve"), teacher_dir, chat_rows))
    api = build_api(cfg, ServeSettings(max_top_k=MAX_K, max_model_len=MAX_LEN, max_batch_tokens=1024))
    with BackgroundServer(api) as srv:
        yield srv


def post(url: str, body, path: str = "/v1/completions") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def brute_force(teacher_dir: Path, tokens: list[int]) -> np.ndarray:
    """float64 log-softmax of the teacher's full logits, [L, V] (row t: after token t)."""
    model = models.from_pretrained(teacher_dir)
    ids = np.asarray([tokens], np.int32)
    logits = np.asarray(model.logits(model(ids)), np.float64)[0]
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True
    )


PROMPTS = [[1, 5, 7, 9, 11, 200, 3], [3, 4, 5], list(range(20, 80))]


def test_vllm_answer_is_the_teachers_topk_token_logprob_and_rank(server, teacher_dir):
    status, answer = post(server.url, {"prompt": PROMPTS, "prompt_logprobs": 4, "max_tokens": 1})
    assert status == 200 and answer["object"] == "text_completion"
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
    for tokens, choice in zip(PROMPTS, answer["choices"]):
        lp = brute_force(teacher_dir, tokens)
        entries = choice["prompt_logprobs"]
        assert len(entries) == len(tokens) and entries[0] is None
        for i in range(1, len(tokens)):
            row = lp[i - 1]
            top = np.argsort(-row, kind="stable")[:4]
            entry = {int(t): v for t, v in entries[i].items()}
            assert next(iter(entry)) == tokens[i]  # the prompt token first, as vLLM
            assert set(entry) == set(top.tolist()) | {tokens[i]}
            for t, v in entry.items():
                np.testing.assert_allclose(v["logprob"], row[t], atol=2e-5)
                assert v["rank"] == 1 + int((row > row[t] + 1e-6).sum())
                assert isinstance(v["decoded_token"], str)
        assert choice["finish_reason"] == "length" and choice["text"]  # one greedy token
        assert int(np.argmax(lp[-1])) == server.api.tokenizer(choice["text"], add_special_tokens=False)["input_ids"][-1]


def test_sglang_answer_has_the_same_topk_and_the_batch_and_single_shapes(server):
    _, vllm = post(server.url, {"prompt": PROMPTS, "prompt_logprobs": 3, "max_tokens": 1})
    status, batch = post(server.url, request_body("sglang", PROMPTS, 3), "/generate")
    assert status == 200 and isinstance(batch, list) and len(batch) == 3
    meta = batch[0]["meta_info"]
    assert meta["prompt_tokens"] == len(PROMPTS[0]) and meta["completion_tokens"] == 0
    assert [e[1] for e in meta["input_token_logprobs"]] == PROMPTS[0] and meta["input_token_logprobs"][0][0] is None
    from_vllm, from_sglang = parse_answer("vllm", vllm, [len(p) for p in PROMPTS]), parse_answer(
        "sglang", batch, [len(p) for p in PROMPTS]
    )
    for a, b in zip(from_vllm, from_sglang):
        for i in range(1, len(a.valid)):  # vLLM may add the prompt token as a k+1-th entry
            got = dict(zip(a.token_ids[i][a.valid[i]], a.logprobs[i][a.valid[i]]))
            assert all(got[t] == v for t, v in zip(b.token_ids[i][b.valid[i]], b.logprobs[i][b.valid[i]]))
    _, single = post(server.url, {"input_ids": PROMPTS[1], "return_logprob": True, "top_logprobs_num": 2}, "/generate")
    assert isinstance(single, dict) and len(single["meta_info"]["input_top_logprobs"]) == len(PROMPTS[1])


def test_the_stock_openai_client_gets_a_well_formed_vllm_answer(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [server.api.settings.model_name]
    done = client.completions.create(
        model=server.api.settings.model_name, prompt=PROMPTS[0], max_tokens=1, echo=True, logprobs=2,
        extra_body={"prompt_logprobs": 5},
    )  # fmt: skip
    choice = done.choices[0]
    rows = parse_answer("vllm", done.model_dump(), [len(PROMPTS[0])])
    assert (rows[0].valid.sum(-1)[1:] >= 5).all() and (rows[0].valid.sum(-1)[1:] <= 6).all()
    assert len(choice.logprobs.tokens) == len(PROMPTS[0]) + 1 and choice.logprobs.token_logprobs[0] is None
    assert done.usage.prompt_tokens == len(PROMPTS[0]) and done.usage.completion_tokens == 1
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        assert r.status == 200


def test_64_concurrent_requests_are_all_answered_batched_and_none_mixed_up(server):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 400, size=rng.integers(2, MAX_LEN)).tolist() for _ in range(64)]
    settings = ServerSettings(base_url=server.url, server="vllm", top_k=3, concurrency=64)
    with TeacherClient(settings) as client:
        alone = [client.submit([p]).result()[0] for p in prompts[:4]]
        batches_before = server.api.batcher.batches
        barrier = threading.Barrier(64)
        results: list = [None] * 64

        def ask(i: int) -> None:
            barrier.wait()
            results[i] = client.submit([prompts[i]]).result()[0]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert all(r is not None for r in results)
    for p, r in zip(prompts, results):
        assert r.valid.shape[0] == len(p)
    for a, b in zip(alone, results[:4]):  # the same answer alone and among 63 others
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert server.api.batcher.batches - batches_before < 64 / 2  # gathered into shared forward passes


@pytest.mark.parametrize(
    "body, path, status, words",
    [
        ({"prompt": [], "prompt_logprobs": 2}, "/v1/completions", 400, "prompt"),
        ({"prompt": [[1, 2], []], "prompt_logprobs": 2}, "/v1/completions", 400, "empty"),
        ({"prompt": [1, 2, 3], "prompt_logprobs": MAX_K + 1}, "/v1/completions", 400, "max_top_k"),
        ({"prompt": [1, 2, 3], "prompt_logprobs": -1}, "/v1/completions", 400, "prompt_logprobs"),
        ({"prompt": [1, 10**9, 3], "prompt_logprobs": 2}, "/v1/completions", 400, "outside the vocabulary"),
        ({"prompt": [1, -4], "prompt_logprobs": 2}, "/v1/completions", 400, "outside the vocabulary"),
        ({"prompt": [1.5, 2], "prompt_logprobs": 2}, "/v1/completions", 400, "integer token ids"),
        ({"prompt": [1] * (MAX_LEN + 1), "prompt_logprobs": 2}, "/v1/completions", 400, "max_model_len"),
        ({"prompt": [1, 2], "model": "gpt-4"}, "/v1/completions", 404, "does not exist"),
        ({"prompt": [1, 2], "stream": True}, "/v1/completions", 400, "stream"),
        (b"{not json", "/v1/completions", 400, "not JSON"),
        (b"[1, 2]", "/v1/completions", 400, "JSON object"),
        ({"return_logprob": True}, "/generate", 400, "input_ids"),
        ({"input_ids": [5, 6], "top_logprobs_num": 10**6}, "/generate", 400, "top_logprobs_num"),
    ],
)
def test_bad_requests_get_4xx_with_a_message_and_the_server_stays_up(server, body, path, status, words):
    got, answer = post(server.url, body, path)
    assert got == status
    assert words in answer["message"] and answer["error"]["code"] == status
    ok, _ = post(server.url, {"prompt": [1, 2, 3], "prompt_logprobs": 1})
    assert ok == 200


# ------------------------------------------------------------------------------------------ the client


@pytest.mark.parametrize("server_kind, name", [("vllm", "vllm_completions.json"), ("sglang", "sglang_generate.json")])
def test_client_request_and_recorded_answers(server_kind, name):
    """The client's request has the recorded request's fields; the recorded answer parses to the same
    token-aligned rows for both servers (vLLM: choices out of order, the prompt token as a k+1-th entry)."""
    recorded = json.loads((FIXTURES / name).read_text())
    prompts = recorded["request"]["input_ids" if server_kind == "sglang" else "prompt"]
    assert request_body(server_kind, prompts, 2) == recorded["request"]
    rows = parse_answer(server_kind, recorded["answer"], [len(p) for p in prompts])
    assert [len(r.valid) for r in rows] == [4, 3] and not rows[0].valid[0].any()
    first = {int(t): v for t, v in zip(rows[0].token_ids[3][rows[0].valid[3]], rows[0].logprobs[3][rows[0].valid[3]])}
    expected = {3838: -1.02, 40: -1.35} | ({9707: -3.25} if server_kind == "vllm" else {})
    assert first == expected
    second = dict(zip(rows[1].token_ids[1][rows[1].valid[1]].tolist(), rows[1].logprobs[1][rows[1].valid[1]].tolist()))
    assert second == {77091: -0.8812, 872: -0.5421}


@pytest.mark.parametrize(
    "answer, words",
    [
        ({"choices": []}, "choices"),
        ({"choices": [{"index": 0, "prompt_logprobs": [None, None]}]}, "positions"),
        ({"choices": [{"index": 0, "prompt_logprobs": [None, {"x": {"logprob": 1}}, None]}]}, "ValueError"),
        ({"choices": [{"index": 0, "prompt_logprobs": None}]}, "not a list"),
    ],
)
def test_malformed_answers_are_named(answer, words):
    with pytest.raises(AnswerError, match=words):
        parse_answer("vllm", answer, [3])


def test_a_server_that_stays_down_is_a_clear_error_after_the_retries():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    settings = ServerSettings(base_url=f"http://127.0.0.1:{port}", server="vllm", top_k=2, retries=2, timeout_s=5)
    with TeacherClient(settings) as client, pytest.raises(TeacherServerError, match="did not answer after 3 attempts"):
        client.submit([np.array([1, 2, 3])]).result(60)
    assert client.retried == 2


def test_a_server_that_comes_back_is_retried_until_it_answers(server):
    """The first attempts fail (nothing listens yet), then a server starts on that port: answered."""
    from aiohttp import web

    from jaxpref.teacher_server import Batcher, TeacherAPI, make_app

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServerSettings(base_url=f"http://127.0.0.1:{port}", server="vllm", top_k=2, retries=6)
    with TeacherClient(settings) as client:
        future = client.submit([np.array([1, 2, 3])])
        threading.Event().wait(1.0)  # two failed attempts (0.5 s backoff, then 1 s)
        a = server.api  # the same teacher, with a batcher of this event loop
        api = TeacherAPI(Batcher(a.batcher.scorer), a.tokenizer, a.vocab, a.settings)
        runner = web.AppRunner(make_app(api))
        asyncio.run_coroutine_threadsafe(runner.setup(), loop).result(10)
        asyncio.run_coroutine_threadsafe(web.TCPSite(runner, "127.0.0.1", port).start(), loop).result(10)
        rows = future.result(60)
        assert client.retried >= 1 and rows[0].valid[1:].all(-1).any()
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    asyncio.run_coroutine_threadsafe(api.batcher.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)


def test_the_server_applies_kd_teacher_adapter(tmp_path, teacher_dir, chat_rows):
    """kd_teacher_adapter: the served log-probs are those of the teacher with the PEFT adapter (merged)."""
    import jax
    from flax import nnx

    from jaxpref import lora

    model = models.from_pretrained(teacher_dir)
    lora.apply_lora(model, lora.LoraConfig(r=2, alpha=8.0, dropout=0.0, target_modules=("q_proj", "down_proj")),
                    rngs=nnx.Rngs(0))  # fmt: skip
    for var in jax.tree.leaves(nnx.state(model, nnx.LoRAParam), is_leaf=lambda x: isinstance(x, nnx.Variable)):
        var.value = jax.random.normal(jax.random.key(var.value.size), var.value.shape) * 0.3  # B != 0: it matters
    lora.export_peft_adapter(model, tmp_path / "adapter")
    merged = tmp_path / "merged"
    models.save_pretrained(lora.merge_lora(model), merged)
    cfg = load_teacher_config(
        teacher_config(tmp_path, teacher_dir, chat_rows, kd_teacher_adapter=str(tmp_path / "adapter"))
    )
    with BackgroundServer(build_api(cfg, ServeSettings(max_top_k=MAX_K, max_model_len=MAX_LEN))) as srv:
        _, answer = post(srv.url, {"prompt": PROMPTS[0], "prompt_logprobs": 3})
    with_adapter, base = brute_force(merged, PROMPTS[0]), brute_force(teacher_dir, PROMPTS[0])
    got = answer["choices"][0]["prompt_logprobs"]
    for i in range(1, len(PROMPTS[0])):
        for t, v in got[i].items():
            np.testing.assert_allclose(v["logprob"], with_adapter[i - 1, int(t)], atol=2e-5)
    assert np.abs(with_adapter - base).max() > 1e-2


def test_axolotls_online_collator_requests_are_answered_as_it_parses_them(server):
    """The bodies axolotl's OnlineTeacherCollator sends (integrations/kd/collator_online_teacher.py), with
    its extra fields, and the checks its parser makes on the answers."""
    k = 4
    vllm_body = {
        "prompt": PROMPTS, "echo": True, "logprobs": True, "prompt_logprobs": k, "top_logprobs": k,
        "max_new_tokens": 0, "skip_special_tokens": False, "temperature": 2.0, "sampling_params": {"max_tokens": 0},
    }  # fmt: skip
    status, answer = post(server.url, vllm_body)
    assert status == 200 and len(answer["choices"]) == len(PROMPTS)
    for tokens, choice in zip(PROMPTS, answer["choices"]):
        positions = choice["prompt_logprobs"]
        assert len(positions) == len(tokens) and positions[0] is None
        assert all(isinstance(p, dict) and all(isinstance(v, dict) for v in p.values()) for p in positions[1:])
        assert all(len(p) >= k for p in positions[1:])
    sglang_body = {
        "input_ids": PROMPTS, "return_logprob": True, "top_logprobs_num": k, "logprob_start_len": 0,
        "return_text_in_logprobs": True, "echo": True,
        "sampling_params": {"max_new_tokens": 0, "temperature": 2.0, "skip_special_tokens": False},
    }  # fmt: skip
    status, answer = post(server.url, sglang_body, "/generate")
    assert status == 200 and isinstance(answer, list) and len(answer) == len(PROMPTS)
    for tokens, item in zip(PROMPTS, answer):
        top = item["meta_info"]["input_top_logprobs"]
        assert len(top) == len(tokens) and top[0] is None
        assert all(len(p) == k and all(len(e) == 3 and isinstance(e[2], str) for e in p) for p in top[1:])
    # the request's temperature does not change prompt log-probs (docs/kd_server.md)
    _, cold = post(server.url, {**vllm_body, "temperature": 0.5})
    _, warm = post(server.url, {**vllm_body, "temperature": 2.0})
    assert cold["choices"][0]["prompt_logprobs"] == warm["choices"][0]["prompt_logprobs"]
