"""The simulator's users who come back (``--days``): the population model on
its own, counted exactly where it can be, then ten simulated days played
into the real server and read back from its user book (/v1/retention and
the summary) as the person looking at the cohort panel would.
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
import unittest
from typing import Any, Callable, Dict, List, Tuple

from botmetrics.simulate import (
    DAY, EDGE, MAX_SESSION, SESSION_GAP, TURN_GAP, History, Kind, Population, ReturnModel, Simulation,
    Stamped, quotas, session_starts, zone,
)
from helpers import BOT, REPO, TOKEN, Server

logging.getLogger("botmetrics").setLevel(logging.ERROR)


class Recorder:
    """Stands in for the client: keeps every helper call as (name, args, kwargs)."""

    def __init__(self) -> None:
        self.calls: List[Tuple[str, Tuple[Any, ...], Dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Callable[..., None]:
        def record(*args: Any, **kwargs: Any) -> None:
            self.calls.append((name, args, kwargs))
        return record


def user_of(name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    """The user_id of a helper call, positional or keyword."""
    if "user_id" in kwargs:
        return kwargs["user_id"]
    return args[0] if name in ("message", "response", "feedback", "user_registered", "consent",
                               "limit_reached") else None


class PopulationModelTest(unittest.TestCase):
    """The model alone, with fixed seeds: no server."""

    def test_kinds_and_first_days_are_exact_quotas(self) -> None:
        self.assertEqual(quotas(10, [1, 1, 1]), [4, 3, 3])
        self.assertEqual(quotas(7, [0.65, 0.27, 0.08]), [4, 2, 1])  # 4.55, 1.89, 0.56
        pop = Population(random_of(1), 100_000, 7, ReturnModel())
        kinds = collections.Counter(u.kind for u in pop.users)
        self.assertEqual(kinds, {Kind.ONE_TIME: 65_000, Kind.OCCASIONAL: 27_000, Kind.CORE: 8_000})
        days = collections.Counter(u.first_day for u in pop.users)
        self.assertEqual(days, {0: 14_286, 1: 14_286, 2: 14_286, 3: 14_286, 4: 14_286, 5: 14_285, 6: 14_285})
        self.assertEqual(len({u.id for u in pop.users}), 100_000)

    def test_the_share_back_the_next_day_and_later_matches_the_parameters(self) -> None:
        model = ReturnModel()
        pop = Population(random_of(2), 100_000, 1, model)  # one cohort of 100,000
        self.assertEqual(len(pop.active_on(0)), 100_000)
        by_kind = collections.Counter(u.kind for u in pop.users)
        for after in range(1, 8):
            back = collections.Counter(u.kind for u in pop.active_on(after))
            # One-time users never come back: exactly none.
            self.assertEqual(back[Kind.ONE_TIME], 0, f"day +{after}")
            for kind in (Kind.OCCASIONAL, Kind.CORE):
                share = back[kind] / by_kind[kind]
                # Binomial: 27,000 or 8,000 draws; 0.015 is over 4 standard deviations.
                self.assertAlmostEqual(share, model.chance(kind, after), delta=0.015,
                                       msg=f"{kind} on day +{after}")
            overall = sum(back.values()) / 100_000
            self.assertAlmostEqual(overall, model.expected_return(after), delta=0.006, msg=f"day +{after}")
            if after == 1:
                # Most never come back the next day, a core and some occasional users do.
                self.assertAlmostEqual(overall, 0.27 * 0.30 + 0.08 * 0.90, delta=0.006)
        self.assertAlmostEqual(model.expected_return(7), 0.27 * 0.30 * 0.85 ** 6 + 0.08 * 0.90, places=12)

    def test_the_model_checks_its_parameters(self) -> None:
        with self.assertRaises(ValueError):
            ReturnModel(one_time=0.5)  # shares add up to 0.85
        with self.assertRaises(ValueError):
            ReturnModel(core_daily=1.5)
        with self.assertRaises(ValueError):
            ReturnModel(core_sessions=0.5)
        self.assertEqual(ReturnModel().chance(Kind.CORE, 0), 1.0)
        self.assertEqual(ReturnModel().chance(Kind.CORE, -1), 0.0)

    def test_session_starts_keep_the_gap_and_stay_within_the_day(self) -> None:
        rng = random_of(3)
        for count in range(1, 30):
            starts = session_starts(rng, count)
            self.assertTrue(1 <= len(starts) <= count)
            self.assertEqual(starts, sorted(starts))
            self.assertGreaterEqual(starts[0], EDGE)
            self.assertLessEqual(starts[-1] + MAX_SESSION, DAY - EDGE)
            for a, b in zip(starts, starts[1:]):
                self.assertGreater(b - (a + MAX_SESSION), SESSION_GAP)

    def test_a_history_is_reproducible_and_counts_what_it_sent(self) -> None:
        now = 1_764_633_540.0  # 2025-12-01 23:59 UTC: the last day played whole
        first, played = self.play(seed=4, now=now)
        again, _ = self.play(seed=4, now=now)
        other, _ = self.play(seed=5, now=now)
        self.assertEqual(first.calls, again.calls)
        self.assertNotEqual(first.calls, other.calls)

        # Every event has its time, none after now; each user's are in order.
        per_user: Dict[Any, List[float]] = collections.defaultdict(list)
        for name, args, kwargs in first.calls:
            ts = kwargs["ts"]
            self.assertLessEqual(ts, now)
            user = user_of(name, args, kwargs)
            self.assertIsNotNone(user, name)
            per_user[user].append(ts)
        for times in per_user.values():
            self.assertEqual(times, sorted(times))

        # The active days and sessions, recomputed from the events alone as
        # the server does (a gap over SESSION_GAP starts a session), are what
        # the history says it played.
        dates = [datetime.date(2025, 11, 22) + datetime.timedelta(days=d) for d in range(10)]
        self.assertEqual(played.days, [d.isoformat() for d in dates])
        self.assertEqual(played.days[-1], "2025-12-01")
        starts = [datetime.datetime.combine(d, datetime.time(), datetime.timezone.utc).timestamp() for d in dates]
        days = {u: {max(i for i, s in enumerate(starts) if s <= t) for t in ts} for u, ts in per_user.items()}
        self.assertEqual(days, played.active)
        sessions = 0
        for times in per_user.values():
            sessions += 1 + sum(1 for a, b in zip(times, times[1:]) if b - a > SESSION_GAP)
            # Within a session no gap comes near SESSION_GAP: the split is never a matter of seconds.
            self.assertTrue(all(b - a <= TURN_GAP[1] or b - a > SESSION_GAP + 60 for a, b in zip(times, times[1:])))
        self.assertEqual(sessions, len(played.sessions))
        durations = sorted(last - start for start, last, _ in played.sessions)
        self.assertTrue(30 <= durations[len(durations) // 2] <= 600, durations[len(durations) // 2])
        self.assertTrue(all(0 <= d <= MAX_SESSION for d in durations))
        # Some users have more than one session a day.
        per_day = collections.Counter((u, d) for u, times in per_user.items()
                                      for d in {max(i for i, s in enumerate(starts) if s <= t) for t in times})
        self.assertGreater(sessions, len(per_day))

        report = played.report()
        self.assertEqual(report["users"], 300)
        self.assertEqual(sum(report["kinds"].values()), 300)
        cohorts = report["cohorts"]
        self.assertEqual([c["size"] for c in cohorts], [30] * 10)
        # A day +N past the last day played has no count (the server's null).
        self.assertIsNone(cohorts[9]["d1"])
        self.assertIsNotNone(cohorts[8]["d1"])
        self.assertIsNone(cohorts[3]["d7"])
        self.assertIsNone(cohorts[3]["rolling"]["d7"])
        self.assertIsNotNone(cohorts[2]["d7"])
        self.assertTrue(all(c["d30"] is None for c in cohorts))

    def test_days_are_the_calendar_days_of_the_zone_across_a_clock_change(self) -> None:
        # Berlin leaves summer time on 2025-10-26 (a day of 25 hours).
        berlin = zone("Europe/Berlin")
        now = datetime.datetime(2025, 10, 30, 21, 0, tzinfo=berlin).timestamp()
        recorder, played = self.play(seed=6, now=now, tz=berlin)
        self.assertEqual(played.days[0], "2025-10-21")
        self.assertEqual(played.days[-1], "2025-10-30")
        days: Dict[Any, set[int]] = collections.defaultdict(set)
        for name, args, kwargs in recorder.calls:
            date = datetime.datetime.fromtimestamp(kwargs["ts"], berlin).date().isoformat()
            days[user_of(name, args, kwargs)].add(played.days.index(date))
        self.assertEqual(dict(days), played.active)

    def test_the_evening_zone_is_evening_at_every_hour(self) -> None:
        for hour in range(24):
            now = datetime.datetime(2025, 12, 1, hour, 30, tzinfo=datetime.timezone.utc).timestamp()
            local = datetime.datetime.fromtimestamp(now, zone(evening_zone(now)))
            self.assertEqual(local.hour, 18, evening_zone(now))

    def play(self, seed: int, now: float,
             tz: datetime.tzinfo = datetime.timezone.utc) -> Tuple[Recorder, Any]:
        rng = random_of(seed)
        sim = Simulation(rng, 0, 20, 3.0, 0.06)
        history = History(sim, Population(rng, 300, 10, ReturnModel()), tz, now)
        recorder = Recorder()
        stamped = Stamped(recorder)
        for day in range(10):
            for start, user in history.day(day):
                history.session(stamped, user, start, day)
        return recorder, history.played


def random_of(seed: int) -> random.Random:
    return random.Random(seed)


def evening_zone(now: float, hour: int = 18) -> str:
    """A fixed-offset zone (Etc/GMT±N) where it is about ``hour`` now: its
    today has most of a day's traffic whatever the time of the test."""
    utc_hour = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).hour
    offset = (hour - utc_hour + 12) % 24 - 12  # -12 ... 11
    return "UTC" if offset == 0 else f"Etc/GMT{-offset:+d}"  # Etc/GMT-3 is UTC+3


class HistoryAgainstTheServerTest(unittest.TestCase):
    """Ten simulated days with a fixed seed through the client into the real
    server; its user book must show what a bot's users look like, and
    exactly what the simulator sent."""

    DAYS, USERS = 10, 400

    def test_ten_days_give_plausible_cohorts_and_sessions(self) -> None:
        tz_name = evening_zone(time.time())
        server = Server.for_test(self, "--timezone", tz_name, "--user-scan-interval", "1s")
        tmp = tempfile.TemporaryDirectory(prefix="botmetrics-history-")
        self.addCleanup(tmp.cleanup)
        counts_file = os.path.join(tmp.name, "counts.json")
        env = dict(os.environ, BOTMETRICS_URL=server.url)
        out = subprocess.run(
            [sys.executable, "-m", "botmetrics.simulate", "--token", TOKEN, "--days", str(self.DAYS),
             "--users", str(self.USERS), "--seed", "11", "--timezone", tz_name, "--quiet",
             "--counts", counts_file],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        self.assertEqual(out.returncode, 0, f"{out.stdout}\n{out.stderr}\n{server.tail()}")
        self.assertIn("rejected=0 dropped=0 unsent=0", out.stdout)
        with open(counts_file) as f:
            counts = json.load(f)
        played = counts["history"]
        # Every event tracked was sent (the roles, "message:user", are a count of messages besides).
        self.assertEqual(counts["sent"], sum(n for k, n in counts["tracked"].items() if ":" not in k))
        days: List[str] = played["days"]
        today = datetime.datetime.now(zone(tz_name)).date().isoformat()
        self.assertEqual(len(days), self.DAYS)
        self.assertEqual(days[-1], today)
        expected = played["cohorts"]

        # The cohorts are counted by the periodic scan (every second here).
        query = f"/v1/retention?bot={BOT}&from={days[0]}&to={days[-1]}"
        deadline = time.monotonic() + 20
        while True:
            answer = json.loads(server.get(query))
            if answer["cohorts"] == expected or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.assertEqual(answer["timezone"], tz_name)
        cohorts = answer["cohorts"]
        # A cohort per simulated day, each the users first seen on it, and
        # exactly the returns the simulator played.
        self.assertEqual([c["day"] for c in cohorts], days)
        self.assertEqual(cohorts, expected)
        model = ReturnModel()
        for c in cohorts:
            # The users the model spreads evenly over the days; today's
            # cohort is the part of it that came before now.
            self.assertTrue(0 < c["size"] <= -(-self.USERS // self.DAYS), c)
        # D1 of the cohorts whose day +1 is over: most of each cohort did
        # not come back, more than none did, and the share of all of them
        # is the model's within four standard deviations.
        complete = cohorts[:-2]
        size = sum(c["size"] for c in complete)
        d1 = sum(c["d1"] for c in complete)
        expect = model.expected_return(1)
        sigma = (expect * (1 - expect) / size) ** 0.5
        self.assertTrue(0 < d1, complete)
        self.assertTrue(all(c["d1"] < c["size"] / 2 for c in complete), complete)
        self.assertLess(abs(d1 / size - expect), 4 * sigma, f"D1 {d1}/{size}, the model's {expect:.3f}")
        # Rolling D1 (back on any later day) counts at least the classic one.
        self.assertTrue(all(c["rolling"]["d1"] >= c["d1"] for c in complete))
        d7 = [c for c in cohorts if c["d7"] is not None]
        self.assertEqual(len(d7), self.DAYS - 7)
        # The core (8 %, 90 % of days) alone is about 7 % back on day +7.
        self.assertTrue(0 < sum(c["d7"] for c in d7) < sum(c["size"] for c in d7) / 2, d7)

        # The summary: today's new and returning users, exactly; sessions
        # that have ended (their gap passed), a few minutes long.
        t_before = time.time()
        summary = json.loads(server.get(f"/v1/summary?bot={BOT}"))
        t_after = time.time()
        users, sessions = summary["users"], summary["sessions"]
        self.assertGreater(played["new_today"], 0)
        self.assertGreater(played["returning_today"], 0)
        self.assertEqual(users["new_today"], played["new_today"])
        self.assertEqual(users["returning_today"], played["returning_today"])
        self.assertEqual(users["new_total"], played["users"])
        # D1 of the users new two days ago, the latest complete cohort.
        self.assertEqual(summary["retention"]["d1"], cohorts[-3]["d1"] / cohorts[-3]["size"])

        today_start = datetime.datetime.combine(datetime.date.fromisoformat(today), datetime.time(),
                                                zone(tz_name)).timestamp()
        ends = [last for _, last, _ in played["sessions"]]
        # Ended by the time of the answer: a gap of SESSION_GAP passed and a
        # scan (every second) saw it; 5 s of slack for a busy machine.
        surely = [e for e in ends if e + SESSION_GAP < t_before - 5]
        maybe = [e for e in ends if e + SESSION_GAP < t_after + 1]
        self.assertTrue(len(surely) <= sessions["total"] <= len(maybe),
                        (len(surely), sessions["total"], len(maybe)))
        today_surely = [e for e in surely if e >= today_start]
        today_maybe = [e for e in maybe if e >= today_start]
        self.assertGreater(len(today_surely), 0)
        self.assertTrue(len(today_surely) <= sessions["today"] <= len(today_maybe),
                        (len(today_surely), sessions["today"], len(today_maybe)))
        # Sessions hold a handful of the user's messages over a few minutes.
        self.assertIsNotNone(sessions["median_seconds_today"])
        self.assertTrue(30 <= sessions["median_seconds_today"] <= 20 * 60, sessions)
        self.assertTrue(1.5 <= sessions["messages_per_session_today"] <= 8, sessions)
        self.assertEqual(server.value("bot_sessions_total", bot=BOT), sessions["total"])


if __name__ == "__main__":
    unittest.main()
