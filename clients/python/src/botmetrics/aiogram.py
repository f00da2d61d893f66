"""aiogram 3 wiring: one line counts a bot's traffic.

    from botmetrics import BotMetrics
    from botmetrics.aiogram import BotMetricsMiddleware, metrics_router

    metrics = BotMetrics("http://127.0.0.1:9464", token="change-me")
    dp.update.outer_middleware(BotMetricsMiddleware(metrics))
    dp.include_router(metrics_router(metrics, admin_ids={123456789}))   # optional: /metrics
    dp.include_router(feedback_router(metrics))                         # optional: 👍/👎 buttons

    await message.answer(text, reply_markup=feedback_keyboard())        # under an answer

The middleware counts every incoming message with its user (``message``,
role ``user``: active users and "today" come from these), every exception a
handler raises (``error``, its class name as ``kind``; the exception goes on
to aiogram's error handlers unchanged) and, through a request middleware it
adds to each bot's session the first time that bot delivers an update, every
message the bot sends (``message``, role ``assistant``). Messages sent
before the first update (a start-up notice) are counted too after
``middleware.attach(bot)``.

It also hands ``metrics`` to handlers that ask for it, for the events only
the bot knows: LLM responses, cache lookups, registrations, consent, limits.

``feedback_keyboard()`` is the thumbs up / down (or 1-5) buttons to put
under an answer; ``feedback_router(metrics)`` records a press as a
``feedback`` event, answers the callback query (Telegram stops the button's
spinner and shows a short "thanks") and removes the buttons, so an answer is
rated once. An admin's ``/metrics`` (``metrics_router``) and its reply are
not counted: looking at the figures does not change them.

Needs aiogram 3 (``pip install aiogram``); the rest of botmetrics does not.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any, Awaitable, Callable, Collection, Dict, Optional, Tuple, Union

from aiogram import BaseMiddleware, Bot, F, Router
from aiogram.client.session.middlewares.base import BaseRequestMiddleware, NextRequestMiddlewareType
from aiogram.filters import Command
from aiogram.methods import Response, TelegramMethod
from aiogram.methods.base import TelegramType
from aiogram.types import (CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup, Message,
                           TelegramObject, Update)

from ._async import BotMetrics
from ._core import BotMetricsError

__all__ = ["BotMetricsMiddleware", "OutgoingMessages", "metrics_router", "feedback_keyboard",
           "feedback_router", "FEEDBACK_PREFIX", "SENDING_METHODS"]

log = logging.getLogger("botmetrics")

# Bot API methods that put a message in a chat: each successful call is one
# assistant message. (Chat actions, drafts, edits and deletions are not.)
SENDING_METHODS = frozenset({
    "SendMessage", "SendPhoto", "SendAudio", "SendDocument", "SendVideo", "SendAnimation",
    "SendVoice", "SendVideoNote", "SendSticker", "SendLocation", "SendVenue", "SendContact",
    "SendPoll", "SendDice", "SendGame", "SendInvoice", "SendMediaGroup", "SendPaidMedia",
    "SendChecklist", "SendLivePhoto", "SendRichMessage", "CopyMessage", "ForwardMessage",
})

_CHAT_TYPES = frozenset({"private", "group", "supergroup", "channel"})

DbQueries = Callable[[Dict[str, Any]], Optional[int]]


class _UpdateMark:
    """What the handlers of the update being handled said about counting it."""

    __slots__ = ("uncounted",)

    def __init__(self) -> None:
        self.uncounted = False


# The update BotMetricsMiddleware is handling, for metrics_router to mark
# an admin's /metrics as not counted (neither it nor the reply). A mutable
# mark rather than a flag, so a handler run in a copied context marks it too.
_current_update: "contextvars.ContextVar[Optional[_UpdateMark]]" = contextvars.ContextVar(
    "botmetrics_update", default=None)


def _leave_uncounted() -> None:
    mark = _current_update.get()
    if mark is not None:
        mark.uncounted = True


class OutgoingMessages(BaseRequestMiddleware):
    """Request middleware for a bot's session: counts each message the bot
    sent (after Telegram accepted it) as ``message`` with role ``assistant``.
    In a private chat the chat id is the user's id, so the user is known;
    in groups and channels the event carries no user."""

    def __init__(self, metrics: BotMetrics) -> None:
        self.metrics = metrics

    async def __call__(
        self,
        make_request: NextRequestMiddlewareType[TelegramType],
        bot: Bot,
        method: TelegramMethod[TelegramType],
    ) -> Response[TelegramType]:
        result = await make_request(bot, method)
        mark = _current_update.get()
        if mark is not None and mark.uncounted:
            return result  # the reply to an admin's /metrics
        if type(method).__name__ in SENDING_METHODS:
            chat_id = getattr(method, "chat_id", None)
            if isinstance(chat_id, int) and chat_id > 0:
                self.metrics.message(chat_id, "assistant", chat_type="private")
            else:
                self.metrics.message(None, "assistant")
        return result


class BotMetricsMiddleware(BaseMiddleware):
    """Outer middleware for ``dp.update``; see the module's documentation.

    ``db_queries``: a function of the update's middleware data returning how
    many database queries handling the update took, read after the handler
    (for a ``db`` session object put in the data by a middleware registered
    before this one, ``lambda data: data["db"].queries``).
    ``count_outgoing=False`` leaves the bots' sessions alone.
    """

    def __init__(self, metrics: BotMetrics, *, db_queries: Optional[DbQueries] = None,
                 count_outgoing: bool = True) -> None:
        self.metrics = metrics
        self.db_queries = db_queries
        self.count_outgoing = count_outgoing
        self.outgoing = OutgoingMessages(metrics)

    def attach(self, bot: Bot) -> None:
        """Count the messages ``bot`` sends (idempotent). Done for each bot
        on its first update; call it to count messages sent before that."""
        session_middlewares = bot.session.middleware
        if self.outgoing not in session_middlewares:
            session_middlewares(self.outgoing)

    async def __call__(
        self,
        handler: Callable[[TelegramObject, Dict[str, Any]], Awaitable[Any]],
        event: TelegramObject,
        data: Dict[str, Any],
    ) -> Any:
        bot = data.get("bot")
        if self.count_outgoing and isinstance(bot, Bot):
            self.attach(bot)
        data.setdefault("metrics", self.metrics)
        # UserContextMiddleware, which aiogram's Dispatcher registers before
        # any of ours, has resolved the update's user.
        user = data.get("event_from_user")
        user_id = user.id if user is not None else None
        message = _incoming_message(event)
        mark = _UpdateMark()
        reset = _current_update.set(mark)
        try:
            return await handler(event, data)
        except Exception as e:
            # The class name is short and bounded; the message could carry
            # user data and would make a label per distinct text.
            self.metrics.error(type(e).__name__, user_id=user_id)
            raise
        finally:
            _current_update.reset(reset)
            if message is not None and not mark.uncounted:
                queries = self._db_queries(data)
                chat_type = message.chat.type if message.chat.type in _CHAT_TYPES else None
                self.metrics.message(user_id, "user", db_queries=queries, chat_type=chat_type)

    def _db_queries(self, data: Dict[str, Any]) -> Optional[int]:
        if self.db_queries is None:
            return None
        try:
            return self.db_queries(data)
        except Exception:  # metrics must never break the bot
            log.exception("botmetrics: db_queries() failed")
            return None


def _incoming_message(event: TelegramObject) -> Optional[Message]:
    """The message a user sent, for updates that carry one."""
    if not isinstance(event, Update):
        return None
    # business_message: Bot API 7.2 (aiogram 3.5); absent before.
    message: Union[Message, None] = event.message or getattr(event, "business_message", None)
    return message


def metrics_router(metrics: BotMetrics, admin_ids: Collection[int], *, command: str = "metrics",
                   bot_name: Optional[str] = None) -> Router:
    """A router answering ``/metrics`` (or ``command``) from the users in
    ``admin_ids`` with the server's chat summary
    (``GET /v1/summary?format=text``). Anyone else's command falls through
    to the bot's other handlers. ``bot_name`` picks the bot on a server
    that serves several. An admin's command and its answer are not counted
    (neither as messages nor the admin as an active user): reading the
    figures does not change them."""
    admins = frozenset(admin_ids)
    router = Router(name="botmetrics")

    @router.message(Command(command), F.from_user.id.in_(admins))
    async def answer_metrics(message: Message) -> None:
        _leave_uncounted()
        try:
            text = await metrics.summary_text(bot_name)
        except (BotMetricsError, OSError) as e:
            log.warning("botmetrics: /%s could not read the summary: %s", command, e)
            text = "Metrics are not available right now."
        # The summary is plain text: no HTML or Markdown parsing.
        await message.answer(text, parse_mode=None)

    return router


FEEDBACK_PREFIX = "botmetrics:fb"
THUMBS = (("\N{THUMBS UP SIGN}", 1), ("\N{THUMBS DOWN SIGN}", -1))


def feedback_keyboard(*, scale: Optional[int] = None, prefix: str = FEEDBACK_PREFIX,
                      more: Optional[InlineKeyboardMarkup] = None) -> InlineKeyboardMarkup:
    """The buttons to put under an answer (``reply_markup=``): thumbs up and
    down, or with ``scale=5`` the ratings 1 to 5. A press is recorded by
    ``feedback_router`` (with the same ``prefix``). ``more``: the bot's own
    keyboard, whose rows come first."""
    if scale is None:
        row = [InlineKeyboardButton(text=label, callback_data=f"{prefix}:{score:+d}") for label, score in THUMBS]
    elif scale == 5:
        row = [InlineKeyboardButton(text=str(n), callback_data=f"{prefix}:5:{n}") for n in range(1, 6)]
    else:
        raise ValueError("scale must be None (thumbs) or 5 (a 1-5 rating)")
    rows = list(more.inline_keyboard) if more is not None else []
    return InlineKeyboardMarkup(inline_keyboard=[*rows, row])


def _parse_feedback(data: str, prefix: str) -> Optional[Tuple[int, Optional[int]]]:
    """(score, scale) from a button's callback data; None if it is not one."""
    parts = data[len(prefix) + 1:].split(":")
    if len(parts) == 1 and parts[0] in ("+1", "-1"):
        return int(parts[0]), None
    if len(parts) == 2 and parts[0] == "5" and parts[1] in ("1", "2", "3", "4", "5"):
        return int(parts[1]), 5
    return None


def feedback_router(metrics: BotMetrics, *, prefix: str = FEEDBACK_PREFIX,
                    thanks: Optional[str] = "Thanks for the feedback!",
                    remove_buttons: bool = True) -> Router:
    """A router recording presses of ``feedback_keyboard()``'s buttons as
    ``feedback`` events (the user who pressed, the score) and acknowledging
    each press (answering the callback query, with ``thanks`` as a short
    notice; None shows none). ``remove_buttons``: take the buttons off the
    answer once rated, so that each answer is rated once. Callback data
    with another prefix falls through to the bot's other handlers."""
    router = Router(name="botmetrics-feedback")

    @router.callback_query(F.data.startswith(prefix + ":"))
    async def record_feedback(query: CallbackQuery) -> None:
        rating = _parse_feedback(query.data or "", prefix)
        if rating is None:
            await query.answer()  # a stale or forged button: acknowledge, count nothing
            return
        score, scale = rating
        metrics.feedback(query.from_user.id, score, scale=scale)
        await query.answer(thanks)
        if remove_buttons and isinstance(query.message, Message):
            try:
                await query.message.edit_reply_markup(reply_markup=None)
            except Exception as e:  # too old to edit, already edited: the rating is counted
                log.debug("botmetrics: could not remove the feedback buttons: %s", e)

    return router
