#!/usr/bin/env python3
"""What a bot's handler pays per metrics call: botmetrics' helpers side by
side with prometheus_client's ``Counter.labels(...).inc()``, in the same
process, the same loop, the same interpreter.

    pip install ./clients/python prometheus-client
    python3 clients/python/benchmarks/hot_path.py            # about 30 s
    python3 clients/python/benchmarks/hot_path.py --quick    # a smoke run

Each line is the best of ``--repeat`` runs of ``--calls`` calls, in
nanoseconds per call, loop included (the same loop for every line), and its
ratio to prometheus_client's. Calls run in chunks of 100 (the default batch
size) with the queue emptied between chunks, as the sender keeps it in a
running bot. The clients' senders are alive but have
nowhere to send (a closed port), so what is measured is the handler's side:
build the event, stamp it, queue it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.metadata
import platform
import sys
import time
from typing import Callable, Dict, List, Tuple

try:
    from prometheus_client import CollectorRegistry, Counter, Histogram
except ImportError:
    sys.exit("this benchmark compares with prometheus_client: pip install prometheus-client")

import botmetrics
from botmetrics import BotMetrics, SyncBotMetrics

CHUNK = 100  # the default batch_size
NOWHERE = "http://127.0.0.1:9"  # discard port: nothing listens, the sender just backs off


def timed(body: Callable[[int], None], calls: int, repeat: int, reset: Callable[[], None]) -> float:
    """Best nanoseconds per call over `repeat` runs. Each run is timed in
    chunks of CHUNK calls with the queues emptied between chunks (untimed),
    as the sender empties them in a running bot (every batch_size events):
    a queue growing to a million events would make the collector's passes,
    not the calls, the cost measured."""
    best = float("inf")
    for _ in range(repeat):
        reset()
        gc.collect()
        total = 0
        for _ in range(calls // CHUNK):
            t0 = time.perf_counter_ns()
            body(CHUNK)
            total += time.perf_counter_ns() - t0
            reset()
        best = min(best, total / (calls // CHUNK * CHUNK))
    return best


def cases(a: BotMetrics, s: SyncBotMetrics) -> Dict[str, Callable[[int], None]]:
    registry = CollectorRegistry()
    counter = Counter("bot_messages", "messages", ["bot", "role"], registry=registry)
    hist = Histogram("bot_response_seconds", "responses", ["bot", "model"], registry=registry)

    def prom_counter(n: int) -> None:
        c = counter
        for i in range(n):
            c.labels("mybot", "user").inc()

    def prom_histogram(n: int) -> None:
        h = hist
        for i in range(n):
            h.labels("mybot", "gpt-4o-mini").observe(1.8)

    def message(n: int) -> None:
        f = a.message
        for i in range(n):
            f(i, "user")

    def message_full(n: int) -> None:
        f = a.message
        for i in range(n):
            f(i, "user", db_queries=6, chat_type="private")

    def response(n: int) -> None:
        f = a.response
        for i in range(n):
            f(i, "success", 1840.0, model="gpt-4o-mini", tokens=(812, 164))

    def cache(n: int) -> None:
        f = a.cache
        for i in range(n):
            f(True, cache="answers", user_id=i)

    def error(n: int) -> None:
        f = a.error
        for i in range(n):
            f("llm_timeout", user_id=i)

    def custom(n: int) -> None:
        f = a.custom
        for i in range(n):
            f("voice_message", user_id=i)

    def track(n: int) -> None:
        f = a.track
        for i in range(n):
            f("limit_reached", user_id=i)

    def sync_message(n: int) -> None:
        f = s.message
        for i in range(n):
            f(i, "user")

    return {
        "prometheus_client Counter.labels(..).inc()": prom_counter,
        "prometheus_client Histogram.labels(..).observe()": prom_histogram,
        "BotMetrics.message(uid, 'user')": message,
        "BotMetrics.message(.., db_queries, chat_type)": message_full,
        "BotMetrics.response(.., model, tokens)": response,
        "BotMetrics.cache(True, cache=.., user_id=..)": cache,
        "BotMetrics.error(kind, user_id=..)": error,
        "BotMetrics.custom(name, user_id=..)": custom,
        "BotMetrics.track('limit_reached', user_id=..)": track,
        "SyncBotMetrics.message(uid, 'user')": sync_message,
    }


async def main_async(args: argparse.Namespace) -> List[Tuple[str, float]]:
    # Queues large enough that no run reaches the drop path: the common case.
    a = BotMetrics(NOWHERE, "x", max_queue=args.calls + 1, batch_size=args.calls + 1, flush_interval=3600)
    s = SyncBotMetrics(NOWHERE, "x", max_queue=args.calls + 1, batch_size=args.calls + 1, flush_interval=3600)
    a.start()

    def reset() -> None:
        a._queue.clear()
        s._queue.clear()

    results = []
    for name, body in cases(a, s).items():
        results.append((name, timed(body, args.calls, args.repeat, reset)))
    reset()
    await a.close(timeout=0)
    s.close(timeout=0)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--calls", type=int, default=200_000)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="a smoke run: 2,000 calls, 2 repeats")
    args = p.parse_args()
    if args.quick:
        args.calls, args.repeat = 2000, 2
    results = asyncio.run(main_async(args))
    base = results[0][1]
    print(f"Python {platform.python_version()} ({platform.python_implementation()}), "
          f"prometheus_client {importlib.metadata.version('prometheus-client')}, "
          f"botmetrics {botmetrics.__version__}; best of {args.repeat} x {args.calls:,} calls")
    width = max(len(n) for n, _ in results)
    for name, ns in results:
        print(f"{name:<{width}}  {ns:8.0f} ns/call  {ns / base:5.2f}x")
    helpers = [ns for name, ns in results if name.startswith("BotMetrics.")]
    print(f"botmetrics helpers / prometheus_client Counter: {min(helpers) / base:.2f}x to {max(helpers) / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
