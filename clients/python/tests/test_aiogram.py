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
    THE_BOT = User(id=42, is_bot=True, first_name="Bot")

    class NoTelegram(BaseSession):
        """A bot session that never reaches Telegram: it records each
        method call and answers as Telegram would."""

        def __init__(self) -> None:
            super().__init__()
            self.calls: List[Tuple[str, Any]] = []
            self.methods: List[Any] = []
            self.replies: List[str] = []

        async def close(self) -> None:
            pass

        async def stream_content(self, *args: Any, **kwargs: Any) -> Any:
            yield b""

        async def make_request(self, bot: Any, method: Any, timeout: Optional[int] = None) -> Any:
            self.calls.append((type(method).__name__, getattr(method, "chat_id", None)))
            self.methods.append(method)
            if isinstance(method, SendMessage):
                self.replies.append(method.text)
                chat = {7: ANN_CHAT, 8: BOB_CHAT}.get(method.chat_id, GROUP)
                return Message(message_id=len(self.calls), date=NOW, chat=chat, text=method.text,
                               from_user=THE_BOT, reply_markup=method.reply_markup)
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
        self.assertIn("Today (since midnight, UTC): 9 messages (users' and the bot's), 2 registrations, "
                      "0 daily-limit hits", lines)
        self.assertIn("Active users: 2 (24\u00a0h), 2 (7\u00a0d), 2 (30\u00a0d)", lines)
        self.assertIn("All time: 9 messages, 2 registered users, 1 error reported", lines)
        self.assertTrue(lines[0].startswith("\N{BAR CHART} testbot (as of "), lines[0])
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
        # In: /start, question, voice, hello, the failing one, Bob's
        # /metrics; not Ann's: an admin reading the figures is not traffic.
        self.assertEqual(v("bot_messages_total", bot=BOT, role="user"), 6)
        # Out: the six SendMessage calls but the answer to Ann's /metrics.
        self.assertEqual(v("bot_messages_total", bot=BOT, role="assistant"), 5)
        self.assertEqual(v("bot_errors_total", bot=BOT, kind="LLMDown"), 1)
        self.assertEqual(v("bot_users_registered_total", bot=BOT), 2)
        self.assertEqual(v("bot_consent_total", bot=BOT, decision="granted"), 1)
        self.assertEqual(v("bot_custom_events_total", bot=BOT, name="voice_message"), 1)
        self.assertEqual(v("bot_responses_total", bot=BOT, status="success"), 3)  # + Bob's /metrics
        self.assertEqual(v("bot_responses_total", bot=BOT, status="error"), 1)
        self.assertEqual(v("bot_cache_requests_total", bot=BOT, cache="llm_answer", result="miss"), 4)
        # Database queries per incoming message, from the example's session:
        # /start 2, question 4, voice 0, Bob's first hello 5, the failing
        # one 3, Bob's /metrics 4 (Ann's is not counted).
        self.assertEqual(v("bot_db_queries_per_message_count", bot=BOT), 6)
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

    def test_thumbs_buttons_record_the_press_and_answer_it(self) -> None:
        """The example bot's LLM answer carries feedback_keyboard(); Ann
        presses thumbs up, Bob thumbs down: one feedback each, each press
        answered and its buttons removed; a press is no message."""
        async def go() -> Tuple[NoTelegram, BotMetrics, Any]:
            metrics = BotMetrics(self.server.url, TOKEN, flush_interval=0.05)
            session = NoTelegram()
            bot = Bot("42:TEST", session=session)
            dp = example.build_dispatcher(metrics, example.Store(), admin_ids=set())
            await dp.feed_update(bot, message(1, ANN, ANN_CHAT, "what is botmetrics?"))
            await dp.feed_update(bot, message(2, BOB, BOB_CHAT, "and what is a bot?"))
            answers = [m for m in session.methods if isinstance(m, SendMessage)]
            self.assertEqual(len(answers), 2)
            up, down = [b.callback_data for b in answers[0].reply_markup.inline_keyboard[-1]]
            for n, (user, chat, data) in enumerate([(ANN, ANN_CHAT, up), (BOB, BOB_CHAT, down)]):
                answer = Message(message_id=100 + n, date=NOW, chat=chat, from_user=THE_BOT,
                                 text="the answer", reply_markup=answers[n].reply_markup)
                await dp.feed_update(bot, Update(update_id=10 + n, callback_query=CallbackQuery(
                    id=f"press{n}", from_user=user, chat_instance="ci", data=data, message=answer)))
            self.assertTrue(await metrics.close(timeout=10))
            return session, metrics, answers[0].reply_markup

        session, metrics, keyboard = asyncio.run(go())
        self.assertEqual(metrics.rejected, 0)
        self.assertEqual([b.text for b in keyboard.inline_keyboard[-1]], ["\N{THUMBS UP SIGN}",
                                                                          "\N{THUMBS DOWN SIGN}"])
        acks = [m for m in session.methods if type(m).__name__ == "AnswerCallbackQuery"]
        self.assertEqual([(a.callback_query_id, a.text) for a in acks],
                         [("press0", "Thanks for the feedback!"), ("press1", "Thanks for the feedback!")])
        edits = [m for m in session.methods if type(m).__name__ == "EditMessageReplyMarkup"]
        self.assertEqual([(e.chat_id, e.message_id, e.reply_markup) for e in edits], [(7, 100, None), (8, 101, None)])
        v = self.server.value
        self.assertEqual(v("bot_feedback_total", bot=BOT, score="+1"), 1)
        self.assertEqual(v("bot_feedback_total", bot=BOT, score="-1"), 1)
        # The two questions and their answers; the presses and their acks are no messages.
        self.assertEqual(v("bot_messages_total", bot=BOT, role="user"), 2)
        self.assertEqual(v("bot_messages_total", bot=BOT, role="assistant"), 2)
        # The example's LLM call, priced from the table (gpt-4o-mini).
        self.assertEqual(v("bot_responses_total", bot=BOT, status="success"), 2)
        self.assertGreater(v("bot_llm_cost_total", bot=BOT, model="gpt-4o-mini", source="table"), 0)

    def test_rating_buttons_and_foreign_callbacks(self) -> None:
        """feedback_keyboard(scale=5): a press of 4 is score "4"; a forged
        button is answered and not counted; another prefix falls through."""
        from botmetrics.aiogram import feedback_keyboard, feedback_router
        other: List[str] = []

        async def go() -> NoTelegram:
            metrics = BotMetrics(self.server.url, TOKEN, flush_interval=0.05)
            session = NoTelegram()
            bot = Bot("42:TEST", session=session)
            dp = Dispatcher()
            dp.update.outer_middleware(BotMetricsMiddleware(metrics))
            dp.include_router(feedback_router(metrics, thanks=None, remove_buttons=False))
            router = Router()

            @router.callback_query()
            async def mine(query: CallbackQuery) -> None:
                other.append(query.data or "")
                await query.answer()

            dp.include_router(router)
            buttons = feedback_keyboard(scale=5).inline_keyboard[-1]
            self.assertEqual([b.text for b in buttons], ["1", "2", "3", "4", "5"])
            for n, data in enumerate([buttons[3].callback_data, "botmetrics:fb:+7", "menu:help"]):
                await dp.feed_update(bot, Update(update_id=n, callback_query=CallbackQuery(
                    id=f"q{n}", from_user=BOB, chat_instance="ci", data=data)))
            self.assertTrue(await metrics.close(timeout=10))
            return session

        session = asyncio.run(go())
        self.assertEqual(other, ["menu:help"])
        self.assertEqual([name for name, _ in session.calls], ["AnswerCallbackQuery"] * 3)
        v = self.server.value
        self.assertEqual(v("bot_feedback_total", bot=BOT, score="4"), 1)
        self.assertEqual(sum(v("bot_feedback_total", bot=BOT, score=s)
                             for s in ("-1", "+1", "1", "2", "3", "4", "5")), 1)

    def test_an_admins_metrics_command_is_not_counted(self) -> None:
        """Ann (an admin) only asks /metrics: no message in or out, no
        active user. Bob's /metrics is an ordinary message."""
        from botmetrics.aiogram import metrics_router

        async def go() -> NoTelegram:
            metrics = BotMetrics(self.server.url, TOKEN, flush_interval=0.05)
            session = NoTelegram()
            bot = Bot("42:TEST", session=session)
            dp = Dispatcher()
            dp.update.outer_middleware(BotMetricsMiddleware(metrics))
            dp.include_router(metrics_router(metrics, admin_ids={ANN.id}))
            for n in range(3):
                await dp.feed_update(bot, message(n, ANN, ANN_CHAT, "/metrics"))
            self.assertTrue(await metrics.flush(timeout=10))
            v = self.server.value
            self.assertEqual(v("bot_messages_total", bot=BOT, role="user"), 0)
            self.assertEqual(v("bot_messages_total", bot=BOT, role="assistant"), 0)
            self.assertEqual(v("bot_active_users", bot=BOT, window="1d"), 0)
            await dp.feed_update(bot, message(9, BOB, BOB_CHAT, "/metrics"))  # no handler takes it
            # Messages the bot sends outside an admin's /metrics still count.
            await bot.send_message(ANN.id, "a notice")
            self.assertTrue(await metrics.close(timeout=10))
            return session

        session = asyncio.run(go())
        self.assertEqual(len(session.replies), 4)
        # Three summaries, each of a bot with nothing counted yet.
        self.assertTrue(all(r.startswith("\N{BAR CHART} testbot (as of ") and "\nToday (since midnight, UTC): 0 messages"
                            in r for r in session.replies[:3]), session.replies)
        v = self.server.value
        self.assertEqual(v("bot_messages_total", bot=BOT, role="user"), 1)
        self.assertEqual(v("bot_messages_total", bot=BOT, role="assistant"), 1)
        self.assertEqual(v("bot_active_users", bot=BOT, window="1d"), 2)

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
