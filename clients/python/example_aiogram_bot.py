"""Example: an aiogram 3 bot that reports to botmetrics.

Shows where each event of botmetrics' event table is sent from a real bot:

    message          MetricsMiddleware (every incoming text), answer()      -> user / assistant
    response         ask_llm(), timed by metrics.measure_response()
    cache            the answer cache in ask_llm()
    user_registered  /start, first time a user is seen
    consent          the consent buttons
    limit_reached    the daily-limit check
    error            MetricsMiddleware, when a handler raises
    custom           voice messages, feedback buttons

and how the bot answers its own /metrics command from botmetrics' summary
instead of rebuilding statistics from its database on every call.

Run (needs `pip install aiogram`):

    BOT_TOKEN=... BOTMETRICS_URL=http://127.0.0.1:9464 BOTMETRICS_TOKEN=secret1 \\
        python3 example_aiogram_bot.py

The handlers are plain functions of (message, metrics, db, ...) - aiogram
injects `metrics` and `db` from the middleware's data - so this module imports, and its flow
is tested (tests/test_client.py), without aiogram installed.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Awaitable, Callable, Dict

from botmetrics_client import BotMetrics

try:
    from aiogram import BaseMiddleware, Bot, Dispatcher, F, Router
    from aiogram.filters import Command, CommandStart
    from aiogram.types import InlineKeyboardButton, InlineKeyboardMarkup
except ImportError:  # aiogram is the bot's dependency, not the client's
    BaseMiddleware = object  # type: ignore[assignment,misc]
    Router = None  # type: ignore[assignment,misc]

DAILY_LIMIT = 20


class Store:
    """Stands in for the bot's own database."""

    def __init__(self) -> None:
        self.users: Dict[int, dict] = {}
        self.answers: Dict[str, str] = {}


class Session:
    """One update's view of the Store. Counts its queries so the bot can
    report `db_queries` per message (the number its scalability analysis
    was about); one per update, because aiogram handles updates concurrently."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.queries = 0

    def user(self, user_id: int) -> dict | None:
        self.queries += 1
        return self.store.users.get(user_id)

    def add_user(self, user_id: int) -> dict:
        self.queries += 1
        return self.store.users.setdefault(user_id, {"consent": None, "day": "", "today": 0})

    def count_message(self, user: dict) -> int:
        self.queries += 1
        day = time.strftime("%Y-%m-%d", time.gmtime())
        if user["day"] != day:
            user["day"], user["today"] = day, 0
        user["today"] += 1
        return user["today"]

    def cached_answer(self, prompt: str) -> str | None:
        self.queries += 1
        return self.store.answers.get(prompt)

    def save_answer(self, prompt: str, text: str) -> None:
        self.queries += 1
        self.store.answers[prompt] = text


class MetricsMiddleware(BaseMiddleware):
    """Outer middleware for messages and callback queries: hands `metrics`
    and a fresh `db` session to the handlers, counts every incoming message
    with the database queries it cost, and counts handler crashes."""

    def __init__(self, metrics: BotMetrics, store: Store) -> None:
        self.metrics = metrics
        self.store = store

    async def __call__(self, handler: Callable[..., Awaitable[Any]], event: Any, data: Dict[str, Any]) -> Any:
        db = Session(self.store)
        data["metrics"] = self.metrics
        data["db"] = db
        try:
            return await handler(event, data)
        except Exception as e:
            # A short, bounded kind: the exception class, never its message.
            self.metrics.error(type(e).__name__, user_id=event.from_user.id)
            raise
        finally:
            if getattr(event, "text", None) is not None or getattr(event, "voice", None) is not None:
                # Counted after the handler so that db_queries is known; track()
                # stamps the time, which is all the ordering the metrics need.
                self.metrics.message(event.from_user.id, "user", db_queries=db.queries,
                                     chat_type=event.chat.type)


async def answer(message: Any, metrics: BotMetrics, text: str, **kwargs: Any) -> None:
    """Every reply goes through here, so assistant messages are counted once."""
    await message.answer(text, **kwargs)
    metrics.message(message.from_user.id, "assistant", chat_type=message.chat.type)


def ensure_user(uid: int, metrics: BotMetrics, db: Session) -> dict:
    """The user's record, created (and counted as a registration) the first
    time the bot sees them, whatever they sent first."""
    user = db.user(uid)
    if user is None:
        user = db.add_user(uid)
        metrics.user_registered(uid)
    return user


async def on_start(message: Any, metrics: BotMetrics, db: Session) -> None:
    ensure_user(message.from_user.id, metrics, db)
    await answer(message, metrics, "Hi! May I store your messages to answer you better?",
                 reply_markup=consent_keyboard())


async def on_consent(callback: Any, metrics: BotMetrics, db: Session) -> None:
    """Callback of the consent buttons ("consent:yes" / "consent:no")."""
    uid = callback.from_user.id
    granted = callback.data == "consent:yes"
    ensure_user(uid, metrics, db)["consent"] = granted
    metrics.consent(uid, granted)
    await callback.answer("Thanks!" if granted else "OK, I won't store anything.")


async def on_metrics(message: Any, metrics: BotMetrics) -> None:
    """/metrics: botmetrics renders the summary (cached 30 s server-side),
    so this costs the bot one HTTP call and no database query."""
    await answer(message, metrics, await metrics.summary_text())


async def on_voice(message: Any, metrics: BotMetrics) -> None:
    metrics.custom("voice_message", user_id=message.from_user.id)
    await answer(message, metrics, "I can't listen to voice messages yet.")


async def on_text(message: Any, metrics: BotMetrics, db: Session,
                  llm: Callable[[str], Awaitable[tuple]] | None = None) -> None:
    uid = message.from_user.id
    user = ensure_user(uid, metrics, db)
    if db.count_message(user) > DAILY_LIMIT:
        metrics.limit_reached(uid)
        await answer(message, metrics, f"You've reached today's limit of {DAILY_LIMIT} messages.")
        return
    reply = await ask_llm(message.text, uid, metrics, db, llm or fake_llm)
    await answer(message, metrics, reply)


async def ask_llm(prompt: str, uid: int, metrics: BotMetrics, db: Session,
                  llm: Callable[[str], Awaitable[tuple]]) -> str:
    cached = db.cached_answer(prompt)
    metrics.cache(cached is not None, cache="llm_answer", user_id=uid)
    if cached is not None:
        return cached
    # measure_response sends a `response` event when the block ends:
    # success, timeout on TimeoutError, error on any other exception.
    with metrics.measure_response(uid, model="gpt-4o-mini") as call:
        text, prompt_tokens, completion_tokens = await asyncio.wait_for(llm(prompt), timeout=60)
        call.tokens = (prompt_tokens, completion_tokens)
    db.save_answer(prompt, text)
    return text


async def fake_llm(prompt: str) -> tuple:
    """Replace with your LLM client; returns (text, prompt_tokens, completion_tokens)."""
    await asyncio.sleep(0.01)
    return f"You said: {prompt}", len(prompt.split()) + 20, 12


def consent_keyboard() -> Any:
    if Router is None:
        return None
    return InlineKeyboardMarkup(inline_keyboard=[[
        InlineKeyboardButton(text="Yes", callback_data="consent:yes"),
        InlineKeyboardButton(text="No", callback_data="consent:no"),
    ]])


def build_router() -> Any:
    router = Router()
    router.message.register(on_start, CommandStart())
    router.message.register(on_metrics, Command("metrics"))
    router.message.register(on_voice, F.voice)
    router.message.register(on_text, F.text)
    router.callback_query.register(on_consent, F.data.startswith("consent:"))
    return router


async def main() -> None:
    if Router is None:
        raise SystemExit("this example needs aiogram: pip install aiogram")
    metrics = BotMetrics(os.environ.get("BOTMETRICS_URL", "http://127.0.0.1:9464"),
                         os.environ["BOTMETRICS_TOKEN"])
    middleware = MetricsMiddleware(metrics, Store())
    bot = Bot(os.environ["BOT_TOKEN"])
    dp = Dispatcher()
    dp.message.outer_middleware(middleware)
    dp.callback_query.outer_middleware(middleware)
    dp.include_router(build_router())
    try:
        await dp.start_polling(bot)
    finally:
        # Send what is still queued before the process exits.
        await metrics.close()


if __name__ == "__main__":
    asyncio.run(main())
