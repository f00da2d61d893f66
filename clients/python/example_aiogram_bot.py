"""Example: an aiogram 3 bot that reports to botmetrics.

The wiring is three lines in build_dispatcher():

    dp.update.outer_middleware(BotMetricsMiddleware(metrics, db_queries=...))
    dp.include_router(metrics_router(metrics, admin_ids=ADMIN_IDS))
    dp.include_router(feedback_router(metrics))

and one under each LLM answer: reply_markup=feedback_keyboard().

BotMetricsMiddleware counts every incoming message (with its user and the
database queries it cost), every message the bot sends, and every exception
a handler raises. The handlers add the events only the bot knows:

    response         ask_llm(), timed by metrics.measure_response()
    feedback         the thumbs buttons under each LLM answer (feedback_router)
    cache            the answer cache in ask_llm()
    user_registered  ensure_user(), the first time a user is seen
    consent          the consent buttons
    limit_reached    the daily-limit check
    custom           voice messages

and the bot's admins get /metrics answered from botmetrics' summary
instead of rebuilding statistics from the bot's database on every call.

Run (after `pip install ./clients/python aiogram`):

    BOT_TOKEN=... BOTMETRICS_URL=http://127.0.0.1:9464 BOTMETRICS_TOKEN=change-me \\
        BOT_ADMIN_IDS=123456789 python3 clients/python/example_aiogram_bot.py

Its flow is tested through a real aiogram Dispatcher against the real
server (tests/test_aiogram.py).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Awaitable, Callable, Dict, Iterable, Optional, Tuple

from aiogram import BaseMiddleware, Bot, Dispatcher, F, Router
from aiogram.filters import CommandStart
from aiogram.types import (CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup, Message,
                           TelegramObject)

from botmetrics import BotMetrics
from botmetrics.aiogram import BotMetricsMiddleware, feedback_keyboard, feedback_router, metrics_router

DAILY_LIMIT = 20
# An LLM call: prompt in, (text, prompt_tokens, completion_tokens) out.
LLM = Callable[[str], Awaitable[Tuple[str, int, int]]]
UserRecord = Dict[str, Any]


class Store:
    """Stands in for the bot's own database."""

    def __init__(self) -> None:
        self.users: Dict[int, UserRecord] = {}
        self.answers: Dict[str, str] = {}


class Session:
    """One update's view of the Store. Counts its queries so the bot can
    report `db_queries` per message (the number its scalability analysis
    was about); one per update, because aiogram handles updates concurrently."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.queries = 0

    def user(self, user_id: int) -> Optional[UserRecord]:
        self.queries += 1
        return self.store.users.get(user_id)

    def add_user(self, user_id: int) -> UserRecord:
        self.queries += 1
        return self.store.users.setdefault(user_id, {"consent": None, "day": "", "today": 0})

    def count_message(self, user: UserRecord) -> int:
        self.queries += 1
        day = time.strftime("%Y-%m-%d", time.gmtime())
        if user["day"] != day:
            user["day"], user["today"] = day, 0
        today: int = user["today"] + 1
        user["today"] = today
        return today

    def cached_answer(self, prompt: str) -> str | None:
        self.queries += 1
        return self.store.answers.get(prompt)

    def save_answer(self, prompt: str, text: str) -> None:
        self.queries += 1
        self.store.answers[prompt] = text


class DatabaseMiddleware(BaseMiddleware):
    """Hands each update a fresh `db` session. Registered before
    BotMetricsMiddleware, so that the latter reads `db.queries` after the
    handler from the same data."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def __call__(self, handler: Callable[..., Awaitable[Any]], event: TelegramObject,
                      data: Dict[str, Any]) -> Any:
        data["db"] = Session(self.store)
        return await handler(event, data)


def ensure_user(uid: int, metrics: BotMetrics, db: Session) -> UserRecord:
    """The user's record, created (and counted as a registration) the first
    time the bot sees them, whatever they sent first."""
    user = db.user(uid)
    if user is None:
        user = db.add_user(uid)
        metrics.user_registered(uid)
    return user


async def on_start(message: Message, metrics: BotMetrics, db: Session) -> None:
    assert message.from_user is not None
    ensure_user(message.from_user.id, metrics, db)
    await message.answer("Hi! May I store your messages to answer you better?",
                         reply_markup=consent_keyboard())


async def on_consent(callback: CallbackQuery, metrics: BotMetrics, db: Session) -> None:
    """Callback of the consent buttons ("consent:yes" / "consent:no")."""
    uid = callback.from_user.id
    granted = callback.data == "consent:yes"
    ensure_user(uid, metrics, db)["consent"] = granted
    metrics.consent(uid, granted)
    await callback.answer("Thanks!" if granted else "OK, I won't store anything.")


async def on_voice(message: Message, metrics: BotMetrics) -> None:
    assert message.from_user is not None
    metrics.custom("voice_message", user_id=message.from_user.id)
    await message.answer("I can't listen to voice messages yet.")


async def on_text(message: Message, metrics: BotMetrics, db: Session, llm: Optional[LLM] = None) -> None:
    """`llm` comes from the dispatcher's data when the bot (or a test) puts
    one there; fake_llm otherwise."""
    assert message.from_user is not None and message.text is not None
    uid = message.from_user.id
    user = ensure_user(uid, metrics, db)
    if db.count_message(user) > DAILY_LIMIT:
        metrics.limit_reached(uid)
        await message.answer(f"You've reached today's limit of {DAILY_LIMIT} messages.")
        return
    # An exception from the LLM goes on to aiogram: BotMetricsMiddleware
    # counts it as an error of its class name.
    reply = await ask_llm(message.text, uid, metrics, db, llm or fake_llm)
    # 👍 / 👎 under the answer; feedback_router records the press.
    await message.answer(reply, reply_markup=feedback_keyboard())


async def ask_llm(prompt: str, uid: int, metrics: BotMetrics, db: Session, llm: LLM) -> str:
    cached = db.cached_answer(prompt)
    metrics.cache(cached is not None, cache="llm_answer", user_id=uid)
    if cached is not None:
        return cached
    # measure_response sends a `response` event when the block ends:
    # success, timeout on TimeoutError, error on any other exception.
    # The server prices the tokens from its table (gpt-4o-mini is in it);
    # set call.cost to what the provider reported to count that instead.
    with metrics.measure_response(uid, model="gpt-4o-mini", provider="openai") as call:
        text, prompt_tokens, completion_tokens = await asyncio.wait_for(llm(prompt), timeout=60)
        call.tokens = (prompt_tokens, completion_tokens)
    db.save_answer(prompt, text)
    return str(text)


async def fake_llm(prompt: str) -> Tuple[str, int, int]:
    """Replace with your LLM client; returns (text, prompt_tokens, completion_tokens)."""
    await asyncio.sleep(0.01)
    return f"You said: {prompt}", len(prompt.split()) + 20, 12


def consent_keyboard() -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(inline_keyboard=[[
        InlineKeyboardButton(text="Yes", callback_data="consent:yes"),
        InlineKeyboardButton(text="No", callback_data="consent:no"),
    ]])


def build_router() -> Router:
    router = Router(name="example")
    router.message.register(on_start, CommandStart())
    router.message.register(on_voice, F.voice)
    router.message.register(on_text, F.text)
    router.callback_query.register(on_consent, F.data.startswith("consent:"))
    return router


def build_dispatcher(metrics: BotMetrics, store: Store, admin_ids: Iterable[int]) -> Dispatcher:
    dp = Dispatcher()
    dp.update.outer_middleware(DatabaseMiddleware(store))
    # The one line: incoming and outgoing messages, handler errors.
    dp.update.outer_middleware(BotMetricsMiddleware(metrics, db_queries=lambda data: data["db"].queries))
    # /metrics for the admins, answered from botmetrics' summary: one HTTP
    # call, no database query. Before the example's router, whose F.text
    # handler would take the command otherwise.
    # An admin's /metrics and its answer are not counted.
    dp.include_router(metrics_router(metrics, admin_ids=set(admin_ids)))
    # The presses of feedback_keyboard()'s buttons: a `feedback` event,
    # the callback answered, the buttons removed.
    dp.include_router(feedback_router(metrics))
    dp.include_router(build_router())
    return dp


async def main() -> None:
    metrics = BotMetrics(os.environ.get("BOTMETRICS_URL", "http://127.0.0.1:9464"),
                         os.environ["BOTMETRICS_TOKEN"])
    admins = [int(a) for a in os.environ.get("BOT_ADMIN_IDS", "").split(",") if a.strip()]
    dp = build_dispatcher(metrics, Store(), admins)
    bot = Bot(os.environ["BOT_TOKEN"])
    try:
        await dp.start_polling(bot)
    finally:
        # Send what is still queued before the process exits.
        await metrics.close()


if __name__ == "__main__":
    asyncio.run(main())
