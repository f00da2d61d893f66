"""Spend and answer quality through both clients against the real server:
response() with cached / cache-write / reasoning tokens, time to first
token, provider and a reported cost; feedback() with thumbs and 1-5
ratings. Exact counts, costs computed by hand from prices.toml."""

from __future__ import annotations

import asyncio
import logging
import time
import unittest

from botmetrics import BotMetrics, SyncBotMetrics
from helpers import BOT, TOKEN, Server

logging.getLogger("botmetrics").setLevel(logging.ERROR)

# prices.toml, USD per million tokens, as integer billionths of a dollar per
# token (what the server counts in): gpt-4o-mini input 0.15, cached 0.075,
# output 0.60; o4-mini input 1.10, output 4.40 (reasoning billed as output).
NANO = 1e9


class SpendTest(unittest.TestCase):
    def setUp(self) -> None:
        self.server = Server.for_test(self)

    def test_new_response_fields_and_feedback(self) -> None:
        m = SyncBotMetrics(self.server.url, TOKEN, flush_interval=0.05)
        # 600 plain prompt tokens, 400 cached, 200 out:
        # 600 * 150 + 400 * 75 + 200 * 600 = 240,000 nano-dollars.
        m.response(1, "success", 2000.0, model="gpt-4o-mini", tokens=(1000, 200), cached_tokens=400,
                   ttft_ms=350.0, provider="openai")
        # 100 in, 50 out + 300 reasoning: 100 * 1,100 + 350 * 4,400 = 1,650,000.
        m.response(2, "success", 9000.0, model="o4-mini", tokens={"prompt": 100, "completion": 50},
                   reasoning_tokens=300, ttft_ms=4000.0)
        # Reported: the table is not asked.
        m.response(3, "success", 1500.0, model="claude-sonnet-4", tokens=(2000, 100), cached_tokens=500,
                   cache_write_tokens=1000, cost=0.0123, provider="anthropic")
        # A model the table does not know: unpriced, never free.
        m.response(1, "success", 800.0, model="my-local-llm", tokens=(10, 5))
        # Refused by the server, each alone, nothing of them counted:
        m.response(1, "success", 100.0, model="gpt-4o-mini", tokens=(10, 5), cached_tokens=11)
        m.response(1, "success", 100.0, model="gpt-4o-mini", ttft_ms=101.0)
        m.response(1, "success", 100.0, model="gpt-4o-mini", cost=-0.5)
        m.response(1, "success", 100.0, model="gpt-4o-mini", provider="not a name")
        m.feedback(1, 1)
        m.feedback(2, -1, reason="wrong")
        m.feedback(3, 5, scale=5)
        m.feedback(3, 3, scale=5)
        m.feedback(1, 0)              # refused: thumbs are -1 or 1
        m.feedback(1, 6, scale=5)     # refused
        self.assertTrue(m.flush(timeout=10))
        self.assertEqual(m.rejected, 6)
        self.assertFalse(m.close(timeout=10))  # not everything was delivered: 6 refused

        v = self.server.value
        self.assertEqual(v("bot_llm_cost_total", bot=BOT, model="gpt-4o-mini", source="table"), 240_000 / NANO)
        self.assertEqual(v("bot_llm_cost_total", bot=BOT, model="o4-mini", source="table"), 1_650_000 / NANO)
        self.assertEqual(v("bot_llm_cost_total", bot=BOT, model="claude-sonnet-4", source="reported"), 0.0123)
        self.assertEqual(v("bot_llm_cost_total", bot=BOT, model="claude-sonnet-4", source="table"), 0)
        self.assertEqual(v("bot_llm_cost_total", bot=BOT, model="my-local-llm", source="table"), 0)
        self.assertEqual(v("bot_llm_unpriced_tokens_total", bot=BOT, model="my-local-llm"), 15)
        tokens = {(model, kind): v("bot_llm_tokens_total", bot=BOT, model=model, kind=kind)
                  for model in ("gpt-4o-mini", "o4-mini", "claude-sonnet-4")
                  for kind in ("prompt", "completion", "cached", "cache_write", "reasoning")}
        self.assertEqual({k: n for k, n in tokens.items() if n}, {
            ("gpt-4o-mini", "prompt"): 1000, ("gpt-4o-mini", "completion"): 200, ("gpt-4o-mini", "cached"): 400,
            ("o4-mini", "prompt"): 100, ("o4-mini", "completion"): 50, ("o4-mini", "reasoning"): 300,
            ("claude-sonnet-4", "prompt"): 2000, ("claude-sonnet-4", "completion"): 100,
            ("claude-sonnet-4", "cached"): 500, ("claude-sonnet-4", "cache_write"): 1000,
        })
        # Time to first token: 0.35 s and 4 s.
        self.assertEqual(v("bot_llm_ttft_seconds_count", bot=BOT), 2)
        self.assertEqual(v("bot_llm_ttft_seconds_sum", bot=BOT), 4.35)
        self.assertEqual(v("bot_llm_ttft_seconds_bucket", bot=BOT, le="0.5"), 1)
        self.assertEqual(v("bot_llm_ttft_seconds_bucket", bot=BOT, le="+Inf"), 2)
        self.assertEqual(v("bot_responses_total", bot=BOT, status="success"), 4)
        for score, n in (("+1", 1), ("-1", 1), ("5", 1), ("3", 1), ("1", 0), ("4", 0)):
            self.assertEqual(v("bot_feedback_total", bot=BOT, score=score), n, score)

        summary = m.summary()
        spend = summary["spend"]
        self.assertEqual(spend["currency"], "USD")
        self.assertFalse(spend["complete"])  # my-local-llm is unpriced
        self.assertEqual(spend["unpriced_tokens"], 15)
        self.assertAlmostEqual(spend["total"], 0.00024 + 0.00165 + 0.0123, places=9)
        self.assertEqual({b["model"] for b in spend["by_model"]} >= {"claude-sonnet-4", "o4-mini"}, True)
        self.assertEqual(summary["feedback"]["rated_total"], 4)
        self.assertEqual(summary["feedback"]["satisfaction_total"], 0.5)  # +1 and 5 of 4

    def test_response_timer_and_the_async_client(self) -> None:
        """measure_response: first_token() gives ttft_ms, .cost a reported
        cost, .tokens a mapping with cached tokens; asyncio client."""
        async def go() -> BotMetrics:
            m = BotMetrics(self.server.url, TOKEN, flush_interval=0.05)
            async with m.measure_response(5, model="gpt-4o", provider="openai") as call:
                await asyncio.sleep(0.06)
                call.first_token()
                await asyncio.sleep(0.02)
                call.first_token()  # only the first counts
                call.tokens = {"prompt": 1000, "completion": 100, "cached": 1000}
            with m.measure_response(5, model="gpt-4o") as call:
                time.sleep(0.01)
                call.tokens = (10, 10)
                call.cost = 0.5
            m.feedback(5, -1)
            self.assertTrue(await m.close(timeout=10))
            return m

        m = asyncio.run(go())
        self.assertEqual(m.rejected, 0)
        v = self.server.value
        # 1000 cached at 1.25, 100 out at 10.00: 1,250,000 + 1,000,000.
        self.assertEqual(v("bot_llm_cost_total", bot=BOT, model="gpt-4o", source="table"), 2_250_000 / NANO)
        self.assertEqual(v("bot_llm_cost_total", bot=BOT, model="gpt-4o", source="reported"), 0.5)
        self.assertEqual(v("bot_llm_ttft_seconds_count", bot=BOT), 1)
        # The first call, at least 60 ms after the block began, and before its end.
        ttft = v("bot_llm_ttft_seconds_sum", bot=BOT)
        self.assertGreaterEqual(ttft, 0.06)
        self.assertLess(ttft, v("bot_response_duration_seconds_sum", bot=BOT))
        self.assertEqual(v("bot_llm_ttft_seconds_bucket", bot=BOT, le="0.05"), 0)
        self.assertEqual(v("bot_feedback_total", bot=BOT, score="-1"), 1)


if __name__ == "__main__":
    unittest.main()
