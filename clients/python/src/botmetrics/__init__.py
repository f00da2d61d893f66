"""Count a chat bot's events in botmetrics without slowing the bot down.

    from botmetrics import BotMetrics           # asyncio bots (aiogram, ...)
    metrics = BotMetrics("http://127.0.0.1:9464", token="change-me")
    metrics.message(user_id, "user")            # never blocks, never raises on I/O
    ...
    await metrics.close()                       # on shutdown: send what is left

    from botmetrics import SyncBotMetrics       # threads: telebot, Flask, scripts
    metrics = SyncBotMetrics("http://127.0.0.1:9464", token="change-me")
    metrics.message(user_id, "user")
    metrics.close(timeout=5)

Standard library only. aiogram 3 wiring: ``botmetrics.aiogram``.
"""

from ._async import BotMetrics
from ._core import BotMetricsError, ResponseTimer, UserId, backoff_delays
from ._sync import SyncBotMetrics

__version__ = "0.2.0"

__all__ = ["BotMetrics", "SyncBotMetrics", "BotMetricsError", "ResponseTimer", "UserId",
           "backoff_delays", "__version__"]
