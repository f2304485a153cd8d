"""A JAX teacher served over HTTP with vLLM's and SGLang's prompt-log-prob APIs (aiohttp).

Endpoints (request and answer fields: ``jaxpref.teacher_wire``; docs/kd_server.md):

* ``POST /v1/completions``: vLLM's completions API. ``prompt`` (token ids, a list of them, a string or
  a list of strings), ``prompt_logprobs`` (k), ``echo``, ``logprobs``, ``max_tokens``, ``temperature``,
  ``model``; other fields (``max_new_tokens``, ``sampling_params``, ``skip_special_tokens``, ...) are
  accepted and ignored, as vLLM does.
* ``POST /generate``: SGLang's native API. ``input_ids`` or ``text`` (one or a batch),
  ``return_logprob``, ``logprob_start_len``, ``top_logprobs_num``, ``return_text_in_logprobs``,
  ``sampling_params.max_new_tokens``.
* ``GET /v1/models``, ``GET /health``.

The server scores prompts: prompt log-probs are at temperature 1 over the full vocabulary whatever
the request's ``temperature`` (as vLLM's default ``raw_logprobs`` mode), and it generates at most one
token, greedily (``max_tokens`` / ``max_new_tokens`` >= 1), enough for clients that ask for one.

Concurrent requests are batched: :class:`Batcher` gathers the rows of every request waiting (after
``batch_wait_ms``) and :class:`Scorer` packs them (as segments, like the training pipeline) into
jitted forward passes of a few bucketed shapes ([B, T]: T a multiple of 64 (``bucket``), B in 1, 2, 3,
4, 6, 8, 12, ... (``batch_bucket``), B * T <= ``max_batch_tokens``), with the
top-k on the device (``teacher_topk.topk_and_token_logprobs``): the host sees [B, T, k], never
[B, T, vocab]. Bad requests get HTTP 400 (404 for an unknown model) with a message; the server
stays up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import orjson
from aiohttp import web

from jaxpref.teacher_wire import TokenFragments, sglang_input_logprobs, vllm_prompt_logprobs

logger = logging.getLogger("jaxpref")

Scores = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # ids [L, k], logprobs [L, k], next lp [L], rank [L]
MIN_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "teacher"
    max_top_k: int = 20  # vLLM's default max_logprobs
    max_model_len: int = 2048
    max_batch_tokens: int = 16384  # B * T of one forward pass
    batch_wait_ms: float = 0.0  # how long a batch waits for more requests before it runs


class RequestError(Exception):
    """A request the server cannot answer; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def bucket(n: int, cap: int) -> int:
    """The padded length of an ``n``-token row: a multiple of 64 from 64 up, in steps of 1/8 of the next
    power of two from 512 (at most 12.5% padding there), capped at ``cap`` rounded up to 64."""
    power = MIN_BUCKET
    while power < n:
        power *= 2
    step = max(MIN_BUCKET, power // 8)
    return min(-(-max(n, 1) // step) * step, -(-cap // MIN_BUCKET) * MIN_BUCKET)


def batch_bucket(n: int) -> int:
    """The padded row count of a pass of ``n`` sequences: 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (at most a
    third of the rows empty, and few shapes to compile)."""
    power = 1
    while True:
        for size in (power, power * 3 // 2):
            if size >= n:
                return size
        power *= 2


class Scorer:
    """The teacher on a mesh; ``__call__(rows)`` scores rows of token ids in bucketed forward passes.

    Row r's answer is prediction-aligned: entry t is the distribution after token t (top-k ids and
    log-probs) and the log-prob and rank of token t + 1 (entry L - 1: of token id 0, unused). Rows are packed
    as segments of [B, T] sequences (positions restart per row), so short rows share a sequence.
    """

    def __init__(self, model: Any, mesh: Any, k: int, max_batch_tokens: int, max_model_len: int):
        from flax import nnx

        from jaxpref import sharding as shd
        from jaxpref.teacher_topk import topk_and_token_logprobs

        self.mesh, self.k = mesh, k
        self.max_batch_tokens, self.max_model_len = max_batch_tokens, max_model_len
        self.divisor = shd.batch_divisor(mesh)
        self.sharding = shd.batch_sharding(mesh)
        graphdef, self.state = nnx.split(model)
        self.shapes: set[tuple[int, int]] = set()  # compiled [B, T] buckets
        softcap = model.config.final_logit_softcapping

        def forward(state: Any, ids: jax.Array, positions: jax.Array, segment_ids: jax.Array, nxt: jax.Array):
            m = nnx.merge(graphdef, state)
            hidden = m(ids, positions=positions, segment_ids=segment_ids, deterministic=True)
            return topk_and_token_logprobs(hidden, m.lm_head_weight(), nxt, k, softcap=softcap)

        self._forward = jax.jit(forward)

    def plan(self, lengths: Sequence[int]) -> tuple[int, list[list[list[int]]]]:
        """(T, passes): rows packed into sequences of T = the longest row's bucket (first fit, longest rows
        first; a sequence holds rows one after another as segments), sequences grouped into passes of
        B * T <= max_batch_tokens. A pass is a list of sequences, a sequence a list of row indices."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        t = bucket(lengths[order[0]], self.max_model_len)
        sequences: list[list[int]] = []
        free: list[int] = []
        for i in order:
            at = next((j for j, room in enumerate(free) if room >= lengths[i]), None)
            if at is None:
                sequences.append([i])
                free.append(t - lengths[i])
            else:
                sequences[at].append(i)
                free[at] -= lengths[i]
        rows = self.rows_per_pass(t)
        return t, [sequences[i : i + rows] for i in range(0, len(sequences), rows)]

    def rows_per_pass(self, t: int) -> int:
        """The most [T]-sequences in one pass: B * T <= max_batch_tokens, a multiple of the batch devices."""
        return max(self.divisor, (self.max_batch_tokens // t) // self.divisor * self.divisor)

    def __call__(self, rows: Sequence[np.ndarray]) -> list[Scores]:
        t, passes = self.plan([len(r) for r in rows])
        rows_cap = self.rows_per_pass(t)
        dispatched = []
        for sequences in passes:  # all passes dispatched first: the host packs the next while one runs
            b = -(-min(batch_bucket(len(sequences)), rows_cap) // self.divisor) * self.divisor
            ids, segment_ids, positions, nxt = (np.zeros((b, t), np.int32) for _ in range(4))
            spans = []
            for j, sequence in enumerate(sequences):
                offset = 0
                for segment, r in enumerate(sequence, start=1):
                    n = len(rows[r])
                    ids[j, offset : offset + n] = rows[r]
                    nxt[j, offset : offset + n - 1] = rows[r][1:]
                    segment_ids[j, offset : offset + n] = segment
                    positions[j, offset : offset + n] = np.arange(n)
                    spans.append((r, j, offset, n))
                    offset += n
            args = [jax.device_put(a, self.sharding) for a in (ids, positions, segment_ids, nxt)]
            self.shapes.add((b, t))
            with jax.set_mesh(self.mesh):
                dispatched.append((spans, self._forward(self.state, *args)))
        results: list[Scores | None] = [None] * len(rows)
        for spans, out in dispatched:
            out = jax.device_get(out)
            for r, j, offset, n in spans:
                results[r] = tuple(a[j, offset : offset + n] for a in out)  # type: ignore[assignment]
        return results  # type: ignore[return-value]


class Batcher:
    """Gathers the rows of concurrent requests into one :class:`Scorer` call at a time."""

    def __init__(self, scorer: Callable[[list[np.ndarray]], list[Scores]], wait_s: float = 0.0):
        self.scorer, self.wait_s = scorer, wait_s
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="teacher-forward")
        self.batches = 0
        self._task: asyncio.Task | None = None

    async def score(self, rows: list[np.ndarray]) -> list[Scores]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((rows, future))
        return await future

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            waiting = [await self.queue.get()]
            if self.wait_s:
                await asyncio.sleep(self.wait_s)
            while not self.queue.empty():
                waiting.append(self.queue.get_nowait())
            waiting = [(rows, f) for rows, f in waiting if not f.cancelled()]  # the client went away
            flat = [r for rows, _ in waiting for r in rows]
            try:
                scores = await loop.run_in_executor(self.pool, self.scorer, flat) if flat else []
            except Exception as e:  # every waiting request gets the error; the server goes on
                logger.exception("teacher forward pass failed")
                for _, f in waiting:
                    if not f.done():
                        f.set_exception(e)
                continue
            self.batches += 1
            start = 0
            for rows, f in waiting:
                if not f.done():
                    f.set_result(scores[start : start + len(rows)])
                start += len(rows)


# ------------------------------------------------------------------------------------------ requests


def _int(body: dict[str, Any], key: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool):
        value = int(value)
    if not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"{key}: {value!r} must be an integer in [{low}, {high}]")
    return value


class TeacherAPI:
    """The request handlers: parse and check a request, score it, answer in the API's shape."""

    def __init__(self, batcher: Batcher, tokenizer: Any, vocab_size: int, settings: ServeSettings):
        self.batcher, self.tokenizer, self.vocab, self.settings = batcher, tokenizer, vocab_size, settings
        self.max_k = min(settings.max_top_k, vocab_size)
        # each token's decoded text, once (ids past the tokenizer's length, in a padded embedding: "")
        known = 0 if tokenizer is None else min(len(tokenizer), vocab_size)
        self.texts = tokenizer.batch_decode([[t] for t in range(known)]) if known else []
        self.texts += [""] * (vocab_size - known)
        self.frags = TokenFragments(vocab_size, self.texts if tokenizer is not None else None)

    def text(self, token: int) -> str:
        return self.texts[token]

    def _rows(self, prompt: Any, key: str) -> list[np.ndarray]:
        """Token-id rows from a prompt field: ids, a list of ids, a string or a list of strings."""
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], (int, str))):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise RequestError(f"{key}: give token ids, a list of token-id lists, a string or a list of strings")
        rows = []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise RequestError(f"{key}[{i}]: this server has no tokenizer; send token ids")
                p = self.tokenizer(p)["input_ids"]
            if not isinstance(p, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                raise RequestError(f"{key}[{i}]: not a list of integer token ids")
            if not p:
                raise RequestError(f"{key}[{i}]: the prompt is empty")
            if len(p) > self.settings.max_model_len:
                raise RequestError(
                    f"{key}[{i}]: {len(p)} tokens is more than this server's max_model_len "
                    f"{self.settings.max_model_len}"
                )
            bad = [t for t in p if not 0 <= t < self.vocab]
            if bad:
                raise RequestError(f"{key}[{i}]: token id {bad[0]} is outside the vocabulary [0, {self.vocab})")
            rows.append(np.asarray(p, np.int32))
        return rows

    def _k(self, body: dict[str, Any], key: str) -> int | None:
        try:
            return _int(body, key, None, 0, self.max_k)
        except RequestError:
            raise RequestError(
                f"{key}: {body.get(key)!r} must be an integer in [0, {self.max_k}] (this server's max_top_k "
                f"{self.settings.max_top_k}, vocabulary {self.vocab})"
            ) from None

    async def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        model = body.get("model")
        if model not in (None, self.settings.model_name):
            raise RequestError(f"The model `{model}` does not exist (this server has {self.settings.model_name}).", 404)
        if body.get("stream"):
            raise RequestError("stream: not supported by jaxpref.serve (it scores prompts)")
        if body.get("best_of") not in (None, 1):
            raise RequestError("best_of: not supported by jaxpref.serve (it scores prompts)")
        if body.get("n") not in (None, 1):
            raise RequestError("n: jaxpref.serve returns one completion per prompt")
        rows = self._rows(body.get("prompt"), "prompt")
        k_prompt, k_out = self._k(body, "prompt_logprobs"), self._k(body, "logprobs")
        new = min(_int(body, "max_tokens", 16, 0, 1 << 30), 1)
        echo = bool(body.get("echo"))
        scores = await self.batcher.score(rows)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            None, self._completion_answer, rows, scores, k_prompt, k_out, new, echo
        )

    def _completion_answer(self, rows, scores, k_prompt, k_out, new, echo) -> dict[str, Any]:
        choices, total = [], 0
        for i, (tokens, (ids, lps, nxt_lp, rank)) in enumerate(zip(rows, scores)):
            generated = [int(ids[-1, 0])] if new else []
            choice: dict[str, Any] = {
                "index": i,
                "text": (self._decode(tokens) if echo else "") + self._decode(generated),
                "logprobs": self._completion_logprobs(tokens, generated, ids, lps, nxt_lp, k_out, echo),
                "finish_reason": "length",
                "stop_reason": None,
                "prompt_logprobs": None
                if k_prompt is None
                else orjson.Fragment(vllm_prompt_logprobs(tokens, ids, lps, nxt_lp, rank, k_prompt, self.frags)),
            }
            choices.append(choice)
            total += len(tokens)
        n_new = len(rows) if new else 0
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.settings.model_name,
            "choices": choices,
            "usage": {"prompt_tokens": total, "completion_tokens": n_new, "total_tokens": total + n_new},
        }

    def _decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(map(int, tokens))) if self.tokenizer is not None and len(tokens) else ""

    def _completion_logprobs(self, tokens, generated, ids, lps, nxt_lp, k, echo) -> dict[str, Any] | None:
        """OpenAI's ``choices[i].logprobs`` over the echoed prompt (if ``echo``) and the generated token."""
        if k is None:
            return None
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = 0
        entries = []
        if echo:
            entries.append((int(tokens[0]), None, None))
            entries += [(int(tokens[i]), float(nxt_lp[i - 1]), i - 1) for i in range(1, len(tokens))]
        entries += [(g, float(lps[-1, 0]), len(tokens) - 1) for g in generated]
        for token, lp, at in entries:
            piece = self.text(token)
            out["tokens"].append(piece)
            out["token_logprobs"].append(None if lp is None else max(lp, -9999.0))
            top = None if at is None else zip(ids[at, :k].tolist(), lps[at, :k].tolist())
            out["top_logprobs"].append(None if top is None else {self.text(t): max(v, -9999.0) for t, v in top})
            out["text_offset"].append(offset)
            offset += len(piece)
        return out

    async def generate(self, body: dict[str, Any]) -> Any:
        if "input_ids" in body and body["input_ids"] is not None:
            field, key = body["input_ids"], "input_ids"
        elif "text" in body and body["text"] is not None:
            field, key = body["text"], "text"
        else:
            raise RequestError("give input_ids (token ids, or a list of them) or text")
        single = isinstance(field, str) or (isinstance(field, list) and field and isinstance(field[0], int))
        rows = self._rows(field, key)
        logprob = bool(body.get("return_logprob"))
        start = _int(body, "logprob_start_len", 0, -1, 1 << 30)
        k = self._k(body, "top_logprobs_num") or 0
        params = body.get("sampling_params") or {}
        if not isinstance(params, dict):
            raise RequestError("sampling_params: must be an object")
        new = min(_int(params, "max_new_tokens", 128, 0, 1 << 30), 1)
        with_text = bool(body.get("return_text_in_logprobs"))
        scores = await self.batcher.score(rows)
        loop = asyncio.get_running_loop()
        answers = await loop.run_in_executor(
            None, self._generate_answers, rows, scores, logprob, max(start or 0, 0), k, new, with_text
        )
        return answers[0] if single else answers

    def _generate_answers(self, rows, scores, logprob, start, k, new, with_text) -> list[dict[str, Any]]:
        out = []
        for tokens, (ids, lps, nxt_lp, _) in zip(rows, scores):
            generated = [int(ids[-1, 0])] if new else []
            meta: dict[str, Any] = {
                "id": uuid.uuid4().hex,
                "finish_reason": {"type": "length", "length": len(generated)},
                "prompt_tokens": len(tokens),
                "completion_tokens": len(generated),
                "cached_tokens": 0,
            }
            if logprob:
                token_lps, top = sglang_input_logprobs(
                    tokens, ids, lps, nxt_lp, k, self.frags, with_text=with_text, start=start
                )
                meta["input_token_logprobs"] = orjson.Fragment(token_lps)
                meta["input_top_logprobs"] = orjson.Fragment(top) if k else [None] * max(len(tokens) - start, 0)
                text = (lambda t: self.text(t)) if with_text else (lambda t: None)
                meta["output_token_logprobs"] = [[max(float(lps[-1, 0]), -9999.0), g, text(g)] for g in generated]
                meta["output_top_logprobs"] = [
                    [[max(float(v), -9999.0), int(t), text(int(t))] for t, v in zip(ids[-1, :k], lps[-1, :k])]
                    for _ in generated
                ] if k else [None] * len(generated)
            out.append({"text": self._decode(generated), "output_ids": generated, "meta_info": meta})
        return out


# ------------------------------------------------------------------------------------------ the app


def _error(message: str, status: int) -> web.Response:
    kind = {404: "NotFoundError"}.get(status, "BadRequestError" if status < 500 else "InternalServerError")
    body = {"object": "error", "message": message, "type": kind, "param": None, "code": status}
    return web.json_response({**body, "error": {k: v for k, v in body.items() if k != "object"}}, status=status)


def make_app(api: TeacherAPI) -> web.Application:
    """The aiohttp application of ``api`` (routes in the module docstring)."""

    def endpoint(handler: Callable[[dict[str, Any]], Any]) -> Callable:
        async def handle(request: web.Request) -> web.Response:
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError as e:
                return _error(f"the request body is not JSON: {e}", 400)
            if not isinstance(body, dict):
                return _error("the request body must be a JSON object", 400)
            try:
                answer = await handler(body)
            except RequestError as e:
                return _error(str(e), e.status)
            except Exception as e:  # a failed request must not take the server down
                logger.exception("request failed")
                return _error(f"{type(e).__name__}: {e}", 500)
            return web.Response(body=orjson.dumps(answer), content_type="application/json")

        return handle

    async def models(_: web.Request) -> web.Response:
        s = api.settings
        card = {"id": s.model_name, "object": "model", "created": int(time.time()), "owned_by": "jaxpref",
                "root": s.model_name, "parent": None, "max_model_len": s.max_model_len}  # fmt: skip
        return web.json_response({"object": "list", "data": [card]})

    async def health(_: web.Request) -> web.Response:
        return web.Response(status=200)

    app = web.Application(client_max_size=256 * 1024 * 1024)
    app.router.add_post("/v1/completions", endpoint(api.completions))
    app.router.add_post("/generate", endpoint(api.generate))
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    return app


async def start(api: TeacherAPI, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start serving ``api`` on ``host:port`` (0: any free port); returns the runner and the port."""
    runner = web.AppRunner(make_app(api), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


class BackgroundServer:
    """``api`` served on ``host`` (any free port) from an event loop in a background thread, for tests,
    benchmarks and notebooks; ``url`` is its base URL. ``close()`` stops it."""

    def __init__(self, api: TeacherAPI, host: str = "127.0.0.1"):
        import threading

        self.api = api
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="teacher-server", daemon=True)
        self._thread.start()
        self._runner, port = asyncio.run_coroutine_threadsafe(start(api, host, 0), self._loop).result(60)
        self.url = f"http://{host}:{port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(60)
        asyncio.run_coroutine_threadsafe(self.api.batcher.stop(), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
