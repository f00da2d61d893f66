"""botmetrics.aiogram in a real aiogram 3 Dispatcher: the example bot's
dispatcher fed real Update objects through Dispatcher.feed_update, with a
bot session that answers instead of Telegram, counted by the real server.

aiogram is required in CI (CI set): there a missing aiogram fails the run.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import sys
import unittest
from typing import Any, List, Optional, Tuple

from helpers import BOT, CLIENT_DIR, TOKEN, Server, cannot_run

logging.getLogger("botmetrics").setLevel(logging.ERROR)

try:
    import aiogram
    from aiogram import Bot, Dispatcher, Router
    from aiogram.client.session.base import BaseSession
    from aiogram.methods import SendMessage
    from aiogram.types import CallbackQuery, Chat, ErrorEvent, Message, Update, User, Voice
except ImportError:
    aiogram = None

if aiogram is not None:
    from botmetrics import BotMetrics
    from botmetrics.aiogram import BotMetricsMiddleware

    sys.path.insert(0, CLIENT_DIR)
    import example_aiogram_bot as example

    NOW = datetime.datetime.now(datetime.timezone.utc)
    ANN = User(id=7, is_bot=False, first_name="Ann")      # an admin of the bot
    BOB = User(id=8, is_bot=False, first_name="Bob")
    ANN_CHAT = Chat(id=7, type="private")
    BOB_CHAT = Chat(id=8, type="private")
    GROUP = Chat(id=-1001, type="supergroup")

    class NoTelegram(BaseSession):
        """A bot session that never reaches Telegram: it records each
        method call and answers as Telegram would."""

        def __init__(self) -> None:
            super().__init__()
            self.calls: List[Tuple[str, Any]] = []
            self.replies: List[str] = []

        async def close(self) -> None:
            pass

        async def stream_content(self, *args: Any, **kwargs: Any) -> Any:
            yield b""

        async def make_request(self, bot: Any, method: Any, timeout: Optional[int] = None) -> Any:
            self.calls.append((type(method).__name__, getattr(method, "chat_id", None)))
            if isinstance(method, SendMessage):
                self.replies.append(method.text)
                chat = {7: ANN_CHAT, 8: BOB_CHAT}.get(method.chat_id, GROUP)
                return Message(message_id=len(self.calls), date=NOW, chat=chat, text=method.text)
            return True

    class LLMDown(Exception):
        pass

    async def failing_llm(prompt: str) -> tuple:
        raise LLMDown("the LLM API answered 500")


def message(n: int, user: "User", chat: "Chat", text: Optional[str] = None,
            voice: Optional["Voice"] = None) -> "Update":
    return Update(update_id=n, message=Message(message_id=n, date=NOW, chat=chat, from_user=user,
                                               text=text, voice=voice))


class AiogramTest(unittest.TestCase):
    def setUp(self) -> None:
        if aiogram is None:
            cannot_run(self, "aiogram is not installed (pip install aiogram)")
        self.server = Server.for_test(self)

    def test_example_bot_counts_incoming_outgoing_errors_and_answers_metrics(self) -> None:
        sent: List[str] = []

        async def go() -> Tuple[BotMetrics, NoTelegram, str, str, dict]:
            metrics = BotMetrics(self.server.url, TOKEN, flush_interval=0.05)
            session = NoTelegram()
            bot = Bot("42:TEST", session=session)
            dp = example.build_dispatcher(metrics, example.Store(), admin_ids={ANN.id})

            await dp.feed_update(bot, message(1, ANN, ANN_CHAT, "/start"))
            await dp.feed_update(bot, Update(update_id=2, callback_query=CallbackQuery(
                id="c1", from_user=ANN, chat_instance="ci", data="consent:yes")))
            await dp.feed_update(bot, message(3, ANN, ANN_CHAT, "what is botmetrics?"))
            await dp.feed_update(bot, message(4, ANN, ANN_CHAT, voice=Voice(
                file_id="f", file_unique_id="u", duration=2)))
            await dp.feed_update(bot, message(5, BOB, GROUP, "hello"))
            # The handler's exception reaches aiogram (no error handler here)
            # and is counted on its way.
            with self.assertRaises(LLMDown):
                await dp.feed_update(bot, message(6, ANN, ANN_CHAT, "fail please"), llm=failing_llm)
            self.assertTrue(await metrics.flush(timeout=10))
            before = self.server.get("/v1/summary?format=text")
            summary = await metrics.summary()

            await dp.feed_update(bot, message(7, ANN, ANN_CHAT, "/metrics"))
            reply = session_replies(session)[-1]
            # Bob is not an admin: his /metrics is an ordinary text.
            await dp.feed_update(bot, message(8, BOB, BOB_CHAT, "/metrics"))
            self.assertTrue(await metrics.close(timeout=10))
            sent.extend(session_replies(session))
            return metrics, session, before, reply, summary

        metrics, session, before, reply, summary = asyncio.run(go())
        self.assertEqual(metrics.rejected, 0)

        # /metrics answers with the server's text, byte for byte.
        self.assertEqual(reply, before)
        # ... which counted what the bot did before it:
        lines = reply.splitlines()
        # 9 messages: 5 in, 4 out. Figures never break: U+202F before "%",
        # U+00A0 before a unit.
        self.assertIn("Today (since midnight, UTC): 9 messages, 2 new users, 0 daily-limit hits", lines)
        self.assertIn("Active users: 2 (24\u00a0h), 2 (7\u00a0d), 2 (30\u00a0d)", lines)
        self.assertIn("All time: 9 messages, 2 users, 1 error", lines)
        self.assertIn("Cache hits, all time: 0.0\u202f% (llm_answer)", lines)
        self.assertEqual(summary["messages"], {"total": 9, "today": 9})
        self.assertEqual(summary["responses"]["total"], 3)
        self.assertEqual(summary["errors"], {"total": 1})
        self.assertEqual(sent[-1], "You said: /metrics")

        # Telegram saw: replies to /start, the question, the voice, Bob's
        # hello in the group, Ann's /metrics and Bob's /metrics; the consent
        # callback's answer (not a message).
        self.assertEqual([name for name, _ in session.calls], [
            "SendMessage", "AnswerCallbackQuery", "SendMessage", "SendMessage", "SendMessage",
            "SendMessage", "SendMessage"])

        v = self.server.value
        # In: /start, question, voice, hello, the failing one, two /metrics.
        self.assertEqual(v("bot_messages_total", bot=BOT, role="user"), 7)
        # Out: the six SendMessage calls.
        self.assertEqual(v("bot_messages_total", bot=BOT, role="assistant"), 6)
        self.assertEqual(v("bot_errors_total", bot=BOT, kind="LLMDown"), 1)
        self.assertEqual(v("bot_users_registered_total", bot=BOT), 2)
        self.assertEqual(v("bot_consent_total", bot=BOT, decision="granted"), 1)
        self.assertEqual(v("bot_custom_events_total", bot=BOT, name="voice_message"), 1)
        self.assertEqual(v("bot_responses_total", bot=BOT, status="success"), 3)  # + Bob's /metrics
        self.assertEqual(v("bot_responses_total", bot=BOT, status="error"), 1)
        self.assertEqual(v("bot_cache_requests_total", bot=BOT, cache="llm_answer", result="miss"), 4)
        # Database queries per incoming message, from the example's session:
        # /start 2, question 4, voice 0, Bob's first hello 5, the failing
        # one 3, Ann's /metrics 0 (answered by the router, no database),
        # Bob's /metrics 4.
        self.assertEqual(v("bot_db_queries_per_message_count", bot=BOT), 7)
        self.assertEqual(v("bot_db_queries_per_message_sum", bot=BOT), 18)
        self.assertEqual(v("bot_active_users", bot=BOT, window="1d"), 2)

    def test_errors_handled_by_the_bot_are_counted_too(self) -> None:
        """An error handler that deals with the exception: aiogram does not
        raise it, the bot's handler sees it, and it is still counted."""
        seen: List[BaseException] = []

        async def go() -> BotMetrics:
            metrics = BotMetrics(self.server.url, TOKEN, flush_interval=0.05)
            bot = Bot("42:TEST", session=NoTelegram())
            dp = Dispatcher()
            dp.update.outer_middleware(BotMetricsMiddleware(metrics))
            router = Router()

            @router.message()
            async def crash(msg: Message) -> None:
                {}["missing"]

            @router.errors()
            async def handled(event: ErrorEvent) -> bool:
                seen.append(event.exception)
                return True

            dp.include_router(router)
            await dp.feed_update(bot, message(1, BOB, BOB_CHAT, "hi"))
            await dp.feed_update(bot, message(2, BOB, BOB_CHAT, "hi again"))
            self.assertTrue(await metrics.close(timeout=10))
            return metrics

        metrics = asyncio.run(go())
        self.assertEqual([type(e) for e in seen], [KeyError, KeyError])
        v = self.server.value
        self.assertEqual(v("bot_errors_total", bot=BOT, kind="KeyError"), 2)
        self.assertEqual(v("bot_messages_total", bot=BOT, role="user"), 2)
        self.assertEqual(v("bot_messages_total", bot=BOT, role="assistant"), 0)

    def test_attach_counts_messages_sent_before_any_update(self) -> None:
        async def go() -> NoTelegram:
            metrics = BotMetrics(self.server.url, TOKEN, flush_interval=0.05)
            session = NoTelegram()
            bot = Bot("42:TEST", session=session)
            middleware = BotMetricsMiddleware(metrics)
            middleware.attach(bot)
            middleware.attach(bot)  # idempotent: still counted once
            await bot.send_message(ANN.id, "I'm back online")
            await bot.send_message(GROUP.id, "Hello, group")
            await bot.send_chat_action(ANN.id, "typing")  # not a message
            self.assertTrue(await metrics.close(timeout=10))
            return session

        session = asyncio.run(go())
        self.assertEqual(session.replies, ["I'm back online", "Hello, group"])
        v = self.server.value
        self.assertEqual(v("bot_messages_total", bot=BOT, role="assistant"), 2)
        self.assertEqual(v("bot_messages_total", bot=BOT, role="user"), 0)
        # The private chat's id is its user's: one active user, not two.
        self.assertEqual(v("bot_active_users", bot=BOT, window="1d"), 1)

    def test_metrics_command_when_the_server_is_down(self) -> None:
        """/metrics still answers, and says the summary is unavailable."""
        async def go() -> List[str]:
            metrics = BotMetrics("http://127.0.0.1:9", TOKEN, timeout=2)
            session = NoTelegram()
            bot = Bot("42:TEST", session=session)
            dp = Dispatcher()
            from botmetrics.aiogram import metrics_router
            dp.include_router(metrics_router(metrics, admin_ids=[ANN.id]))
            await dp.feed_update(bot, message(1, ANN, ANN_CHAT, "/metrics"))
            await metrics.close(timeout=0)
            return session_replies(session)

        self.assertEqual(asyncio.run(go()), ["Metrics are not available right now."])


def session_replies(session: "NoTelegram") -> List[str]:
    return list(session.replies)


if __name__ == "__main__":
    unittest.main()
