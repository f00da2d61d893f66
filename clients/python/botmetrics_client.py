"""Python client for botmetrics: count a bot's events without slowing it down.

    metrics = BotMetrics("http://127.0.0.1:9464", token="secret1")
    metrics.message(user_id, "user")              # never blocks, never raises on I/O
    ...
    await metrics.close()                          # on shutdown: send what is left

Standard library only. ``track()`` appends to a bounded in-memory queue and
returns; a background asyncio task posts the queue in batches (every
``batch_size`` events or every ``flush_interval`` seconds, whichever comes
first). HTTP runs in a worker thread (``asyncio.to_thread``) so the event loop
never waits on the network.

Delivery guarantees:

* Every event gets a random ``event_id`` when it is tracked. A batch that
  failed (server down, timeout, 5xx) is retried with exponential backoff
  using the same ids, so the server counts each event once even when a
  retry repeats a request that had in fact arrived (botmetrics remembers ids
  for its dedupe window, 10 minutes by default).
* Every event also carries the time it was tracked (``ts``), so an event
  delivered late after an outage still lands in the right day.
* While the server is unreachable the queue keeps the newest ``max_queue``
  events and drops the oldest, counting them in ``dropped``. The batch being
  retried (at most ``batch_size`` events) is held outside the queue.
* A batch the server refuses as invalid (4xx) is not retried: retrying cannot
  fix it. When the server names the faulty event (422 with ``index``), only
  that event is dropped and the rest are sent again. Refused events are
  counted in ``rejected`` and logged.

Call ``track()`` and the helpers from the event loop's thread (asyncio
handlers are). The background task starts on the first call made inside a
running loop, or explicitly with ``start()`` / ``async with``. Python 3.10+.
"""

from __future__ import annotations

import asyncio
import collections
import http.client
import json
import logging
import random
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Mapping, Optional, Sequence, Union

__all__ = ["BotMetrics", "BotMetricsError"]

log = logging.getLogger("botmetrics")

UserId = Union[int, str]
Tokens = Union[Mapping[str, int], Sequence[int], None]

# Client errors that retrying cannot fix: the request itself is wrong.
_NOT_RETRYABLE = {400, 401, 403, 404, 413, 415, 422}


class BotMetricsError(Exception):
    """The server answered a request with an error status."""

    def __init__(self, status: int, body: str):
        super().__init__(f"botmetrics answered {status}: {body[:200]}")
        self.status = status
        self.body = body


class BotMetrics:
    """Batches a bot's events to a botmetrics server.

    Counters, for the bot's own logs and tests:
    ``sent`` events the server acknowledged (``duplicates`` of them it had
    already counted), ``dropped`` events pushed out of a full queue (or
    tracked after ``close()``),
    ``rejected`` events the server refused as invalid, ``requests`` POSTs
    attempted, ``retries`` failed attempts that will be retried.
    """

    def __init__(
        self,
        url: str,
        token: str,
        batch_size: int = 100,
        flush_interval: float = 1.0,
        max_queue: int = 10000,
        *,
        timeout: float = 5.0,
        max_backoff: float = 30.0,
    ):
        if batch_size < 1 or max_queue < 1:
            raise ValueError("batch_size and max_queue must be at least 1")
        self.url = url.rstrip("/")
        self._token = token
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_queue = max_queue
        self.timeout = timeout
        self.max_backoff = max_backoff

        self.sent = 0
        self.duplicates = 0
        self.dropped = 0
        self.rejected = 0
        self.requests = 0
        self.retries = 0

        # A deque without maxlen: dropping by hand lets us count the drops.
        self._queue: collections.deque[dict] = collections.deque()
        self._inflight = 0
        self._task: Optional[asyncio.Task] = None
        # Set to make the sender post now (batch full, flush(), close()).
        self._wake = asyncio.Event()
        # Set by the sender each time it has emptied the queue.
        self._idle = asyncio.Event()
        self._closed = False

    # ------------------------------------------------------------------ life

    @property
    def pending(self) -> int:
        """Events tracked but not yet acknowledged (queued or in flight)."""
        return len(self._queue) + self._inflight

    def start(self) -> None:
        """Start the background sender on the running loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="botmetrics-sender"
            )

    async def flush(self, timeout: Optional[float] = None) -> bool:
        """Send everything tracked so far. True when all of it was
        acknowledged, False when ``timeout`` seconds passed first (the
        events stay queued and are retried)."""
        self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.pending:
            self._idle.clear()
            self._wake.set()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            if not await _wait(self._idle, remaining):
                return False
        return True

    async def close(self, timeout: float = 5.0) -> bool:
        """Flush for at most ``timeout`` seconds, then stop the sender.
        Returns True when nothing was left unsent."""
        self._closed = True
        delivered = await self.flush(timeout) if self.pending else True
        if self._task is not None:
            self._task.cancel()
            # asyncio.wait neither raises the task's CancelledError nor hides
            # a cancellation of close() itself.
            await asyncio.wait({self._task})
            self._task = None
        if not delivered:
            log.warning("botmetrics: closing with %d events unsent", self.pending)
        return delivered

    async def __aenter__(self) -> "BotMetrics":
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----------------------------------------------------------------- track

    def track(self, type: str, **fields: Any) -> None:
        """Queue one event of the given type. Never blocks, never does I/O.
        Fields that are None are left out, so optional arguments can be
        passed through as they are."""
        if self._closed:
            # A handler still running during shutdown must not crash on metrics.
            self.dropped += 1
            return
        event = {"type": type, "event_id": uuid.uuid4().hex, "ts": round(time.time(), 3)}
        event.update((k, v) for k, v in fields.items() if v is not None)
        if len(self._queue) >= self.max_queue:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(event)
        try:
            self.start()
        except RuntimeError:
            return  # no running loop yet: start() or the first call in a loop sends it
        if len(self._queue) >= self.batch_size:
            self._wake.set()

    def message(self, user_id: UserId, role: str = "user", *, db_queries: Optional[int] = None,
                chat_type: Optional[str] = None) -> None:
        """A message: ``role`` is "user" (received) or "assistant" (sent).
        ``db_queries``: how many database queries handling it took."""
        self.track("message", user_id=user_id, role=role, db_queries=db_queries, chat_type=chat_type)

    def response(self, user_id: UserId, status: str = "success", duration_ms: float = 0.0, *,
                 model: Optional[str] = None, tokens: Tokens = None,
                 chat_type: Optional[str] = None) -> None:
        """An LLM call's outcome: ``status`` is success, error, rate_limited
        or timeout. ``tokens``: {"prompt": n, "completion": m} or (n, m)."""
        if tokens is not None and not isinstance(tokens, Mapping):
            prompt, completion = tokens
            tokens = {"prompt": prompt, "completion": completion}
        self.track("response", user_id=user_id, status=status, duration_ms=duration_ms,
                   model=model, tokens=tokens, chat_type=chat_type)

    def measure_response(self, user_id: UserId, *, model: Optional[str] = None) -> "_ResponseTimer":
        """Context manager timing an LLM call and sending a ``response``
        event when it ends: success, timeout (on TimeoutError) or error (on
        any other exception, which is re-raised). Set ``.tokens`` or
        ``.status`` on it inside the block to report more."""
        return _ResponseTimer(self, user_id, model)

    def cache(self, hit: Union[bool, str], *, cache: Optional[str] = None,
              user_id: Optional[UserId] = None) -> None:
        """A cache lookup: ``hit`` is True/False or "hit"/"miss"."""
        result = hit if isinstance(hit, str) else ("hit" if hit else "miss")
        self.track("cache", result=result, cache=cache, user_id=user_id)

    def user_registered(self, user_id: UserId) -> None:
        """A new user (first /start)."""
        self.track("user_registered", user_id=user_id)

    def consent(self, user_id: UserId, granted: bool) -> None:
        """The user's answer to the consent (privacy policy) question."""
        self.track("consent", user_id=user_id, granted=bool(granted))

    def limit_reached(self, user_id: UserId) -> None:
        """The user hit the bot's daily message limit."""
        self.track("limit_reached", user_id=user_id)

    def error(self, kind: str, *, user_id: Optional[UserId] = None) -> None:
        """An error in the bot, by a short kind name (``[A-Za-z0-9_.:-]``)."""
        self.track("error", kind=kind, user_id=user_id)

    def custom(self, name: str, value: Optional[float] = None, *,
               user_id: Optional[UserId] = None) -> None:
        """A custom counter by name; ``value`` defaults to 1 on the server."""
        self.track("custom", name=name, value=value, user_id=user_id)

    # --------------------------------------------------------------- summary

    async def summary_text(self, bot: Optional[str] = None) -> str:
        """The ready-to-send text for the bot's /metrics command."""
        status, body = await asyncio.to_thread(
            self._request, "GET", self._summary_path(bot, "text"))
        if status != 200:
            raise BotMetricsError(status, body.decode("utf-8", "replace"))
        return body.decode("utf-8")

    async def summary(self, bot: Optional[str] = None) -> dict:
        """The summary as a dict (see the server's GET /v1/summary)."""
        status, body = await asyncio.to_thread(
            self._request, "GET", self._summary_path(bot, None))
        if status != 200:
            raise BotMetricsError(status, body.decode("utf-8", "replace"))
        return json.loads(body)

    @staticmethod
    def _summary_path(bot: Optional[str], fmt: Optional[str]) -> str:
        query = {k: v for k, v in (("bot", bot), ("format", fmt)) if v}
        return "/v1/summary" + ("?" + urllib.parse.urlencode(query) if query else "")

    # ---------------------------------------------------------------- sender

    async def _run(self) -> None:
        while True:
            if len(self._queue) < self.batch_size:
                await _wait(self._wake, self.flush_interval)
            self._wake.clear()
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
                self._inflight = len(batch)
                try:
                    await self._deliver(batch)
                finally:
                    self._inflight = 0
            self._idle.set()

    async def _deliver(self, batch: list) -> None:
        """Post one batch until the server has taken or refused every event."""
        delay = 0.25
        while batch:
            self.requests += 1
            try:
                status, body = await asyncio.to_thread(
                    self._request, "POST", "/v1/events", json.dumps(batch).encode(), "application/json")
            except (OSError, http.client.HTTPException) as e:
                status, body = None, str(e).encode()

            if status == 202:
                reply = _json_or_empty(body)
                self.sent += len(batch)
                self.duplicates += int(reply.get("duplicates", 0))
                return
            if status == 413 and len(batch) > 1:
                half = len(batch) // 2
                await self._deliver(batch[:half])
                await self._deliver(batch[half:])
                return
            if status in _NOT_RETRYABLE:
                reply = _json_or_empty(body)
                index = reply.get("index")
                if status == 422 and isinstance(index, int) and 0 <= index < len(batch):
                    bad = batch.pop(index)
                    self.rejected += 1
                    log.warning("botmetrics: dropped invalid %s event: %s", bad.get("type"), reply.get("message"))
                    continue
                self.rejected += len(batch)
                log.error("botmetrics: server refused %d events (%s): %s", len(batch), status,
                          reply.get("message") or body[:200])
                return

            # Down, overloaded or unreachable: back off and send the same
            # events (same event_ids) again.
            self.retries += 1
            log.warning("botmetrics: sending %d events failed (%s), retrying in %.1fs",
                        len(batch), status or body[:200].decode("utf-8", "replace"), delay)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.max_backoff)

    def _request(self, method: str, path: str, body: Optional[bytes] = None,
                 content_type: Optional[str] = None) -> tuple:
        """Blocking HTTP call, run in a worker thread. Returns (status, body);
        raises OSError when there is no HTTP answer at all."""
        req = urllib.request.Request(self.url + path, data=body, method=method)
        req.add_header("Authorization", f"Bearer {self._token}")
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.read()


class _ResponseTimer:
    def __init__(self, metrics: BotMetrics, user_id: UserId, model: Optional[str]):
        self._metrics = metrics
        self.user_id = user_id
        self.model = model
        self.tokens: Tokens = None
        self.status: Optional[str] = None
        self._start = 0.0

    def __enter__(self) -> "_ResponseTimer":
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        duration_ms = (time.perf_counter() - self._start) * 1000
        if self.status is None:
            if exc_type is None:
                self.status = "success"
            elif issubclass(exc_type, (TimeoutError, asyncio.TimeoutError)):
                self.status = "timeout"
            else:
                self.status = "error"
        self._metrics.response(self.user_id, self.status, duration_ms, model=self.model, tokens=self.tokens)
        return False  # never swallow the bot's exception

    async def __aenter__(self) -> "_ResponseTimer":
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return self.__exit__(exc_type, exc, tb)


async def _wait(event: asyncio.Event, timeout: Optional[float]) -> bool:
    """event.wait() with a timeout; True when the event was set. Not
    asyncio.wait_for: before Python 3.12 it can swallow a cancellation that
    arrives as the event is set, and close() would then wait forever."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
        return bool(done)
    finally:
        waiter.cancel()


def _json_or_empty(body: bytes) -> dict:
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
