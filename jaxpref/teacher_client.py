"""An HTTP client for a teacher's prompt log-probs: vLLM, SGLang or ``python -m jaxpref.serve``.

:class:`TeacherClient` runs an aiohttp session on an event loop in a background thread. ``submit``
sends one request for a list of rows (token ids) and returns a ``concurrent.futures.Future`` of their
token-aligned :class:`~jaxpref.data.formats.kd.TeacherRows`; at most ``concurrency`` requests are in
flight. A request that fails for a reason that may pass (no connection, a timeout after
``timeout_s``, HTTP 5xx or 429) is retried ``retries`` times with exponential backoff (0.5 s, 1 s, ...
capped at 30 s); after that, or at once for an answer that cannot be right (HTTP 4xx, a malformed
answer), the future raises :class:`TeacherServerError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import numpy as np
import orjson

from jaxpref.data.formats.kd import TeacherRows
from jaxpref.errors import UserError
from jaxpref.teacher_wire import PATHS, AnswerError, parse_answer, request_body

logger = logging.getLogger("jaxpref")

BACKOFF_START_S, BACKOFF_MAX_S = 0.5, 30.0
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class TeacherServerError(UserError):
    """The teacher server is unreachable, or answered something unusable."""


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """Where and how to ask (the config's ``kd_online_*`` keys, docs/config.md)."""

    base_url: str  # e.g. http://127.0.0.1:8000 (no /v1)
    server: str  # "vllm" | "sglang"
    top_k: int
    model: str | None = None  # vLLM's "model" field (kd_online_server_model)
    timeout_s: float = 120.0
    concurrency: int = 4
    retries: int = 8

    @classmethod
    def from_config(cls, cfg: Any) -> ServerSettings:
        return cls(
            base_url=cfg.kd_online_server_base_url.rstrip("/"),
            server=cfg.kd_online_server,
            top_k=int(cfg.kd_online_topk),
            model=cfg.kd_online_server_model,
            timeout_s=float(cfg.kd_online_timeout),
            concurrency=int(cfg.kd_online_concurrency),
            retries=int(cfg.kd_online_retries),
        )

    @property
    def url(self) -> str:
        return self.base_url + PATHS[self.server]


class _Retry(Exception):
    """A failure that may pass: try again after the backoff."""


class TeacherClient:
    """Requests to one teacher server from any thread; see the module docstring."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.requests = 0  # answered requests (for logs and tests)
        self.retried = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="teacher-client", daemon=True)
        self._thread.start()
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None

    def submit(self, rows: Sequence[np.ndarray]) -> concurrent.futures.Future[list[TeacherRows]]:
        """Ask for the top-k of every row (int token ids [L_i]); the rows of the answer, in order."""
        return asyncio.run_coroutine_threadsafe(self._score([np.asarray(r) for r in rows]), self._loop)

    def close(self) -> None:
        if self._loop.is_closed():
            return

        async def shutdown() -> None:
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pending:  # requests asked ahead that nobody waits for any more
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if self._session is not None:
                await self._session.close()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- on the client's event loop -----------------------------------------------------------
    async def _score(self, rows: list[np.ndarray]) -> list[TeacherRows]:
        s = self.settings
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=s.timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0))
            self._slots = asyncio.Semaphore(s.concurrency)
        body = request_body(s.server, rows, s.top_k, s.model)
        lengths = [len(r) for r in rows]
        assert self._slots is not None
        async with self._slots:
            start, last = time.monotonic(), ""
            for attempt in range(s.retries + 1):
                if attempt:
                    self.retried += 1
                    await asyncio.sleep(min(BACKOFF_START_S * 2 ** (attempt - 1), BACKOFF_MAX_S))
                try:
                    answer = await self._post(body)
                except _Retry as e:
                    last = str(e)
                    logger.warning("teacher server %s: %s (attempt %d of %d)", s.url, last, attempt + 1, s.retries + 1)
                    continue
                try:
                    rows_out = parse_answer(s.server, answer, lengths)
                except AnswerError as e:
                    raise TeacherServerError(
                        f"the teacher server at {s.url} gave an answer that is not a {s.server} answer to the "
                        f"request for {len(rows)} prompt(s): {e}. Check kd_online_server ({s.server}) against "
                        "the server that runs there."
                    ) from None
                self.requests += 1
                return rows_out
        raise TeacherServerError(
            f"the teacher server at {s.url} did not answer after {s.retries + 1} attempts over "
            f"{time.monotonic() - start:.0f} s (last error: {last}). Check that it is running and reachable "
            "(kd_online_server_base_url), or raise kd_online_timeout / kd_online_retries."
        )

    async def _post(self, body: dict[str, Any]) -> Any:
        assert self._session is not None
        try:
            async with self._session.post(self.settings.url, json=body) as response:
                if response.status in RETRY_STATUSES:
                    raise _Retry(f"HTTP {response.status}: {(await response.text())[:300]}")
                if response.status >= 400:
                    raise TeacherServerError(
                        f"the teacher server at {self.settings.url} refused the request with HTTP "
                        f"{response.status}: {(await response.text())[:500]}"
                    )
                try:
                    return orjson.loads(await response.read())
                except orjson.JSONDecodeError as e:
                    url = self.settings.url
                    raise TeacherServerError(f"the teacher server at {url} answered with no JSON: {e}") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            raise _Retry(f"{type(e).__name__}: {e}") from None
        except TimeoutError:
            raise _Retry(f"no answer within kd_online_timeout={self.settings.timeout_s:g} s") from None
