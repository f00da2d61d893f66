#!/usr/bin/env python3
"""Play a realistic day of an AI-assistant chat bot against botmetrics.

    python -m botmetrics.simulate --url http://127.0.0.1:9464 --token change-me \\
        --users 500 --speed 720 --duration 120

``--speed 720`` plays a simulated day in two real minutes. Users arrive with
the rhythm of a day (quiet at night, busy at lunch and in the evening), some
heavy users run into the daily limit, new users register and answer the
consent question, the LLM is sometimes slow, times out, is rate limited or
fails, two caches hit and miss, and a few custom events happen. Spend and
answer quality too: a few models the server's default price table knows
(prices.toml), half the calls with part of their prompt served from the
provider's cache, reasoning tokens on the reasoning model, a cost the
provider reported on some calls (the rest priced by the server), most
answers streamed (time to first token), and about 8 % of the answers rated
by their user (thumbs, mostly up; a "why" on some thumbs down). Everything
goes through the Python client, as a real bot would send it.

Event times are real time (the client stamps them): only the rhythm of the
day is accelerated, so dashboards show it against the wall clock.
Exit status 1 when events were refused or could not be delivered.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import math
import os
import random
import sys
from typing import Any, Callable, cast

from botmetrics import BotMetrics

DAY = 86400.0
# Relative activity per hour of the day: a night trough, a lunch bump and an
# evening peak, as in a consumer chat bot's traffic.
HOURLY = [2, 1, 1, 1, 1, 2, 4, 7, 9, 10, 10, 11, 13, 12, 10, 10, 11, 12, 14, 16, 17, 15, 10, 5]
# (model, provider, share of calls): models of the default price table.
MODELS = [("gpt-4o-mini", "openai", 0.55), ("gpt-4.1-mini", "openai", 0.15), ("gpt-4o", "openai", 0.12),
          ("claude-3-5-haiku", "anthropic", 0.10), ("o4-mini", "openai", 0.05),
          ("gemini-2.5-flash", "google", 0.03)]
# USD per million tokens (input, cached input, cache write, output), as in
# prices.toml: what a provider reports as the cost of a call that says it.
PRICES = {"gpt-4o-mini": (0.15, 0.075, 0.15, 0.60), "gpt-4.1-mini": (0.40, 0.10, 0.40, 1.60),
          "gpt-4o": (2.50, 1.25, 2.50, 10.00), "claude-3-5-haiku": (0.80, 0.08, 1.00, 4.00),
          "o4-mini": (1.10, 0.275, 1.10, 4.40), "gemini-2.5-flash": (0.30, 0.075, 0.30, 2.50)}
# None: the custom events "feedback_like" / "feedback_dislike" this
# simulator sent before `feedback` events existed. Their draws are kept, so
# that a seed plays the same traffic as before.
CUSTOM = [("voice_message", 0.05), ("image_generated", 0.03), (None, 0.04), (None, 0.01),
          ("subscription_purchased", 0.002)]
RATED = 0.08               # share of successful answers their user rates
SATISFIED = 0.82           # share of thumbs up among the ratings
REASONS = [("wrong", 0.4), ("too_long", 0.2), ("not_helpful", 0.3), ("slow", 0.1)]


class User:
    __slots__ = ("id", "activity", "registered", "consented", "today", "day")

    def __init__(self, uid: int, activity: float) -> None:
        self.id = uid
        self.activity = activity  # relative chance of starting a session
        self.registered = False
        self.consented = False
        self.today = 0            # messages sent on the simulated day `day`
        self.day = 0


class Simulation:
    def __init__(self, rng: random.Random, users: int, daily_limit: int,
                 sessions_per_user: float, failure_rate: float) -> None:
        self.rng = rng
        # Activity is heavy-tailed: most users drop by, a few chat all day
        # and are the ones who reach the daily limit.
        self.users = [User(10_000_000 + i, rng.lognormvariate(0, 1.2)) for i in range(users)]
        self.cum_weights = list(itertools.accumulate(u.activity for u in self.users))
        self.daily_limit = daily_limit
        self.sessions_per_day = users * sessions_per_user
        self.failure_rate = failure_rate
        # Spend and ratings draw from a generator of their own, seeded from
        # this one without advancing it: a seed plays the same traffic
        # (sessions, messages, limit hits) as before they were simulated.
        self.extra = random.Random(repr(rng.getstate()))
        self.stats = {"sessions": 0, "messages": 0, "limit_reached": 0, "registered": 0}

    def sessions_between(self, t0: float, t1: float) -> int:
        """Sessions starting in simulated seconds [t0, t1): Poisson with the
        hour's share of the day's sessions."""
        hour = int(t0 % DAY // 3600)
        rate = self.sessions_per_day * HOURLY[hour] / sum(HOURLY) / 3600
        return poisson(self.rng, rate * (t1 - t0))

    def session(self, m: BotMetrics, sim_time: float) -> None:
        rng = self.rng
        user = rng.choices(self.users, cum_weights=self.cum_weights)[0]
        day = int(sim_time // DAY)
        if user.day != day:
            user.day, user.today = day, 0
        self.stats["sessions"] += 1
        chat_type = "private" if rng.random() < 0.9 else "group"

        if not user.registered:
            # /start: the first message registers the user and asks for consent.
            user.registered = True
            self.stats["registered"] += 1
            m.user_registered(user.id)
            self.stats["messages"] += 1  # /start is a user message too
            m.message(user.id, "user", db_queries=rng.randint(8, 14), chat_type=chat_type)
            user.consented = rng.random() < 0.85
            m.consent(user.id, user.consented)
            m.message(user.id, "assistant", db_queries=2, chat_type=chat_type)
        if not user.consented:
            return  # the bot answers nobody who declined

        for _ in range(1 + geometric(rng, 0.4)):
            self.stats["messages"] += 1
            user.today += 1
            m.message(user.id, "user", db_queries=rng.randint(3, 9), chat_type=chat_type)
            if user.today > self.daily_limit:
                self.stats["limit_reached"] += 1
                m.limit_reached(user.id)
                m.message(user.id, "assistant", db_queries=1, chat_type=chat_type)
                return  # the user gives up until tomorrow
            m.cache(rng.random() < 0.8, cache="user_context", user_id=user.id)
            llm_cached = rng.random() < 0.25
            m.cache(llm_cached, cache="llm_answer", user_id=user.id)
            if not llm_cached:
                self.llm_call(m, user, chat_type)
            else:
                m.message(user.id, "assistant", db_queries=1, chat_type=chat_type)
            for name, p in CUSTOM:
                if rng.random() < p and name is not None:
                    m.custom(name, user_id=user.id)
            if rng.random() < 0.005:
                m.error("telegram_api", user_id=user.id)

    def llm_call(self, m: BotMetrics, user: User, chat_type: str) -> None:
        rng = self.rng
        model, provider, _ = rng.choices(MODELS, [w for _, _, w in MODELS])[0]
        prompt = rng.randint(300, 2500)
        # Latency is log-normal around 1.8 s (p95 about 4 s), with a slow
        # tail of 2 % at 5-15 s: visible on the p99, not enough for an alert.
        duration = rng.lognormvariate(math.log(1800), 0.5)
        if rng.random() < 0.02:
            duration *= rng.uniform(3, 8)
        r = rng.random()
        f = self.failure_rate
        if r < f * 0.4:
            m.response(user.id, "timeout", 30000.0, model=model, tokens=(prompt, 0))
            m.error("llm_timeout", user_id=user.id)
        elif r < f * 0.7:
            m.response(user.id, "error", duration / 4, model=model, tokens=(prompt, 0))
            m.error("llm_api", user_id=user.id)
        elif r < f:
            m.response(user.id, "rate_limited", rng.uniform(50, 300), model=model)
        else:
            completion = rng.randint(40, 700)
            x = self.extra
            # Half the calls repeat a system prompt and history the provider
            # has cached; Anthropic's callers write it to the cache first.
            cached = int(prompt * x.uniform(0.3, 0.9)) if x.random() < 0.5 else 0
            cache_write = (int((prompt - cached) * x.uniform(0.2, 0.6))
                           if provider == "anthropic" and x.random() < 0.3 else 0)
            reasoning = x.randint(100, 2000) if model == "o4-mini" else 0
            # Most answers are streamed: the first token after a log-normal
            # wait around 450 ms, the rest of the answer after it.
            ttft = min(duration, x.lognormvariate(math.log(450), 0.6)) if x.random() < 0.7 else None
            # A tenth of the calls go through a gateway that reports their
            # cost (at list price); the server prices the others.
            cost = None
            if x.random() < 0.1:
                p_in, p_cached, p_write, p_out = PRICES[model]
                cost = round(((prompt - cached - cache_write) * p_in + cached * p_cached
                              + cache_write * p_write + (completion + reasoning) * p_out) / 1e6, 9)
            m.response(user.id, "success", duration, model=model, tokens=(prompt, completion),
                       chat_type=chat_type, cached_tokens=cached or None,
                       cache_write_tokens=cache_write or None, reasoning_tokens=reasoning or None,
                       ttft_ms=ttft, provider=provider, cost=cost)
            m.message(user.id, "assistant", db_queries=rng.randint(1, 3), chat_type=chat_type)
            if x.random() < RATED:
                if x.random() < SATISFIED:
                    m.feedback(user.id, 1)
                else:
                    reason = x.choices([r for r, _ in REASONS], [w for _, w in REASONS])[0]
                    m.feedback(user.id, -1, reason=reason if x.random() < 0.5 else None)


class Counted:
    """Passes every event helper call through to the client, counting the
    events by type (each helper sends one event of its own name) and
    messages by role, for --counts."""

    def __init__(self, m: BotMetrics) -> None:
        self.m = m
        self.counts: collections.Counter[str] = collections.Counter()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.m, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.counts[name] += 1
            if name == "message":
                role = kwargs.get("role", args[1] if len(args) > 1 else "user")
                self.counts["message:" + role] += 1
            return method(*args, **kwargs)
        return counted


def poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 30:  # normal approximation: Knuth's loop is slow for large means
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def geometric(rng: random.Random, p_continue: float) -> int:
    n = 0
    while rng.random() < p_continue:
        n += 1
    return n


async def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    sim = Simulation(rng, args.users, args.daily_limit, args.sessions_per_user, args.failure_rate)
    loop = asyncio.get_running_loop()
    start = args.start_hour * 3600.0
    async with BotMetrics(args.url, args.token, batch_size=args.batch_size, flush_interval=0.5) as m:
        counted = Counted(m)
        t0 = loop.time()
        last_sim = start
        next_report = 0.0
        while (elapsed := loop.time() - t0) < args.duration:
            now_sim = start + elapsed * args.speed
            for _ in range(sim.sessions_between(last_sim, now_sim)):
                # Counted passes every call through: the client, as far as session() can tell.
                sim.session(cast(BotMetrics, counted), now_sim)
            last_sim = now_sim
            if elapsed >= next_report and not args.quiet:
                h, rem = divmod(int(now_sim % DAY), 3600)
                print(f"[{elapsed:5.1f}s] day {int(now_sim // DAY) + 1} {h:02d}:{rem // 60:02d}  "
                      f"sessions={sim.stats['sessions']} sent={m.sent} pending={m.pending} "
                      f"dropped={m.dropped} retries={m.retries}", flush=True)
                next_report += 5.0
            await asyncio.sleep(0.1)
        tracked = m.sent + m.pending
        await m.close(timeout=15.0)
        # The figures of --counts (what was tracked, message:user included),
        # so that this line and the file never disagree.
        c = counted.counts
        print(f"done: {sim.stats['sessions']} sessions, {c['message:user']} user messages "
              f"(/start included), {c['message:assistant']} assistant messages, "
              f"{c['user_registered']} new users, {c['limit_reached']} limit hits; "
              f"events sent={m.sent} duplicates={m.duplicates} rejected={m.rejected} "
              f"dropped={m.dropped} unsent={m.pending} (of {tracked})", flush=True)
        if args.counts:
            with open(args.counts, "w") as f:
                json.dump({"tracked": dict(counted.counts), "sent": m.sent, "duplicates": m.duplicates,
                           "rejected": m.rejected, "dropped": m.dropped, "unsent": m.pending}, f)
        return 1 if (m.rejected or m.pending or m.dropped) else 0


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m botmetrics.simulate",
                                description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--url", default=os.environ.get("BOTMETRICS_URL", "http://127.0.0.1:9464"))
    p.add_argument("--token", default=os.environ.get("BOTMETRICS_TOKEN"),
                   help="the bot's ingestion token (or $BOTMETRICS_TOKEN)")
    p.add_argument("--users", type=int, default=500, help="user population (default 500)")
    p.add_argument("--speed", type=float, default=720.0,
                   help="simulated seconds per real second (720: a day in 2 minutes)")
    p.add_argument("--duration", type=float, default=120.0, help="real seconds to run")
    p.add_argument("--start-hour", type=float, default=8.0, help="simulated hour of day to start at")
    p.add_argument("--sessions-per-user", type=float, default=3.0, help="mean sessions per user per day")
    p.add_argument("--daily-limit", type=int, default=20, help="user messages per day before limit_reached")
    p.add_argument("--failure-rate", type=float, default=0.06,
                   help="share of LLM calls that time out, fail or are rate limited (default 0.06)")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--seed", type=int, default=None, help="random seed, for a repeatable day")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--counts", metavar="FILE",
                   help="write the exact counts as JSON at the end: events tracked by type and "
                        "messages by role (\"message:user\"), sent, duplicates, rejected, dropped, unsent")
    args = p.parse_args()
    if not args.token:
        p.error("--token or $BOTMETRICS_TOKEN is required")
    if not 0 <= args.failure_rate <= 1:
        p.error("--failure-rate must be between 0 and 1")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
