"""Tests of the Python client against the real botmetrics server.

    BOTMETRICS_BIN=target/release/botmetrics python3 -m unittest discover -s clients/python/tests -v

Each test starts the server binary on a free port with its own SQLite file
and reads the results back from /metrics (rendered fresh: --metrics-cache-ttl 0s).
Without BOTMETRICS_BIN the default target/release/botmetrics is used; the
server tests are skipped only when neither exists.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
import unittest
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENT_DIR = os.path.dirname(HERE)
REPO = os.path.dirname(os.path.dirname(CLIENT_DIR))
sys.path.insert(0, CLIENT_DIR)

from botmetrics_client import BotMetrics  # noqa: E402
import example_aiogram_bot as example  # noqa: E402

BIN = os.environ.get("BOTMETRICS_BIN") or os.path.join(REPO, "target", "release", "botmetrics")
BOT, TOKEN = "testbot", "secret1"
# The tests stop the server on purpose; the client's retry warnings are expected.
logging.getLogger("botmetrics").setLevel(logging.ERROR)
# Loopback only: never route the test's requests through a proxy.
os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The botmetrics binary on a fixed port and database, restartable."""

    def __init__(self, port: int, db: str, log: str):
        self.port, self.db, self.log = port, db, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [BIN, "--listen", f"127.0.0.1:{self.port}", "--tokens", f"{BOT}={TOKEN}",
                 "--database-url", f"sqlite://{self.db}", "--metrics-cache-ttl", "0s",
                 "--flush-interval", "1s"],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"botmetrics exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"botmetrics not ready after 20 s:\n{self.tail()}")

    def stop(self) -> None:
        """SIGTERM: a clean stop, which flushes the counters first."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError("botmetrics did not stop within 15 s of SIGTERM")

    def tail(self) -> str:
        with open(self.log, "rb") as f:
            return f.read()[-3000:].decode("utf-8", "replace")

    def metrics(self) -> dict:
        """/metrics as {(name, frozenset(labels)): value}."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)', line)
            if m:
                labels = frozenset(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
                out[(m.group(1), labels)] = float(m.group(3))
        return out

    def value(self, metric: str, /, **labels: str) -> float:
        """One series' value; 0 when it does not exist (yet)."""
        return self.metrics().get((metric, frozenset(labels.items())), 0.0)


class ExampleImportTest(unittest.TestCase):
    def test_example_imports_without_aiogram(self):
        self.assertTrue(callable(example.on_text))
        self.assertTrue(hasattr(example, "MetricsMiddleware"))


@unittest.skipUnless(os.path.exists(BIN) or "BOTMETRICS_BIN" in os.environ,
                     f"no botmetrics binary at {BIN}; build it or set BOTMETRICS_BIN")
class ClientAgainstServerTest(unittest.TestCase):
    def setUp(self):
        if not os.access(BIN, os.X_OK):
            self.fail(f"BOTMETRICS_BIN={BIN} is not an executable file")
        tmp = tempfile.TemporaryDirectory(prefix="botmetrics-client-test-")
        self.addCleanup(tmp.cleanup)
        self.server = Server(free_port(), os.path.join(tmp.name, "bm.db"), os.path.join(tmp.name, "server.log"))
        self.addCleanup(self.server.stop)
        self.server.start()

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
            self.assertGreater(m.retries, 0)
            self.assertEqual(m.pending, 300)

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
            self.assertTrue(await m.flush(timeout=10))
            text = await m.summary_text()
            summary = await m.summary(bot=BOT)
            await m.close()
            return m, text, summary

        m, text, summary = asyncio.run(go())
        self.assertEqual((m.sent, m.rejected), (15, 0))
        self.assertTrue(text.strip(), "summary text is empty")
        self.assertEqual(summary.get("bot"), BOT)
        v = self.server.value
        self.assertEqual(v("bot_responses_total", bot=BOT, status="success"), 2)
        self.assertEqual(v("bot_responses_total", bot=BOT, status="timeout"), 2)
        self.assertEqual(v("bot_llm_tokens_total", bot=BOT, model="gpt-4o-mini", kind="prompt"), 100)
        self.assertEqual(v("bot_llm_tokens_total", bot=BOT, model="gpt-4o", kind="completion"), 5)
        self.assertEqual(v("bot_cache_requests_total", bot=BOT, cache="llm_answer", result="hit"), 1)
        self.assertEqual(v("bot_consent_total", bot=BOT, decision="denied"), 1)
        self.assertEqual(v("bot_limit_reached_total", bot=BOT), 1)
        self.assertEqual(v("bot_custom_events_total", bot=BOT, name="payment"), 2.5)

    def test_example_bot_flow(self):
        """Drive the example's handlers as aiogram would, with stand-in
        Telegram objects, and check what reached the server."""
        replies = []

        def message(uid, text):
            async def answer(reply, **kw):
                replies.append(reply)
            return types.SimpleNamespace(from_user=types.SimpleNamespace(id=uid), text=text, voice=None,
                                         chat=types.SimpleNamespace(type="private"), answer=answer)

        def callback(uid, data):
            async def answer(reply, **kw):
                pass
            return types.SimpleNamespace(from_user=types.SimpleNamespace(id=uid), data=data, answer=answer)

        def route(handler):
            # What aiogram does: pass the handler the data keys it asks for.
            async def call(event, data):
                names = handler.__code__.co_varnames[1:handler.__code__.co_argcount]
                return await handler(event, **{k: data[k] for k in names if k in data})
            return call

        async def go():
            m = self.client(flush_interval=0.1)
            mw = example.MetricsMiddleware(m, example.Store())
            await mw(route(example.on_start), message(7, "/start"), {})
            await mw(route(example.on_consent), callback(7, "consent:yes"), {})
            for i in range(example.DAILY_LIMIT + 1):
                await mw(route(example.on_text), message(7, "hello" if i % 2 else f"question {i}"), {})
            self.assertTrue(await m.flush(timeout=10))
            await mw(route(example.on_metrics), message(7, "/metrics"), {})
            await m.close()
            return m

        m = asyncio.run(go())
        self.assertEqual(m.rejected, 0)
        v = self.server.value
        self.assertEqual(v("bot_users_registered_total", bot=BOT), 1)
        self.assertEqual(v("bot_consent_total", bot=BOT, decision="granted"), 1)
        self.assertEqual(v("bot_limit_reached_total", bot=BOT), 1)
        # /start, 21 texts and /metrics in; a reply to each of them out.
        self.assertEqual(v("bot_messages_total", bot=BOT, role="user"), 23)
        self.assertEqual(v("bot_messages_total", bot=BOT, role="assistant"), 23)
        # 20 texts under the limit: "hello" asked 10 times, 9 of them cached.
        self.assertEqual(v("bot_cache_requests_total", bot=BOT, cache="llm_answer", result="hit"), 9)
        self.assertEqual(v("bot_responses_total", bot=BOT, status="success"), 11)
        self.assertTrue(replies[-1].strip(), "/metrics answered with an empty summary")


@unittest.skipIf(example.Router is None, "aiogram is not installed (optional: pip install aiogram)")
@unittest.skipUnless(os.path.exists(BIN), f"no botmetrics binary at {BIN}")
class ExampleWithAiogramTest(unittest.TestCase):
    """The example wired into a real aiogram Dispatcher, fed updates as
    Telegram would send them, with a session that answers instead of Telegram."""

    def test_updates_through_aiogram(self):
        import datetime
        from aiogram import Bot, Dispatcher
        from aiogram.client.session.base import BaseSession
        from aiogram.methods import SendMessage
        from aiogram.types import CallbackQuery, Chat, Message, Update, User, Voice

        tmp = tempfile.TemporaryDirectory(prefix="botmetrics-aiogram-test-")
        self.addCleanup(tmp.cleanup)
        server = Server(free_port(), os.path.join(tmp.name, "bm.db"), os.path.join(tmp.name, "server.log"))
        self.addCleanup(server.stop)
        server.start()

        chat = Chat(id=7, type="private")
        user = User(id=7, is_bot=False, first_name="Ann")
        now = datetime.datetime.now(datetime.timezone.utc)

        class FakeTelegram(BaseSession):
            def __init__(self):
                super().__init__()
                self.replies = []

            async def close(self):
                pass

            async def stream_content(self, *args, **kwargs):
                yield b""

            async def make_request(self, bot, method, timeout=None):
                if isinstance(method, SendMessage):
                    self.replies.append(method.text)
                    return Message(message_id=len(self.replies), date=now, chat=chat, text=method.text)
                return True

        def message(n, text=None, voice=None):
            return Update(update_id=n, message=Message(message_id=n, date=now, chat=chat, from_user=user,
                                                       text=text, voice=voice))

        async def go():
            metrics = BotMetrics(server.url, TOKEN, flush_interval=0.1)
            session = FakeTelegram()
            bot = Bot("42:TEST", session=session)
            dp = Dispatcher()
            middleware = example.MetricsMiddleware(metrics, example.Store())
            dp.message.outer_middleware(middleware)
            dp.callback_query.outer_middleware(middleware)
            dp.include_router(example.build_router())
            await dp.feed_update(bot, message(1, "/start"))
            await dp.feed_update(bot, Update(update_id=2, callback_query=CallbackQuery(
                id="c1", from_user=user, chat_instance="ci", data="consent:yes")))
            await dp.feed_update(bot, message(3, "what is botmetrics?"))
            await dp.feed_update(bot, message(4, voice=Voice(file_id="f", file_unique_id="u", duration=2)))
            self.assertTrue(await metrics.flush(timeout=10))
            await dp.feed_update(bot, message(5, "/metrics"))
            await metrics.close()
            return metrics, session.replies

        metrics, replies = asyncio.run(go())
        self.assertEqual(metrics.rejected, 0)
        self.assertEqual(len(replies), 4, replies)  # /start, the answer, voice, /metrics
        v = server.value
        self.assertEqual(v("bot_users_registered_total", bot=BOT), 1)
        self.assertEqual(v("bot_consent_total", bot=BOT, decision="granted"), 1)
        self.assertEqual(v("bot_responses_total", bot=BOT, status="success"), 1)
        self.assertEqual(v("bot_custom_events_total", bot=BOT, name="voice_message"), 1)
        self.assertEqual(v("bot_messages_total", bot=BOT, role="user"), 4)
        self.assertEqual(v("bot_messages_total", bot=BOT, role="assistant"), 4)


if __name__ == "__main__":
    unittest.main()
