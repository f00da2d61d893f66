"""The asyncio front door: a background task on the bot's event loop."""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, TypeVar

from ._core import Core, Event, Outcome, _split, _summary_dict, backoff_delays, log


class BotMetrics(Core):
    """Batches an asyncio bot's events to a botmetrics server.

    ``track()`` and the helpers append to a bounded in-memory queue and
    return; a background task on the running loop posts the queue in
    batches (every ``batch_size`` events or ``flush_interval`` seconds),
    with the HTTP call in a thread of its own so the loop never waits on
    the network. Call them from the loop's thread (asyncio handlers are); from
    other threads or plain code use ``SyncBotMetrics``.

    Counters, for the bot's own logs and tests: ``sent`` events the server
    acknowledged (``duplicates`` of them it had already counted),
    ``dropped`` events pushed out of a full queue (or tracked after
    ``close()``), ``rejected`` events the server refused as invalid,
    ``requests`` POSTs attempted, ``retries`` failed attempts that will be
    retried, ``pending`` events queued or in flight.
    """

    def __init__(self, url: str, token: str, batch_size: int = 100, flush_interval: float = 1.0,
                 max_queue: int = 10000, *, timeout: float = 5.0, initial_backoff: float = 0.25,
                 max_backoff: float = 30.0):
        super().__init__(url, token, batch_size, flush_interval, max_queue, timeout=timeout,
                         initial_backoff=initial_backoff, max_backoff=max_backoff)
        self._task: Optional[asyncio.Task[None]] = None
        # Created with the task: an asyncio.Event belongs to one loop.
        self._wake: Optional[asyncio.Event] = None
        self._idle: Optional[asyncio.Event] = None
        self._warned_no_loop = False

    # ------------------------------------------------------------------ life

    def start(self) -> None:
        """Start the background sender on the running loop (idempotent)."""
        if self._task is None or self._task.done():
            loop = asyncio.get_running_loop()
            self._wake, self._idle = asyncio.Event(), asyncio.Event()
            self._task = loop.create_task(self._run(), name="botmetrics-sender")
            # asyncio.run() cancels the task when its loop ends; the next
            # loop (another asyncio.run) then starts a new one.
            self._task.add_done_callback(self._sender_ended)
            self._kick_needed = False

    def _sender_ended(self, task: "asyncio.Task[None]") -> None:
        if self._task is task:
            self._task = None
            self._inflight = 0
            self._kick_needed = True
        if not task.cancelled() and task.exception() is not None:
            log.error("botmetrics: the sender stopped", exc_info=task.exception())

    def _kick(self) -> None:
        if self._task is None:
            try:
                self.start()
            except RuntimeError:
                self._no_loop()
                return
        wake = self._wake
        if len(self._queue) >= self.batch_size and wake is not None and not wake.is_set():
            wake.set()

    def _no_loop(self) -> None:
        """Tracked outside a running loop: nothing can send it until the bot
        calls start() inside one. Say so once, rather than queue in silence."""
        if not self._warned_no_loop:
            self._warned_no_loop = True
            warnings.warn(
                "botmetrics.BotMetrics was called with no running asyncio event loop: events wait in "
                "the queue (bounded by max_queue) until start() or a call inside a running loop. "
                "For synchronous code use botmetrics.SyncBotMetrics.",
                RuntimeWarning, stacklevel=5)

    async def flush(self, timeout: Optional[float] = None) -> bool:
        """Send everything tracked so far. True when all of it was
        acknowledged (taken by the server, or refused and counted in
        ``rejected``; close() tells whether everything was delivered),
        False when ``timeout`` seconds passed first (the events stay
        queued and are retried)."""
        self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.pending:
            assert self._wake is not None and self._idle is not None
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
        Returns True only when every event tracked was delivered: none left
        unsent, none refused by the server (``rejected``: a wrong token, an
        invalid event), none dropped from a full queue (``dropped``)."""
        self._closed = True
        flushed = await self.flush(timeout) if self.pending else True
        task = self._task
        if task is not None:
            task.cancel()
            # asyncio.wait neither raises the task's CancelledError nor hides
            # a cancellation of close() itself.
            await asyncio.wait({task})
        return self._closing_verdict(flushed)

    async def __aenter__(self) -> "BotMetrics":
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --------------------------------------------------------------- summary

    async def summary_text(self, bot: Optional[str] = None) -> str:
        """The ready-to-send text for the bot's /metrics command."""
        body = await _in_thread(self._summary_request, bot, "text")
        return body.decode("utf-8")

    async def summary(self, bot: Optional[str] = None) -> Dict[str, Any]:
        """The summary as a dict (see the server's GET /v1/summary)."""
        return _summary_dict(await _in_thread(self._summary_request, bot, None))

    # ---------------------------------------------------------------- sender

    async def _run(self) -> None:
        assert self._wake is not None and self._idle is not None
        while True:
            if len(self._queue) < self.batch_size:
                await _wait(self._wake, self.flush_interval)
            self._wake.clear()
            while self._queue:
                batch = self._take_batch()
                try:
                    await self._deliver(batch)
                finally:
                    self._inflight = 0
            self._idle.set()

    async def _deliver(self, batch: List[Event]) -> None:
        """Post one batch until the server has taken or refused every event."""
        delays = backoff_delays(self.initial_backoff, self.max_backoff)
        todo = [batch]
        while todo:
            outcome = await _in_thread(self._attempt, todo[-1])
            if outcome is Outcome.DONE:
                todo.pop()
            elif outcome is Outcome.SPLIT:
                first, second = _split(todo.pop())
                todo += [second, first]
            elif outcome is Outcome.RETRY:
                delay = next(delays)
                self._log_retry(len(todo[-1]), delay)
                await asyncio.sleep(delay)


T = TypeVar("T")


def _in_thread(fn: Callable[..., T], *args: Any) -> "asyncio.Future[T]":
    """Run a blocking call in a daemon thread of its own, its result a future
    on the running loop. Not asyncio.to_thread: asyncio.run() ends by joining
    the default executor, so a request stuck on a server that never answers
    would hold up the bot's exit for the whole HTTP timeout after close()
    had given up on it. A thread per request costs nothing at one batch a
    second."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Optional[T], error: Optional[BaseException]) -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as e:  # handed to the awaiting coroutine
            result, error = None, e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass  # the loop has closed: nobody waits for this any more

    threading.Thread(target=work, name="botmetrics-http", daemon=True).start()
    return future


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
