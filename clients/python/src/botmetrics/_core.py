"""What both clients share: the event queue, the helpers that build events,
the HTTP call and the decision what to do with its answer.

The two front doors (``BotMetrics`` for asyncio, ``SyncBotMetrics`` for
threads) only differ in how they wait: on the event loop or on a thread.
"""

from __future__ import annotations

import collections
import enum
import http.client
import itertools
import json
import logging
import os
import random
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, Iterator, List, Literal, Mapping, Optional, Sequence, Tuple, Union

log = logging.getLogger("botmetrics")

UserId = Union[int, str]
Tokens = Union[Mapping[str, int], Sequence[int], None]
Event = Dict[str, Any]

# Client errors that retrying cannot fix: the request itself is wrong.
_NOT_RETRYABLE = frozenset({400, 401, 403, 404, 413, 415, 422})

# Event ids: a random per-process prefix and a counter. As unique as a uuid4
# for the server's dedupe (64 random bits tell processes apart, the counter
# tells events apart) at a fraction of the cost: no syscall, no formatting
# of 128 random bits per event. next() on itertools.count is atomic under
# the GIL, so threads never get the same number.
_prefix = ""
_ids: Iterator[int] = itertools.count()


def _new_id_space() -> None:
    global _prefix, _ids
    _prefix = secrets.token_hex(8) + "-"
    _ids = itertools.count()


_new_id_space()
# A forked child would otherwise continue the parent's sequence and send the
# same ids, which the server would drop as duplicates.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_id_space)

_now = time.time


def backoff_delays(initial: float, maximum: float,
                   rng: Optional[random.Random] = None) -> Iterator[float]:
    """The waits between attempts to send a failing batch: ``initial``
    doubling up to ``maximum``, each drawn from the upper half of its step
    (``step * uniform(0.5, 1)``), so that many bots recovering from one
    outage do not retry in lockstep.

    >>> steps = backoff_delays(0.25, 2.0, random.Random(1))
    >>> [round(next(steps), 3) for _ in range(6)]
    [0.142, 0.462, 0.882, 1.255, 1.495, 1.449]
    """
    uniform = (rng or random.Random()).uniform
    step = min(initial, maximum)
    while True:
        yield step * uniform(0.5, 1.0)
        step = min(step * 2, maximum)


class Outcome(enum.Enum):
    """What to do with a batch after one attempt to post it."""

    DONE = "done"        # taken, or refused for good: forget it
    RESEND = "resend"    # the server named a bad event, which was removed: send the rest now
    SPLIT = "split"      # too large: send it in two halves
    RETRY = "retry"      # no answer, or 5xx: wait and send the same events again


class BotMetricsError(Exception):
    """The server answered a request with an error status."""

    def __init__(self, status: int, body: str):
        super().__init__(f"botmetrics answered {status}: {body[:200]}")
        self.status = status
        self.body = body


class Core:
    """State and logic shared by both clients; see ``BotMetrics`` for the
    behaviour and the counters."""

    def __init__(
        self,
        url: str,
        token: str,
        batch_size: int = 100,
        flush_interval: float = 1.0,
        max_queue: int = 10000,
        *,
        timeout: float = 5.0,
        initial_backoff: float = 0.25,
        max_backoff: float = 30.0,
    ):
        if batch_size < 1 or max_queue < 1:
            raise ValueError("batch_size and max_queue must be at least 1")
        if min(flush_interval, initial_backoff, max_backoff) <= 0:
            raise ValueError("flush_interval, initial_backoff and max_backoff must be positive")
        self.url = url.rstrip("/")
        self._token = token
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_queue = max_queue
        self.timeout = timeout
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff

        self.sent = 0
        self.duplicates = 0
        self.dropped = 0
        self.rejected = 0
        self.requests = 0
        self.retries = 0

        # deque.append and popleft are atomic, so threads may track while
        # the sender drains. No maxlen: dropping by hand lets us count drops.
        self._queue: collections.deque[Event] = collections.deque()
        # Taken only when the queue is full, to count drops exactly.
        self._drop_lock = threading.Lock()
        self._inflight = 0
        self._closed = False
        # True while the sender is not running: the next event starts it.
        self._kick_needed = True

    @property
    def pending(self) -> int:
        """Events tracked but not yet acknowledged (queued or in flight)."""
        return len(self._queue) + self._inflight

    def _closing_verdict(self, flushed: bool) -> bool:
        """What close() returns: True only when every event tracked was
        delivered, i.e. nothing is left unsent (``flushed``), none was
        refused by the server (``rejected``: a wrong token, an invalid
        event) and none was pushed out of a full queue (``dropped``)."""
        if not flushed:
            log.warning("botmetrics: closing with %d events unsent", self.pending)
        elif self.rejected or self.dropped:
            log.warning("botmetrics: closing with %d events refused by the server and %d dropped",
                        self.rejected, self.dropped)
        return flushed and not self.pending and not self.rejected and not self.dropped

    # ------------------------------------------------------------- hot path
    #
    # Every helper takes an optional keyword ``ts``: when the event happened,
    # in unix seconds (int or float), for events reported after the fact
    # (a backfill, a replay, the simulator's --days); None (the default)
    # stamps the time of the call. The server refuses a ``ts`` more than 5
    # minutes ahead of its clock (422, the event alone is dropped).
    #
    # Every helper builds its event as one dict literal and queues it with a
    # single method call: they run in the bot's handlers, and each call or
    # keyword packing saved here is paid per message. Their cost is measured
    # against prometheus_client's in benchmarks/hot_path.py.

    def _push(self, event: Event) -> None:
        queue = self._queue
        if len(queue) >= self.max_queue:
            self._make_room()
        queue.append(event)
        if self._kick_needed or len(queue) >= self.batch_size:
            self._kick()

    def _make_room(self) -> None:
        with self._drop_lock:
            while len(self._queue) >= self.max_queue:
                try:
                    self._queue.popleft()
                except IndexError:  # the sender took it meanwhile
                    break
                self.dropped += 1

    def _kick(self) -> None:
        """Start the sender if it is not running; wake it when a batch is full."""
        raise NotImplementedError

    def _dropped_after_close(self) -> None:
        # A handler still running during shutdown must not crash on metrics.
        self.dropped += 1

    def track(self, type: str, **fields: Any) -> None:
        """Queue one event of the given type. Never blocks, never does I/O.
        Fields that are None are left out, so optional arguments can be
        passed through as they are; ``ts=`` (unix seconds) sets the event's
        time, as on every helper, and defaults to now."""
        if self._closed:
            return self._dropped_after_close()
        event = {"type": type, "event_id": _prefix + str(next(_ids)), "ts": _now()}
        for k, v in fields.items():
            if v is not None:
                event[k] = v
        self._push(event)

    def message(self, user_id: Optional[UserId], role: str = "user", *, db_queries: Optional[int] = None,
                chat_type: Optional[str] = None, ts: Optional[float] = None) -> None:
        """A message: ``role`` is "user" (received) or "assistant" (sent).
        ``db_queries``: how many database queries handling it took."""
        if self._closed:
            return self._dropped_after_close()
        event = {"type": "message", "event_id": _prefix + str(next(_ids)),
                 "ts": _now() if ts is None else ts, "role": role}
        if user_id is not None:
            event["user_id"] = user_id
        if db_queries is not None:
            event["db_queries"] = db_queries
        if chat_type is not None:
            event["chat_type"] = chat_type
        self._push(event)

    def response(self, user_id: Optional[UserId], status: str = "success", duration_ms: float = 0.0, *,
                 model: Optional[str] = None, tokens: Tokens = None,
                 chat_type: Optional[str] = None, cached_tokens: Optional[int] = None,
                 cache_write_tokens: Optional[int] = None, reasoning_tokens: Optional[int] = None,
                 ttft_ms: Optional[float] = None, provider: Optional[str] = None,
                 cost: Optional[float] = None, ts: Optional[float] = None) -> None:
        """An LLM call's outcome: ``status`` is success, error, rate_limited
        or timeout. ``tokens``: {"prompt": n, "completion": m} or (n, m).

        For spend: ``cached_tokens`` (prompt tokens served from the
        provider's cache) and ``cache_write_tokens`` (written to it) are part
        of the prompt (together at most it); ``reasoning_tokens`` are billed
        as output beside the completion (a mapping ``tokens`` may carry them
        as "cached", "cache_write", "reasoning" instead). ``ttft_ms``: the
        first token of a streamed answer, 0 to ``duration_ms``.
        ``provider``: a short name (``[A-Za-z0-9_.:-]``, at most 64).
        ``cost``: what the provider reported for the call, 0 to 1000 in the
        server's ``--currency``; without it the server prices the tokens
        from its table (a model it does not know is counted as unpriced,
        never as free). The server checks every field: an event it refuses
        is dropped alone and counted in ``rejected``."""
        if self._closed:
            return self._dropped_after_close()
        event: Event = {"type": "response", "event_id": _prefix + str(next(_ids)),
                        "ts": _now() if ts is None else ts,
                        "status": status, "duration_ms": duration_ms}
        if user_id is not None:
            event["user_id"] = user_id
        if model is not None:
            event["model"] = model
        if tokens is not None:
            if type(tokens) is tuple or type(tokens) is list:  # the common case, without an ABC check
                event["tokens"] = {"prompt": tokens[0], "completion": tokens[1]}
            elif isinstance(tokens, Mapping):
                event["tokens"] = tokens
            else:
                prompt, completion = tokens
                event["tokens"] = {"prompt": prompt, "completion": completion}
        if cached_tokens is not None or cache_write_tokens is not None or reasoning_tokens is not None:
            counts: Dict[str, Any] = {}
            if tokens is not None:
                counts.update(event["tokens"])  # a copy, never the caller's mapping
            if cached_tokens is not None:
                counts["cached"] = cached_tokens
            if cache_write_tokens is not None:
                counts["cache_write"] = cache_write_tokens
            if reasoning_tokens is not None:
                counts["reasoning"] = reasoning_tokens
            event["tokens"] = counts
        if ttft_ms is not None:
            event["ttft_ms"] = ttft_ms
        if provider is not None:
            event["provider"] = provider
        if cost is not None:
            event["cost"] = cost
        if chat_type is not None:
            event["chat_type"] = chat_type
        self._push(event)

    def feedback(self, user_id: Optional[UserId], score: int, *, scale: Optional[int] = None,
                 reason: Optional[str] = None, ts: Optional[float] = None) -> None:
        """A user's rating of an answer: ``score`` -1 or 1 (thumbs down or
        up), or 1 to 5 with ``scale=5``. ``reason``: an optional short name
        (``[A-Za-z0-9_.:-]``, at most 64), e.g. "wrong" or "too_long"."""
        if self._closed:
            return self._dropped_after_close()
        event = {"type": "feedback", "event_id": _prefix + str(next(_ids)),
                 "ts": _now() if ts is None else ts, "score": score}
        if user_id is not None:
            event["user_id"] = user_id
        if scale is not None:
            event["scale"] = scale
        if reason is not None:
            event["reason"] = reason
        self._push(event)

    def measure_response(self, user_id: Optional[UserId], *, model: Optional[str] = None,
                         provider: Optional[str] = None) -> "ResponseTimer":
        """Context manager (``with`` or ``async with``) timing an LLM call
        and sending a ``response`` event when it ends: success, timeout (on
        TimeoutError) or error (on any other exception, which is re-raised).
        Set ``.tokens`` (a mapping may carry "cached", "cache_write",
        "reasoning"), ``.cost`` or ``.status`` on it inside the block to
        report more; call ``.first_token()`` when a streamed answer's first
        token arrives to report its time to first token."""
        return ResponseTimer(self, user_id, model, provider)

    def cache(self, hit: Union[bool, str], *, cache: Optional[str] = None,
              user_id: Optional[UserId] = None, ts: Optional[float] = None) -> None:
        """A cache lookup: ``hit`` is True/False or "hit"/"miss"."""
        if self._closed:
            return self._dropped_after_close()
        event = {"type": "cache", "event_id": _prefix + str(next(_ids)), "ts": _now() if ts is None else ts,
                 "result": hit if type(hit) is str else ("hit" if hit else "miss")}
        if cache is not None:
            event["cache"] = cache
        if user_id is not None:
            event["user_id"] = user_id
        self._push(event)

    def user_registered(self, user_id: UserId, *, ts: Optional[float] = None) -> None:
        """A new user (first /start)."""
        if self._closed:
            return self._dropped_after_close()
        self._push({"type": "user_registered", "event_id": _prefix + str(next(_ids)),
                    "ts": _now() if ts is None else ts,
                    "user_id": user_id})

    def consent(self, user_id: UserId, granted: bool, *, ts: Optional[float] = None) -> None:
        """The user's answer to the consent (privacy policy) question."""
        if self._closed:
            return self._dropped_after_close()
        self._push({"type": "consent", "event_id": _prefix + str(next(_ids)),
                    "ts": _now() if ts is None else ts,
                    "user_id": user_id, "granted": bool(granted)})

    def limit_reached(self, user_id: UserId, *, ts: Optional[float] = None) -> None:
        """The user hit the bot's daily message limit."""
        if self._closed:
            return self._dropped_after_close()
        self._push({"type": "limit_reached", "event_id": _prefix + str(next(_ids)),
                    "ts": _now() if ts is None else ts,
                    "user_id": user_id})

    def error(self, kind: str, *, user_id: Optional[UserId] = None, ts: Optional[float] = None) -> None:
        """An error in the bot, by a short kind name (``[A-Za-z0-9_.:-]``)."""
        if self._closed:
            return self._dropped_after_close()
        event = {"type": "error", "event_id": _prefix + str(next(_ids)),
                 "ts": _now() if ts is None else ts, "kind": kind}
        if user_id is not None:
            event["user_id"] = user_id
        self._push(event)

    def custom(self, name: str, value: Optional[float] = None, *,
               user_id: Optional[UserId] = None, ts: Optional[float] = None) -> None:
        """A custom counter by name; ``value`` defaults to 1 on the server."""
        if self._closed:
            return self._dropped_after_close()
        event = {"type": "custom", "event_id": _prefix + str(next(_ids)),
                 "ts": _now() if ts is None else ts, "name": name}
        if value is not None:
            event["value"] = value
        if user_id is not None:
            event["user_id"] = user_id
        self._push(event)

    # --------------------------------------------------------------- sending

    def _take_batch(self) -> List[Event]:
        """Up to batch_size events from the queue, counted as in flight."""
        queue = self._queue
        batch: List[Event] = []
        for _ in range(min(self.batch_size, len(queue))):
            try:
                batch.append(queue.popleft())
            except IndexError:  # a full queue dropped it meanwhile
                break
        self._inflight = len(batch)
        return batch

    def _attempt(self, batch: List[Event]) -> Outcome:
        """Post a batch once (blocking) and decide what comes next. Removes
        the event the server names as invalid from ``batch``."""
        self.requests += 1
        status: Optional[int]
        try:
            status, body = self._request("POST", "/v1/events", json.dumps(batch).encode(), "application/json")
        except (OSError, http.client.HTTPException) as e:
            status, body = None, (str(e) or type(e).__name__).encode()

        if status == 202:
            reply = _json_or_empty(body)
            self.sent += len(batch)
            self.duplicates += int(reply.get("duplicates", 0))
            return Outcome.DONE
        if status == 413 and len(batch) > 1:
            return Outcome.SPLIT
        if status in _NOT_RETRYABLE:
            reply = _json_or_empty(body)
            index = reply.get("index")
            if status == 422 and isinstance(index, int) and 0 <= index < len(batch):
                bad = batch.pop(index)
                self.rejected += 1
                log.warning("botmetrics: dropped invalid %s event: %s", bad.get("type"), reply.get("message"))
                return Outcome.RESEND if batch else Outcome.DONE
            self.rejected += len(batch)
            log.error("botmetrics: server refused %d events (%s): %s", len(batch), status,
                      reply.get("message") or body[:200].decode("utf-8", "replace"))
            return Outcome.DONE
        # Down, overloaded or unreachable: the same events (same event_ids)
        # go again after a wait.
        self.retries += 1
        self._last_failure = (status or body[:200].decode("utf-8", "replace"))
        return Outcome.RETRY

    _last_failure: object = None

    def _log_retry(self, size: int, delay: float) -> None:
        log.warning("botmetrics: sending %d events failed (%s), retrying in %.3fs",
                    size, self._last_failure, delay)

    def _request(self, method: str, path: str, body: Optional[bytes] = None,
                 content_type: Optional[str] = None) -> Tuple[int, bytes]:
        """Blocking HTTP call. Returns (status, body); raises OSError when
        there is no HTTP answer at all."""
        req = urllib.request.Request(self.url + path, data=body, method=method)
        req.add_header("Authorization", f"Bearer {self._token}")
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                status: int = resp.status
                data: bytes = resp.read()
                return status, data
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.read()

    def _summary_request(self, bot: Optional[str], fmt: Optional[str]) -> bytes:
        query = {k: v for k, v in (("bot", bot), ("format", fmt)) if v}
        path = "/v1/summary" + ("?" + urllib.parse.urlencode(query) if query else "")
        status, body = self._request("GET", path)
        if status != 200:
            raise BotMetricsError(status, body.decode("utf-8", "replace"))
        return body


def _split(batch: List[Event]) -> Tuple[List[Event], List[Event]]:
    half = len(batch) // 2
    return batch[:half], batch[half:]


def _json_or_empty(body: bytes) -> Dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _summary_dict(body: bytes) -> Dict[str, Any]:
    value = json.loads(body)
    if not isinstance(value, dict):
        raise ValueError("the summary is not a JSON object")
    return value


class ResponseTimer:
    """Times a block and reports it as a ``response`` event; see
    ``measure_response``."""

    def __init__(self, metrics: Core, user_id: Optional[UserId], model: Optional[str],
                 provider: Optional[str] = None):
        self._metrics = metrics
        self.user_id = user_id
        self.model = model
        self.provider = provider
        self.tokens: Tokens = None
        self.status: Optional[str] = None
        self.cost: Optional[float] = None
        self.ttft_ms: Optional[float] = None
        self._start = 0.0

    def first_token(self) -> None:
        """The first token of a streamed answer arrived: its time since the
        block began is sent as ``ttft_ms`` (only the first call counts)."""
        if self.ttft_ms is None:
            self.ttft_ms = (time.perf_counter() - self._start) * 1000

    def __enter__(self) -> "ResponseTimer":
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException], tb: Any) -> Literal[False]:
        duration_ms = (time.perf_counter() - self._start) * 1000
        if self.status is None:
            if exc_type is None:
                self.status = "success"
            elif issubclass(exc_type, TimeoutError):  # asyncio.TimeoutError too, since 3.11
                self.status = "timeout"
            else:
                import asyncio  # 3.10: asyncio.TimeoutError is its own class

                self.status = "timeout" if issubclass(exc_type, asyncio.TimeoutError) else "error"
        ttft = None if self.ttft_ms is None else min(self.ttft_ms, duration_ms)
        self._metrics.response(self.user_id, self.status, duration_ms, model=self.model, tokens=self.tokens,
                               ttft_ms=ttft, provider=self.provider, cost=self.cost)
        return False  # never swallow the bot's exception

    async def __aenter__(self) -> "ResponseTimer":
        return self.__enter__()

    async def __aexit__(self, exc_type: Optional[type], exc: Optional[BaseException],
                        tb: Any) -> Literal[False]:
        return self.__exit__(exc_type, exc, tb)
