"""The asyncio client (botmetrics.BotMetrics) against the real botmetrics
server, and against servers that are down or never answer.

    BOTMETRICS_BIN=target/debug/botmetrics clients/python/ci.sh

Each test starts the server binary on a free port with its own SQLite file
and reads the results back from /metrics (rendered fresh: --metrics-cache-ttl 0s).
"""

from __future__ import annotations

import asyncio
import doctest
import json
import logging
import random
import re
import time
import unittest
import warnings

import botmetrics._core
from botmetrics import BotMetrics, backoff_delays
from helpers import BOT, TOKEN, HangingServer, Server

# The tests stop the server on purpose; the client's retry warnings are expected.
logging.getLogger("botmetrics").setLevel(logging.ERROR)


class ClientAgainstServerTest(unittest.TestCase):
    def setUp(self):
        self.server = Server.for_test(self)

    def client(self, **kw) -> BotMetrics:
        return BotMetrics(self.server.url, TOKEN, **kw)

    def test_batching_sends_few_requests_and_counts_every_event(self):
        async def go():
            m = self.client(batch_size=100, flush_interval=60)
            for i in range(1000):
                m.message(i % 37, "user", db_queries=3)
            self.assertTrue(await m.flush(timeout=20))
            await m.close()
            return m

        m = asyncio.run(go())
        self.assertEqual(m.sent, 1000)
        self.assertEqual((m.dropped, m.rejected, m.retries, m.duplicates), (0, 0, 0, 0))
        self.assertLessEqual(m.requests, 10, "1000 events in batches of 100")
        self.assertEqual(self.server.value("bot_messages_total", bot=BOT, role="user"), 1000)
        self.assertEqual(self.server.value("botmetrics_events_accepted_total", bot=BOT), 1000)
        self.assertEqual(self.server.value("bot_db_queries_per_message_sum", bot=BOT), 3000)

    def test_partial_batch_is_sent_after_flush_interval(self):
        async def go():
            m = self.client(batch_size=100, flush_interval=0.2)
            for i in range(5):
                m.user_registered(i)
            await asyncio.sleep(1.0)  # no flush(): the timer alone sends it
            sent, requests = m.sent, m.requests
            await m.close()
            return sent, requests

        sent, requests = asyncio.run(go())
        self.assertEqual((sent, requests), (5, 1))
        self.assertEqual(self.server.value("bot_users_registered_total", bot=BOT), 5)

    def test_retry_after_server_restart_counts_everything_once(self):
        async def go():
            m = self.client(batch_size=50, flush_interval=0.1, max_backoff=0.5)
            for i in range(120):
                m.custom("before_restart", user_id=i)
            self.assertTrue(await m.flush(timeout=10))

            await asyncio.to_thread(self.server.stop)
            for i in range(300):
                m.custom("during_outage", user_id=i)
            await asyncio.sleep(1.5)  # the sender fails and backs off meanwhile
            self.assertEqual((m.pending, m.sent), (300, 120))

            await asyncio.to_thread(self.server.start)  # same port, same database
            self.assertTrue(await m.flush(timeout=20), "events still pending after restart")
            await m.close()
            return m

        m = asyncio.run(go())
        self.assertEqual((m.sent, m.dropped, m.rejected), (420, 0, 0))
        # The first 120 were restored from the database, not sent again.
        self.assertEqual(self.server.value("bot_custom_events_total", bot=BOT, name="before_restart"), 120)
        self.assertEqual(self.server.value("bot_custom_events_total", bot=BOT, name="during_outage"), 300)

    def test_retried_batch_whose_answer_was_lost_is_not_double_counted(self):
        class AnswerLostOnce(BotMetrics):
            lost = False

            def _request(self, method, path, body=None, content_type=None):
                reply = super()._request(method, path, body, content_type)
                if method == "POST" and not self.lost:
                    self.lost = True  # the server counted it; the client never hears so
                    raise ConnectionResetError("connection reset before the answer")
                return reply

        async def go():
            m = AnswerLostOnce(self.server.url, TOKEN, batch_size=100, flush_interval=0.1, max_backoff=0.2)
            for i in range(80):
                m.message(i, "user")
            self.assertTrue(await m.flush(timeout=10))
            await m.close()
            return m

        m = asyncio.run(go())
        self.assertEqual((m.sent, m.retries, m.duplicates), (80, 1, 80))
        self.assertEqual(self.server.value("bot_messages_total", bot=BOT, role="user"), 80)
        self.assertEqual(self.server.value("botmetrics_events_duplicate_total", bot=BOT), 80)

    def test_full_queue_drops_oldest_and_counts_them(self):
        async def go():
            await asyncio.to_thread(self.server.stop)
            m = self.client(batch_size=20, flush_interval=0.1, max_queue=50, max_backoff=0.3)
            for i in range(1, 81):  # values 1..80; the queue keeps the newest 50
                m.custom("queued", value=i)
            self.assertEqual((m.pending, m.dropped), (50, 30))
            await asyncio.sleep(0.5)  # failing attempts meanwhile lose nothing more
            self.assertEqual((m.pending, m.dropped), (50, 30))
            await asyncio.to_thread(self.server.start)
            self.assertTrue(await m.flush(timeout=20))
            await m.close()
            return m

        m = asyncio.run(go())
        self.assertEqual((m.sent, m.dropped), (50, 30))
        self.assertEqual(self.server.value("bot_custom_events_total", bot=BOT, name="queued"), sum(range(31, 81)))

    def test_invalid_event_is_dropped_and_the_rest_delivered(self):
        async def go():
            m = self.client(batch_size=10, flush_interval=0.1)
            m.error("llm_timeout")
            m.error("not a valid kind!")  # 422: names are [A-Za-z0-9_.:-]
            m.error("db")
            self.assertTrue(await m.flush(timeout=10))
            await m.close()
            return m

        m = asyncio.run(go())
        self.assertEqual((m.sent, m.rejected), (2, 1))
        self.assertEqual(self.server.value("bot_errors_total", bot=BOT, kind="llm_timeout"), 1)
        self.assertEqual(self.server.value("bot_errors_total", bot=BOT, kind="db"), 1)

    def test_close_is_true_only_when_every_event_was_delivered(self):
        """A wrong token (401, nothing counted): close() is False; the right
        token: True."""
        async def go(token):
            m = BotMetrics(self.server.url, token, batch_size=10, flush_interval=0.05)
            for i in range(25):
                m.message(i, "user")
            return m, await m.close(timeout=10)

        with self.assertLogs("botmetrics", logging.ERROR) as logged:
            wrong, delivered = asyncio.run(go("not-the-token"))
        self.assertIn("(401)", logged.output[0])
        self.assertFalse(delivered)
        self.assertEqual((wrong.sent, wrong.rejected, wrong.pending), (0, 25, 0))
        self.assertEqual(self.server.value("bot_messages_total", bot=BOT, role="user"), 0)
        right, delivered = asyncio.run(go(TOKEN))
        self.assertTrue(delivered)
        self.assertEqual((right.sent, right.rejected, right.dropped), (25, 0, 0))
        self.assertEqual(self.server.value("bot_messages_total", bot=BOT, role="user"), 25)

    def test_every_helper_sends_a_valid_event(self):
        async def go():
            m = self.client(flush_interval=0.1)
            m.message(1, "user", db_queries=4, chat_type="private")
            m.message(1, "assistant")
            m.response(1, "success", 1234.5, model="gpt-4o-mini", tokens=(100, 20))
            m.response("user-2", "timeout", 30000, tokens={"prompt": 50, "completion": 0})
            with m.measure_response(1, model="gpt-4o") as call:
                call.tokens = (10, 5)
            try:
                async with m.measure_response(1, model="gpt-4o"):
                    raise asyncio.TimeoutError  # the LLM call timed out
            except asyncio.TimeoutError:
                pass
            m.cache(True, cache="llm_answer")
            m.cache("miss")
            m.user_registered(1)
            m.consent(1, True)
            m.consent(2, False)
            m.limit_reached(1)
            m.error("llm_api", user_id=1)
            m.custom("voice_message")
            m.custom("payment", value=2.5, user_id=1)
            m.response(1, "success", 900.0, model="gpt-4o-mini", tokens=(100, 20), cached_tokens=60,
                       cache_write_tokens=10, reasoning_tokens=5, ttft_ms=300.0, provider="openai", cost=0.002)
            m.feedback(1, 1)
            m.feedback(2, 4, scale=5, reason="helpful")
            self.assertTrue(await m.flush(timeout=10))
            text = await m.summary_text()
            summary = await m.summary(bot=BOT)
            await m.close()
            return m, text, summary

        m, text, summary = asyncio.run(go())
        self.assertEqual((m.sent, m.rejected), (18, 0))
        # The text is the server's rendering, relayed byte for byte; the
        # lines for the counts sent above are exact.
        self.assertEqual(text, self.server.get(f"/v1/summary?format=text"))
        lines = text.splitlines()
        self.assertIn("Today (since midnight, UTC): 2 messages (users' and the bot's), 1 registration, "
                      "1 daily-limit hit", lines)
        self.assertIn("All time: 2 messages, 1 registered user, 1 error reported", lines)
        self.assertIn("Cache hits, all time: default 0.0\u202f%, llm_answer 100.0\u202f%", lines)
        self.assertEqual(summary["bot"], BOT)
        self.assertEqual(summary["messages"], {"total": 2, "today": 2})
        self.assertEqual(summary["responses"]["total"], 5)
        self.assertEqual(summary["feedback"]["rated_total"], 2)
        self.assertEqual(summary["users"]["registered_total"], 1)
        self.assertEqual(summary["errors"], {"total": 1})
        v = self.server.value
        self.assertEqual(v("bot_responses_total", bot=BOT, status="success"), 3)
        self.assertEqual(v("bot_llm_cost_total", bot=BOT, model="gpt-4o-mini", source="reported"), 0.002)
        self.assertEqual(v("bot_llm_tokens_total", bot=BOT, model="gpt-4o-mini", kind="cache_write"), 10)
        self.assertEqual(v("bot_llm_ttft_seconds_count", bot=BOT), 1)
        self.assertEqual(v("bot_feedback_total", bot=BOT, score="+1"), 1)
        self.assertEqual(v("bot_feedback_total", bot=BOT, score="4"), 1)
        self.assertEqual(v("bot_responses_total", bot=BOT, status="timeout"), 2)
        self.assertEqual(v("bot_llm_tokens_total", bot=BOT, model="gpt-4o-mini", kind="prompt"), 200)
        self.assertEqual(v("bot_llm_tokens_total", bot=BOT, model="gpt-4o", kind="completion"), 5)
        self.assertEqual(v("bot_cache_requests_total", bot=BOT, cache="llm_answer", result="hit"), 1)
        self.assertEqual(v("bot_consent_total", bot=BOT, decision="denied"), 1)
        self.assertEqual(v("bot_limit_reached_total", bot=BOT), 1)
        self.assertEqual(v("bot_custom_events_total", bot=BOT, name="payment"), 2.5)


class Held(botmetrics._core.Core):
    """The shared core with no sender: what the helpers queue stays queued."""

    def _kick(self) -> None:
        pass


class TimestampTest(unittest.TestCase):
    HELPERS = [
        lambda m, **ts: m.message(1, "user", **ts),
        lambda m, **ts: m.response(1, "success", 10.0, **ts),
        lambda m, **ts: m.feedback(1, 1, **ts),
        lambda m, **ts: m.cache(True, **ts),
        lambda m, **ts: m.user_registered(1, **ts),
        lambda m, **ts: m.consent(1, True, **ts),
        lambda m, **ts: m.limit_reached(1, **ts),
        lambda m, **ts: m.error("x", **ts),
        lambda m, **ts: m.custom("x", **ts),
        lambda m, **ts: m.track("limit_reached", **ts),
    ]

    def test_every_helper_takes_ts_and_defaults_to_now(self):
        m = Held("http://127.0.0.1:9", TOKEN)
        for helper in self.HELPERS:
            helper(m, ts=1_700_000_000)
            helper(m, ts=1_700_000_000.25)
        before = time.time()
        for helper in self.HELPERS:
            helper(m)
            helper(m, ts=None)
        after = time.time()
        events = list(m._queue)
        self.assertEqual(len(events), 4 * len(self.HELPERS))
        stamped, now = events[:2 * len(self.HELPERS)], events[2 * len(self.HELPERS):]
        self.assertEqual([e["ts"] for e in stamped], [1_700_000_000, 1_700_000_000.25] * len(self.HELPERS))
        self.assertTrue(all(before <= e["ts"] <= after for e in now), now)

    def test_a_past_ts_counts_on_its_day_and_a_future_one_is_refused(self):
        server = Server.for_test(self, "--user-scan-interval", "1s")
        now = time.time()
        midnight = now - now % 86400  # the server's calendar: UTC
        yesterday = midnight - 12 * 3600

        async def go():
            m = BotMetrics(server.url, TOKEN, flush_interval=0.05)
            m.message(7, "user", ts=yesterday)          # user 7 first came yesterday...
            m.message(7, "user")                        # ... and is back today
            m.message(8, "user", ts=int(midnight))      # user 8 is new today, at midnight sharp
            m.message(9, "user", ts=now + 600)          # ten minutes ahead: refused (422), alone
            self.assertTrue(await m.flush(timeout=10))
            await m.close()
            return m

        m = asyncio.run(go())
        self.assertEqual((m.sent, m.rejected), (3, 1))
        summary = json.loads(server.get(f"/v1/summary?bot={BOT}"))
        self.assertEqual(summary["messages"], {"total": 3, "today": 2})
        self.assertEqual((summary["users"]["new_today"], summary["users"]["returning_today"]), (1, 1))
        day = time.strftime("%Y-%m-%d", time.gmtime(yesterday))
        deadline = time.monotonic() + 10
        while True:  # the cohorts are counted by the scan, every second here
            cohort = json.loads(server.get(f"/v1/retention?bot={BOT}&from={day}&to={day}"))["cohorts"][0]
            if cohort["size"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.assertEqual((cohort["day"], cohort["size"], cohort["d1"]), (day, 1, 1))


class BackoffTest(unittest.TestCase):
    def test_the_sequence_doubles_to_the_cap_with_jitter_in_the_upper_half(self):
        rng = random.Random(7)
        draws = random.Random(7)
        steps = [0.25, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
        delays = backoff_delays(0.25, 4.0, rng)
        for step in steps:
            self.assertEqual(next(delays), step * draws.uniform(0.5, 1.0))

    def test_retries_wait_the_sequence_between_real_attempts(self):
        """A server that drops every connection: the client's attempts are
        spaced by the delays it says it waits, and those follow the
        sequence 0.2, 0.4, 0.8, 0.8 (capped) within the jitter."""
        records: list[logging.LogRecord] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(record)

        log = logging.getLogger("botmetrics")
        handler = Keep(logging.WARNING)
        log.addHandler(handler)
        log.setLevel(logging.WARNING)
        self.addCleanup(log.setLevel, logging.ERROR)
        self.addCleanup(log.removeHandler, handler)

        with HangingServer(hang=False) as down:
            async def go() -> BotMetrics:
                m = BotMetrics(down.url, TOKEN, flush_interval=0.05, initial_backoff=0.2, max_backoff=0.8)
                m.message(1)
                while len(down.accepted) < 5:
                    await asyncio.sleep(0.05)
                self.assertFalse(await m.close(timeout=0))
                return m

            m = asyncio.run(go())
            accepted = list(down.accepted[:5])
        waits = [float(re.search(r"retrying in ([0-9.]+)s", r.getMessage()).group(1))
                 for r in records if "retrying in" in r.getMessage()][:4]
        self.assertEqual(len(waits), 4, [r.getMessage() for r in records])
        for wait, step in zip(waits, [0.2, 0.4, 0.8, 0.8]):
            self.assertGreaterEqual(wait, step * 0.5 - 0.001)
            self.assertLessEqual(wait, step + 0.001)
        gaps = [b - a for a, b in zip(accepted, accepted[1:])]
        for gap, wait in zip(gaps, waits):
            # The logged wait is rounded to the millisecond.
            self.assertGreaterEqual(gap, wait - 0.002, (gaps, waits))
        self.assertGreaterEqual(m.retries, 4)
        self.assertEqual(m.sent, 0)


class NeverBlocksTest(unittest.TestCase):
    def test_track_returns_while_the_server_holds_the_request(self):
        """The server accepted the batch's connection and never answers.
        1,000 events tracked meanwhile are all queued, and the one request
        is still open: had track() waited on the network, the request would
        have timed out (30 s) and been retried first."""
        with HangingServer() as wedged:
            m = BotMetrics(wedged.url, TOKEN, batch_size=10, flush_interval=0.05, timeout=30)

            async def go() -> tuple[int, int, int, int, bool]:
                for i in range(10):
                    m.message(i)
                while not wedged.connected.is_set():
                    await asyncio.sleep(0.01)
                for i in range(1000):
                    m.message(i, "assistant")
                state = (m.pending, m.requests, m.retries, m.sent)
                # close() gives up after its timeout; the stuck request is
                # abandoned, not waited for.
                delivered = await m.close(timeout=0.2)
                return (*state, delivered)

            pending, requests, retries, sent, delivered = asyncio.run(go())
            # asyncio.run() has returned while the request is still open:
            # had it waited for the request, its 30 s timeout would have
            # been counted as a retry by now.
            self.assertEqual((m.requests, m.retries, len(wedged.accepted)), (1, 0, 1))
        self.assertEqual((pending, requests, retries, sent), (1010, 1, 0, 0))
        self.assertFalse(delivered)


class NoLoopTest(unittest.TestCase):
    def test_tracking_without_a_running_loop_warns_once_and_keeps_the_events(self):
        m = BotMetrics("http://127.0.0.1:9", TOKEN)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m.message(1)
            m.error("x")
            m.track("custom", name="y")
        self.assertEqual(len(caught), 1, [str(w.message) for w in caught])
        self.assertIs(caught[0].category, RuntimeWarning)
        self.assertIn("no running asyncio event loop", str(caught[0].message))
        self.assertIn("SyncBotMetrics", str(caught[0].message))
        # It points at the caller, not into the client.
        self.assertEqual(caught[0].filename, __file__)
        self.assertEqual(m.pending, 3)

    def test_events_tracked_before_the_loop_are_sent_once_it_runs(self):
        server = Server.for_test(self)
        m = BotMetrics(server.url, TOKEN, flush_interval=0.05)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m.user_registered(5)

        async def go() -> bool:
            m.start()
            return await m.close(timeout=10)

        self.assertTrue(asyncio.run(go()))
        self.assertEqual(server.value("bot_users_registered_total", bot=BOT), 1)


def load_tests(loader: unittest.TestLoader, tests: unittest.TestSuite, pattern: object) -> unittest.TestSuite:
    """The examples in the package's docstrings are tests too."""
    tests.addTests(doctest.DocTestSuite(botmetrics._core))
    return tests


if __name__ == "__main__":
    unittest.main()
