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

``--days N`` plays N days of history instead, up to now, as fast as the
server takes it (events carry an explicit ``ts``): a population of users
who come back as a bot's users do (``ReturnModel``: most once and never
again, some now and then, less and less, a core every day), in sessions of
a few messages seconds to a minute apart, more than one a day for some,
always more than 30 minutes (the server's default ``--session-gap``) apart,
so that the user book's new and returning users, retention cohorts and
sessions have plausible figures. ``--timezone`` should be the server's, so
that the simulated days are its calendar days.

Exit status 1 when events were refused or could not be delivered.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import datetime
import enum
import itertools
import json
import math
import os
import random
import re
import sys
import time
import zoneinfo
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, cast

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


# ------------------------------------------------------------------ --days
#
# History with return behaviour: who comes back, when, and in what sessions.

SESSION_GAP = 1800.0       # the server's default --session-gap: sessions are always further apart
TURN_GAP = (5.0, 120.0)    # seconds between a user's messages within a session (bounds)
MAX_TURNS = 12             # user messages in a session, the /start turn aside
# The longest a session can last (its /start turn included): sessions are
# placed at least this plus SESSION_GAP (and a minute) apart.
MAX_SESSION = MAX_TURNS * TURN_GAP[1]
# No session starts within 16 minutes of midnight or ends within 16 minutes
# of the next one: the last of a day and the first of the next are over 30
# minutes apart, and a session never spans two days.
EDGE = 960.0


class Kind(enum.Enum):
    """How a user comes back."""

    ONE_TIME = "one_time"      # one day, then never again
    OCCASIONAL = "occasional"  # now and then, less and less
    CORE = "core"              # (almost) every day


@dataclasses.dataclass(frozen=True)
class ReturnModel:
    """The return behaviour of a population (defaults: a consumer chat bot,
    D1 about 15 %, D7 about 10 %, D30 about 7 %).

    A user's first day is always active. On a later day, ``after`` days
    past the first, a one-time user is never active, an occasional user
    with the chance ``occasional_return * occasional_decay ** (after - 1)``
    and a core user with the chance ``core_daily``, each day drawn on its
    own. An active day holds 1 + Poisson(mean - 1) sessions.
    """

    one_time: float = 0.65
    occasional: float = 0.27
    core: float = 0.08
    occasional_return: float = 0.30
    occasional_decay: float = 0.85
    core_daily: float = 0.90
    one_time_sessions: float = 1.15
    occasional_sessions: float = 1.3
    core_sessions: float = 2.5

    def __post_init__(self) -> None:
        shares = (self.one_time, self.occasional, self.core)
        if min(shares) < 0 or abs(sum(shares) - 1.0) > 1e-9:
            raise ValueError(f"the shares of the kinds must be >= 0 and add up to 1, not {shares}")
        for name in ("occasional_return", "occasional_decay", "core_daily"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if min(self.one_time_sessions, self.occasional_sessions, self.core_sessions) < 1:
            raise ValueError("a mean of sessions per active day is at least 1")

    def share(self, kind: Kind) -> float:
        return {Kind.ONE_TIME: self.one_time, Kind.OCCASIONAL: self.occasional, Kind.CORE: self.core}[kind]

    def chance(self, kind: Kind, after: int) -> float:
        """The chance that a user of ``kind`` is active ``after`` days after
        their first day (1 on the first day itself)."""
        if after < 0:
            return 0.0
        if after == 0:
            return 1.0
        if kind is Kind.OCCASIONAL:
            return self.occasional_return * self.occasional_decay ** (after - 1)
        return self.core_daily if kind is Kind.CORE else 0.0

    def expected_return(self, after: int) -> float:
        """The expected share of a cohort active again on day +``after``
        (the classic D1, D7, D30 for 1, 7, 30)."""
        return sum(self.share(k) * self.chance(k, after) for k in Kind)

    def mean_sessions(self, kind: Kind) -> float:
        return {Kind.ONE_TIME: self.one_time_sessions, Kind.OCCASIONAL: self.occasional_sessions,
                Kind.CORE: self.core_sessions}[kind]


class Visitor(User):
    """A user of the history: how they come back and on which day they first came."""

    __slots__ = ("kind", "first_day")

    def __init__(self, uid: int, kind: Kind, first_day: int) -> None:
        super().__init__(uid, 1.0)
        self.kind = kind
        self.first_day = first_day


def quotas(total: int, weights: List[float]) -> List[int]:
    """``total`` split in proportion to ``weights``, exactly (largest
    remainders): the counts add up to ``total``."""
    whole = sum(weights)
    raw = [total * w / whole for w in weights]
    counts = [int(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


class Population:
    """``users`` users, first seen over ``days`` days (an equal share a day,
    the remainder on the first days), of each kind exactly its share of
    ``model`` (largest remainders), in a seeded random order."""

    def __init__(self, rng: random.Random, users: int, days: int, model: ReturnModel,
                 first_id: int = 20_000_000) -> None:
        if users < 0 or days < 1:
            raise ValueError("users must be >= 0 and days >= 1")
        self.rng, self.days, self.model = rng, days, model
        kinds = [k for k, n in zip(Kind, quotas(users, [model.share(k) for k in Kind])) for _ in range(n)]
        rng.shuffle(kinds)
        first_days = [d for d, n in enumerate(quotas(users, [1.0] * days)) for _ in range(n)]
        rng.shuffle(first_days)
        self.users = [Visitor(first_id + i, k, d) for i, (k, d) in enumerate(zip(kinds, first_days))]

    def active_on(self, day: int) -> List[Visitor]:
        """The users active on ``day`` (0 is the first), in id order: those
        whose first day it is, and those the model brings back. Draws one
        number per user seen before it: call it once per day, in order."""
        rng, chance = self.rng, self.model.chance
        return [u for u in self.users
                if u.first_day == day or (u.first_day < day and rng.random() < chance(u.kind, day - u.first_day))]

    def session_count(self, user: Visitor) -> int:
        """Sessions on one of ``user``'s active days: 1 + Poisson(mean - 1)."""
        return 1 + poisson(self.rng, self.model.mean_sessions(user.kind) - 1)


def session_starts(rng: random.Random, count: int, day_length: float = DAY) -> List[float]:
    """Up to ``count`` session starts in a day (seconds from midnight), with
    the rhythm of the day (HOURLY), each at least MAX_SESSION +
    SESSION_GAP + 60 s after the one before, all within EDGE of midnight:
    those that do not fit are left out."""
    latest = day_length - EDGE - MAX_SESSION
    starts = sorted(min(latest, max(EDGE, h * 3600 + rng.uniform(0, 3600)))
                    for h in rng.choices(range(24), HOURLY, k=count))
    spaced: List[float] = []
    for t in starts:
        if spaced:
            t = max(t, spaced[-1] + MAX_SESSION + SESSION_GAP + 60)
        if t > latest:
            break
        spaced.append(t)
    return spaced


def zone(name: str) -> datetime.tzinfo:
    """The time zone of an IANA name. UTC and the fixed offsets Etc/GMT-14
    to Etc/GMT+12 (Etc/GMT-3 is UTC+3) need no zone database, where
    zoneinfo would need the system's or the tzdata package."""
    if name in ("UTC", "Etc/UTC"):
        return datetime.timezone.utc
    try:
        return zoneinfo.ZoneInfo(name)
    except zoneinfo.ZoneInfoNotFoundError:
        fixed = re.fullmatch(r"Etc/GMT([+-])(\d{1,2})", name)
        if fixed and int(fixed.group(2)) <= (12 if fixed.group(1) == "+" else 14):
            hours = int(fixed.group(2)) * (-1 if fixed.group(1) == "+" else 1)
            return datetime.timezone(datetime.timedelta(hours=hours), name)
        raise


class Stamped:
    """Passes every event helper call through with ``ts`` set to ``self.ts``."""

    def __init__(self, m: Any) -> None:
        self.m = m
        self.ts = 0.0

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.m, name)

        def stamped(*args: Any, **kwargs: Any) -> Any:
            return method(*args, ts=self.ts, **kwargs)
        return stamped


@dataclasses.dataclass
class Played:
    """What the history sent, as the server's user book must count it: each
    user's active days (their first is the first one) and each session."""

    days: List[str] = dataclasses.field(default_factory=list)   # the calendar days, oldest first
    active: Dict[int, Set[int]] = dataclasses.field(default_factory=dict)
    # (start, last event, user messages) per session, unix seconds
    sessions: List[Tuple[float, float, int]] = dataclasses.field(default_factory=list)
    kinds: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    def cohorts(self) -> List[Dict[str, Any]]:
        """Per day: users first seen on it (``size``) and of them those
        active again on day +1, +7, +30 (``d1`` ... classic) and on or after
        it (``rolling``); None where that day is past the last one played."""
        last = len(self.days) - 1
        rows = []
        for day, date in enumerate(self.days):
            cohort = [a for a in self.active.values() if min(a) == day]

            def count(after: int, rolling: bool) -> Optional[int]:
                target = day + after
                if target > last:
                    return None
                return sum(1 for a in cohort if (max(a) >= target if rolling else target in a))
            rows.append({"day": date, "size": len(cohort),
                         **{f"d{n}": count(n, False) for n in (1, 7, 30)},
                         "rolling": {f"d{n}": count(n, True) for n in (1, 7, 30)}})
        return rows

    def report(self) -> Dict[str, Any]:
        last = len(self.days) - 1
        today = [a for a in self.active.values() if last in a]
        return {
            "days": self.days,
            "users": len(self.active),
            "kinds": dict(self.kinds),
            "new_today": sum(1 for a in today if min(a) == last),
            "returning_today": sum(1 for a in today if min(a) < last),
            "cohorts": self.cohorts(),
            "sessions": [[round(s, 3), round(e, 3), n] for s, e, n in self.sessions],
        }


class History:
    """Plays ``days`` calendar days (of ``tz``) up to ``now``, today the
    last: ``population``'s users on their active days, in sessions, each
    turn through ``sim`` (the caches, the LLM call, spend and ratings of a
    day's simulation) with its time as ``ts``. Nothing is sent after
    ``now``."""

    def __init__(self, sim: Simulation, population: Population, tz: datetime.tzinfo, now: float) -> None:
        self.sim, self.population, self.now = sim, population, now
        self.rng = population.rng
        today = datetime.datetime.fromtimestamp(now, tz).date()
        dates = [today - datetime.timedelta(days=population.days - 1 - d) for d in range(population.days + 1)]
        self.starts = [datetime.datetime.combine(d, datetime.time(), tz).timestamp() for d in dates]
        self.played = Played(days=[d.isoformat() for d in dates[:-1]])

    def day(self, day: int) -> List[Tuple[float, Visitor]]:
        """The sessions of ``day``: (start, user), by start."""
        length = self.starts[day + 1] - self.starts[day]
        sessions = [(self.starts[day] + t, u)
                    for u in self.population.active_on(day)
                    for t in session_starts(self.rng, self.population.session_count(u), length)]
        sessions.sort(key=lambda s: (s[0], s[1].id))
        return sessions

    def session(self, m: Stamped, user: Visitor, start: float, day: int) -> None:
        """One session from ``start``: a /start turn for a new user, then a
        few messages, each after the previous answer and a pause of seconds
        to a minute or two."""
        if start > self.now:
            return
        rng, sim = self.rng, self.sim
        b = cast(BotMetrics, m)
        if user.day != day:
            user.day, user.today = day, 0
        chat_type = "private" if rng.random() < 0.9 else "group"
        t, messages = start, 0
        m.ts = t
        if not user.registered:
            user.registered = True
            b.user_registered(user.id)
            b.message(user.id, "user", db_queries=rng.randint(8, 14), chat_type=chat_type)
            messages += 1
            user.consented = rng.random() < 0.85
            b.consent(user.id, user.consented)
            b.message(user.id, "assistant", db_queries=2, chat_type=chat_type)
            t += self.pause()
        # A handful of messages: 2 + geometric, 3.9 on average, at most MAX_TURNS.
        turns = 2 + min(MAX_TURNS - 2, geometric(rng, 0.65)) if user.consented else 1
        for _ in range(turns):
            if t > self.now:
                break
            m.ts = t
            messages += 1
            b.message(user.id, "user", db_queries=rng.randint(3, 9), chat_type=chat_type)
            if not user.consented:
                # The bot asks the consent question again and answers nothing else.
                b.message(user.id, "assistant", db_queries=1, chat_type=chat_type)
                break
            user.today += 1
            if user.today > sim.daily_limit:
                b.limit_reached(user.id)
                b.message(user.id, "assistant", db_queries=1, chat_type=chat_type)
                break  # the user gives up until tomorrow
            b.cache(rng.random() < 0.8, cache="user_context", user_id=user.id)
            llm_cached = rng.random() < 0.25
            b.cache(llm_cached, cache="llm_answer", user_id=user.id)
            if llm_cached:
                b.message(user.id, "assistant", db_queries=1, chat_type=chat_type)
            else:
                sim.llm_call(b, user, chat_type)
            for name, p in CUSTOM:
                if name is not None and rng.random() < p:
                    b.custom(name, user_id=user.id)
            t += self.pause()
        last = m.ts
        days = self.played.active.setdefault(user.id, set())
        if not days:
            self.played.kinds[user.kind.value] += 1
        days.add(day)
        self.played.sessions.append((start, last, messages))

    def pause(self) -> float:
        """Between a user's messages: reading the answer and typing, log-normal
        around 45 s, within TURN_GAP."""
        return min(TURN_GAP[1], max(TURN_GAP[0], self.rng.lognormvariate(math.log(45), 0.7)))


STALL = 30.0  # seconds --days waits for a server that takes no events


async def keep_up(m: BotMetrics, ahead: int) -> bool:
    """Waits while more than ``ahead`` events are pending; False when the
    server took none of them for STALL seconds."""
    loop = asyncio.get_running_loop()
    sent, since = m.sent, loop.time()
    while m.pending > ahead:
        if m.sent != sent:
            sent, since = m.sent, loop.time()
        elif loop.time() - since > STALL:
            return False
        await asyncio.sleep(0.005)
    return True


async def play_history(args: argparse.Namespace) -> int:
    """--days: the history, sent as fast as the server takes it."""
    rng = random.Random(args.seed)
    # users=0: the day's simulation lends its turns (LLM calls, spend,
    # ratings) and its limits; the population is the history's own.
    sim = Simulation(rng, 0, args.daily_limit, args.sessions_per_user, args.failure_rate)
    population = Population(rng, args.users, args.days, ReturnModel())
    history = History(sim, population, zone(args.timezone), time.time())
    async with BotMetrics(args.url, args.token, batch_size=args.batch_size, flush_interval=0.5) as m:
        counted = Counted(m)
        stamped = Stamped(counted)
        # The queue drops its oldest events when full: never run ahead of
        # the sender by more than a few batches.
        ahead = max(4 * args.batch_size, 1000)
        for day in range(args.days):
            stalled = False
            for start, user in history.day(day):
                history.session(stamped, user, start, day)
                if not await keep_up(m, ahead):
                    stalled = True
                    break
            if stalled:
                print(f"the server took no events for {STALL:.0f} s: stopped on day {day + 1}",
                      file=sys.stderr, flush=True)
                break
            if not args.quiet:
                print(f"day {day + 1}/{args.days} ({history.played.days[day]}): "
                      f"sessions={len(history.played.sessions)} sent={m.sent} pending={m.pending} "
                      f"dropped={m.dropped} retries={m.retries}", flush=True)
        tracked = m.sent + m.pending
        await m.close(timeout=30.0)
        c, played = counted.counts, history.played
        print(f"done: {args.days} days, {len(played.active)} users "
              f"({', '.join(f'{n} {k}' for k, n in sorted(played.kinds.items()))}), "
              f"{len(played.sessions)} sessions, {c['message:user']} user messages, "
              f"{c['message:assistant']} assistant messages, {c['user_registered']} new users, "
              f"{c['limit_reached']} limit hits; "
              f"events sent={m.sent} duplicates={m.duplicates} rejected={m.rejected} "
              f"dropped={m.dropped} unsent={m.pending} (of {tracked})", flush=True)
        if args.counts:
            with open(args.counts, "w") as f:
                json.dump({"tracked": dict(c), "sent": m.sent, "duplicates": m.duplicates,
                           "rejected": m.rejected, "dropped": m.dropped, "unsent": m.pending,
                           "history": played.report()}, f)
        return 1 if (m.rejected or m.pending or m.dropped) else 0


async def run(args: argparse.Namespace) -> int:
    if args.days:
        return await play_history(args)
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
                        "messages by role (\"message:user\"), sent, duplicates, rejected, dropped, unsent; "
                        "with --days also \"history\": the days, each cohort's size and returns, "
                        "new and returning users today and every session, as the server must count them")
    p.add_argument("--days", type=int, default=0, metavar="N",
                   help="play N days of history up to now instead (1-400), with explicit event times, "
                        "as fast as the server takes them: --users users first seen over those days "
                        "(an equal share a day) who come back as a bot's users do; "
                        "--speed, --duration, --start-hour and --sessions-per-user do not apply")
    p.add_argument("--timezone", default="UTC",
                   help="with --days: the server's --timezone (an IANA name), whose calendar days "
                        "the simulated days are (default UTC)")
    args = p.parse_args()
    if not args.token:
        p.error("--token or $BOTMETRICS_TOKEN is required")
    if not 0 <= args.failure_rate <= 1:
        p.error("--failure-rate must be between 0 and 1")
    if not 0 <= args.days <= 400:
        # The user book remembers users for --user-memory (400 days by
        # default) and /v1/retention answers at most 400 days.
        p.error("--days must be between 1 and 400")
    if args.users < 0:
        p.error("--users must be >= 0")
    try:
        zone(args.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        p.error(f"--timezone: unknown time zone {args.timezone!r}")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
