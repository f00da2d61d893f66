"""The threaded front door, for bots without an event loop (telebot, Flask
webhooks, scripts): a daemon thread sends while handlers track."""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Any, Dict, List, Optional

from ._core import Core, Event, Outcome, _split, _summary_dict, backoff_delays, log


class SyncBotMetrics(Core):
    """Batches a synchronous bot's events to a botmetrics server.

    The same helpers as ``BotMetrics``, safe to call from any thread: they
    append to the queue and return, and a background thread (started on the
    first event) posts it in batches. ``flush()`` and ``close(timeout=...)``
    block the caller, at most ``timeout`` seconds. Counters as on
    ``BotMetrics``.
    """

    def __init__(self, url: str, token: str, batch_size: int = 100, flush_interval: float = 1.0,
                 max_queue: int = 10000, *, timeout: float = 5.0, initial_backoff: float = 0.25,
                 max_backoff: float = 30.0):
        super().__init__(url, token, batch_size, flush_interval, max_queue, timeout=timeout,
                         initial_backoff=initial_backoff, max_backoff=max_backoff)
        self._thread: Optional[threading.Thread] = None
        self._start_lock = threading.Lock()
        # Set to make the sender post now (batch full, flush(), close()).
        self._wake = threading.Event()
        # Notified by the sender each time it has emptied the queue.
        self._cond = threading.Condition()
        self._rounds = 0
        self._stop = False
        _live.add(self)

    # ------------------------------------------------------------------ life

    def start(self) -> None:
        """Start the sender thread (idempotent; the first event does it)."""
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop = False
                self._thread = threading.Thread(target=self._run, name="botmetrics-sender", daemon=True)
                self._thread.start()
                self._kick_needed = False

    def _kick(self) -> None:
        if self._thread is None:
            self.start()
        if len(self._queue) >= self.batch_size and not self._wake.is_set():
            self._wake.set()

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Block until everything tracked so far is acknowledged (True) or
        ``timeout`` seconds have passed (False; the events stay queued).
        Acknowledged: taken by the server, or refused and counted in
        ``rejected``; close() tells whether everything was delivered."""
        self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.pending:
                # A full round of the sender that started after this point
                # has seen every event queued before it.
                target = self._rounds + 2
                self._wake.set()
                while self._rounds < target and self.pending:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._cond.wait(remaining)
        return True

    def close(self, timeout: float = 5.0) -> bool:
        """Flush for at most ``timeout`` seconds, then stop the sender.
        Returns True only when every event tracked was delivered: none left
        unsent, none refused by the server (``rejected``: a wrong token, an
        invalid event), none dropped from a full queue (``dropped``).
        Events tracked after close() are dropped (and counted in
        ``dropped``)."""
        self._closed = True
        flushed = self.flush(timeout) if self.pending else True
        self._stop = True
        self._wake.set()
        thread = self._thread
        if thread is not None and flushed:
            # It is idle now; if delivery timed out it may be stuck in a
            # request, and a daemon thread must not hold up the caller.
            thread.join(timeout)
        return self._closing_verdict(flushed)

    def __enter__(self) -> "SyncBotMetrics":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------- summary

    def summary_text(self, bot: Optional[str] = None) -> str:
        """The ready-to-send text for the bot's /metrics command."""
        return self._summary_request(bot, "text").decode("utf-8")

    def summary(self, bot: Optional[str] = None) -> Dict[str, Any]:
        """The summary as a dict (see the server's GET /v1/summary)."""
        return _summary_dict(self._summary_request(bot, None))

    # ---------------------------------------------------------------- sender

    def _run(self) -> None:
        try:
            while not self._stop:
                if len(self._queue) < self.batch_size:
                    self._wake.wait(self.flush_interval)
                self._wake.clear()
                while self._queue and not self._stop:
                    batch = self._take_batch()
                    try:
                        self._deliver(batch)
                    finally:
                        self._inflight = 0
                with self._cond:
                    self._rounds += 1
                    self._cond.notify_all()
        except Exception:  # a bug here must not pass silently: the bot would lose every event
            log.exception("botmetrics: the sender thread stopped")
            raise

    def _deliver(self, batch: List[Event]) -> None:
        delays = backoff_delays(self.initial_backoff, self.max_backoff)
        todo = [batch]
        while todo:
            outcome = self._attempt(todo[-1])
            if outcome is Outcome.DONE:
                todo.pop()
            elif outcome is Outcome.SPLIT:
                first, second = _split(todo.pop())
                todo += [second, first]
            elif outcome is Outcome.RETRY:
                if self._stop:
                    # close() gave up: put the events back so `pending`
                    # still says what was lost.
                    for b in todo:
                        self._queue.extendleft(reversed(b))
                    return
                delay = next(delays)
                self._log_retry(len(todo[-1]), delay)
                time.sleep(delay)


# A forked child (gunicorn, multiprocessing) has no sender thread: it starts
# its own on its first event, with its own copy of the queue.
_live: "weakref.WeakSet[SyncBotMetrics]" = weakref.WeakSet()


def _after_fork() -> None:
    for client in list(_live):
        client._thread = None
        client._kick_needed = True
        client._start_lock = threading.Lock()
        client._drop_lock = threading.Lock()
        client._cond = threading.Condition()
        client._wake = threading.Event()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
