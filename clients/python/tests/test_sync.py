"""The threaded client (botmetrics.SyncBotMetrics) against the real server:
from a plain script with no event loop, from many threads at once, and
against a server that never answers."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
import unittest

from botmetrics import SyncBotMetrics
from helpers import BOT, TOKEN, HangingServer, Server

logging.getLogger("botmetrics").setLevel(logging.ERROR)


class SyncClientTest(unittest.TestCase):
    def setUp(self) -> None:
        self.server = Server.for_test(self)

    def test_a_plain_script(self) -> None:
        """No asyncio anywhere: the script tracks, closes and exits; every
        event is counted. -W error: any warning would fail it."""
        script = textwrap.dedent("""
            import sys
            from botmetrics import SyncBotMetrics

            metrics = SyncBotMetrics(sys.argv[1], sys.argv[2], batch_size=50)
            for i in range(120):
                metrics.message(i % 10, "user", db_queries=2)
            with metrics.measure_response(3, model="gpt-4o-mini") as call:
                call.tokens = (30, 7)
            metrics.custom("script_done")
            delivered = metrics.close(timeout=10)
            print(delivered, metrics.sent, metrics.pending, metrics.requests)
        """)
        out = subprocess.run([sys.executable, "-W", "error", "-c", script, self.server.url, TOKEN],
                             capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stderr, "")
        delivered, sent, pending, requests = out.stdout.split()
        self.assertEqual((delivered, sent, pending), ("True", "122", "0"))
        self.assertGreaterEqual(int(requests), 3)  # batches of 50: at least three posts
        v = self.server.value
        self.assertEqual(v("bot_messages_total", bot=BOT, role="user"), 120)
        self.assertEqual(v("bot_db_queries_per_message_sum", bot=BOT), 240)
        self.assertEqual(v("bot_llm_tokens_total", bot=BOT, model="gpt-4o-mini", kind="completion"), 7)
        self.assertEqual(v("bot_custom_events_total", bot=BOT, name="script_done"), 1)
        self.assertEqual(v("bot_active_users", bot=BOT, window="1d"), 10)

    def test_many_threads_at_once(self) -> None:
        """Eight threads released together track 500 events each while the
        sender drains: every event arrives exactly once."""
        m = SyncBotMetrics(self.server.url, TOKEN, batch_size=64, flush_interval=0.05)
        start = threading.Barrier(8)

        def worker(n: int) -> None:
            start.wait()
            for i in range(250):
                m.message(1000 + n, "user")
                m.cache(i % 4 == 0, cache="answers", user_id=1000 + n)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertTrue(m.close(timeout=20))
        self.assertEqual((m.sent, m.duplicates, m.dropped, m.rejected, m.pending), (4000, 0, 0, 0, 0))
        v = self.server.value
        self.assertEqual(v("bot_messages_total", bot=BOT, role="user"), 2000)
        self.assertEqual(v("bot_cache_requests_total", bot=BOT, cache="answers", result="hit"), 8 * 63)
        self.assertEqual(v("bot_cache_requests_total", bot=BOT, cache="answers", result="miss"), 8 * 187)
        self.assertEqual(v("botmetrics_events_accepted_total", bot=BOT), 4000)
        self.assertEqual(v("bot_active_users", bot=BOT, window="1d"), 8)

    def test_flush_from_another_thread_and_summary(self) -> None:
        m = SyncBotMetrics(self.server.url, TOKEN, flush_interval=60)  # only flush() sends
        m.user_registered(1)
        m.limit_reached(1)
        m.message(1, "user")
        result: list[bool] = []
        t = threading.Thread(target=lambda: result.append(m.flush(timeout=10)))
        t.start()
        t.join()
        self.assertEqual(result, [True])
        text = m.summary_text()
        self.assertEqual(text, self.server.get("/v1/summary?format=text"))
        lines = text.splitlines()
        self.assertIn("Today (since midnight, UTC): 1 message (users' and the bot's), 1 registration, "
                      "1 daily-limit hit", lines)
        self.assertIn("All time: 1 message, 1 registered user, 0 errors reported", lines)
        self.assertEqual(m.summary(bot=BOT)["users"]["registered_today"], 1)
        self.assertTrue(m.close())
        m.message(1, "user")  # after close: dropped, counted, no error
        self.assertEqual((m.sent, m.dropped), (3, 1))

    def test_close_is_true_only_when_every_event_was_delivered(self) -> None:
        """A wrong token: the server answers 401 and counts nothing, so
        close() says False (nothing is left unsent, but nothing was
        delivered either). The right token: True."""
        wrong = SyncBotMetrics(self.server.url, "not-the-token", batch_size=10, flush_interval=0.05)
        with self.assertLogs("botmetrics", logging.ERROR) as logged:
            for i in range(25):
                wrong.message(i, "user")
            self.assertFalse(wrong.close(timeout=10))
        self.assertIn("(401)", logged.output[0])
        self.assertEqual((wrong.sent, wrong.rejected, wrong.pending), (0, 25, 0))
        self.assertEqual(self.server.value("bot_messages_total", bot=BOT, role="user"), 0)

        right = SyncBotMetrics(self.server.url, TOKEN, batch_size=10, flush_interval=0.05)
        for i in range(25):
            right.message(i, "user")
        self.assertTrue(right.close(timeout=10))
        self.assertEqual((right.sent, right.rejected, right.dropped, right.pending), (25, 0, 0, 0))
        self.assertEqual(self.server.value("bot_messages_total", bot=BOT, role="user"), 25)

    def test_close_is_false_when_an_invalid_event_was_refused(self) -> None:
        """A 422 drops only the bad event and the rest are delivered, but
        not everything was: close() says False."""
        m = SyncBotMetrics(self.server.url, TOKEN, flush_interval=0.05)
        m.error("llm_timeout")
        m.error("not a valid kind!")  # 422: names are [A-Za-z0-9_.:-]
        with self.assertLogs("botmetrics", logging.WARNING):
            self.assertTrue(m.flush(timeout=10))  # nothing left to send
            self.assertFalse(m.close(timeout=10))
        self.assertEqual((m.sent, m.rejected), (1, 1))


class SyncWithoutServerTest(unittest.TestCase):
    def test_track_returns_while_the_server_holds_the_request(self) -> None:
        with HangingServer() as wedged:
            m = SyncBotMetrics(wedged.url, TOKEN, batch_size=10, flush_interval=0.05, timeout=30)
            for i in range(10):
                m.message(i)
            self.assertTrue(wedged.connected.wait(10))
            for i in range(1000):
                m.message(i, "assistant")
            self.assertEqual((m.pending, m.requests, m.retries, m.sent), (1010, 1, 0, 0))
            self.assertFalse(m.close(timeout=0.2))
            self.assertEqual(m.pending, 1010)

    def test_a_full_queue_under_threads_counts_every_drop(self) -> None:
        """Server down, queue of 100, eight threads tracking 100 each: every
        event is either pending or counted as dropped."""
        with HangingServer(hang=False) as down:
            m = SyncBotMetrics(down.url, TOKEN, batch_size=10, max_queue=100, flush_interval=0.05,
                               initial_backoff=5, max_backoff=5)
            start = threading.Barrier(8)

            def worker() -> None:
                start.wait()
                for i in range(100):
                    m.custom("x", user_id=i)

            threads = [threading.Thread(target=worker) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            self.assertEqual(m.pending + m.dropped, 800)
            self.assertLessEqual(m.pending, 100 + 10 + 8)  # queue, one batch in flight, racing appends
            self.assertEqual(m.sent, 0)
            self.assertFalse(m.close(timeout=0.1))


if __name__ == "__main__":
    unittest.main()
