#!/usr/bin/env python3
"""Play the traffic simulator's days through prometheus/rules.yml with promtool.

    python3 scripts/simulated_days.py --out /tmp/days_test.yml
    promtool test rules /tmp/days_test.yml

Writes a `promtool test rules` file whose input series are what Prometheus
would scrape from botmetrics, minute by minute, while four bots of 20, 80,
500 and 5,000 users live three simulated days of clients/python/simulate.py
(its Simulation class, the same rhythm of the day, sessions, caches, limits
and LLM outcomes; seeded, so the file is the same on every run). Two tests:

* Three ordinary days: no alert is ever pending or firing, from the first
  minute of a new deployment on (the ALERTS series promtool records at every
  evaluation stays empty).
* The same days with eight faults on the third: the 500-user bot stops at
  noon (BotSilent), the 80-user bot tries a model the price table does not
  know for an hour (BotUnpricedTokens), and the 5,000-user bot gets an hour
  of a runaway loop calling its dearer model at night (BotSpendSpike), an
  hour of failing LLM calls (BotHighErrorRate), an hour of slow ones
  (BotSlowResponses), two hours of a cache that misses
  (BotLowCacheHitRatio), 90 minutes of a client hammering its daily limit
  (BotDailyLimitSurge) and a release whose answers users dislike from 6 am
  on (BotSatisfactionFalling). Each alert fires during its fault, and no
  other alert fires at any time.

Spend and ratings are derived here from each LLM call the simulator makes
(its models and tokens), because the simulator does not send them itself:
the cost of its tokens at PRICES (source="table"), some prompt tokens served
from the provider's cache, and a rating of some answers (thumbs for three
bots, 1-5 for the largest). When the simulator passes `cost` (reported by a
provider) it is used as it is (source="reported"). Only what the rules read
is written: the cost, feedback and unpriced-token counters, not the token
counts or time-to-first-token buckets that only dashboards draw.

`cargo test --test api stack` generates and runs it. Standard library only.
"""

from __future__ import annotations

import argparse
import bisect
import os
import random
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The simulator as a package (clients/python/src/botmetrics/simulate.py) or
# as the single script beside the client (clients/python/simulate.py).
sys.path[:0] = [os.path.join(REPO, "clients", "python", "src"), os.path.join(REPO, "clients", "python")]
try:
    from botmetrics.simulate import DAY, Simulation  # noqa: E402
except ImportError:
    from simulate import DAY, Simulation  # noqa: E402

MINUTE = 60
DAYS = 3
HOUR = 3600
# botmetrics' response-time buckets (src/metrics/bot.rs RESPONSE_BUCKETS), seconds.
BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 45.0, 60.0]
STATUSES = ["success", "error", "timeout", "rate_limited"]
BOTS = [("b20", 20, 1), ("b80", 80, 2), ("b500", 500, 3), ("b5000", 5000, 4)]

# Faults of the second test, on the third day (seconds since the start).
D3 = 2 * DAY
SILENT = ("b500", D3 + 12 * HOUR)                              # stops for good
ERRORS = ("b5000", D3 + 9 * HOUR, D3 + 10 * HOUR)             # 30 % of calls fail
SLOW = ("b5000", D3 + 11 * HOUR, D3 + 12 * HOUR)              # every call 6x slower
CACHE_DROP = ("b5000", D3 + 14 * HOUR, D3 + 16 * HOUR)        # user_context 80 % -> ~45 %
LIMIT_SURGE = ("b5000", D3 + 17 * HOUR, D3 + 18.5 * HOUR)     # +10 limit hits a minute
SPEND_LOOP = ("b5000", D3 + 3 * HOUR, D3 + 4 * HOUR)          # +20 gpt-4o calls a minute
UNPRICED = ("b80", D3 + 8 * HOUR, D3 + 9 * HOUR)              # half its calls on an unknown model
BAD_ANSWERS = ("b5000", D3 + 6 * HOUR, D3 + DAY)              # 35 % of ratings positive, not 80 %

# Prices per million tokens (input, cached input, output), in USD: the
# server's own default table (prices.toml), so every model the simulator
# uses is priced as botmetrics prices it. UNKNOWN_MODEL has none.
def _prices():
    import tomllib
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "prices.toml")
    with open(path, "rb") as f:
        table = tomllib.load(f)["models"]
    return {
        model: (p["input"], p.get("cached_input", p["input"]), p["output"])
        for model, p in table.items()
    }


PRICES = _prices()
UNKNOWN_MODEL = "mistral-small-2503"
FEEDBACK_SCORES = ["-1", "+1", "1", "2", "3", "4", "5"]
RATED = 0.08            # share of answers a user rates
RATING_BOTS = {"b5000"}  # rates 1-5 (scale 5); the others thumbs up/down


class Recorder:
    """Stands in for the client: counts what botmetrics would expose, per minute."""

    def __init__(self, bot: str, faults: bool, rng: random.Random, spend_rng: random.Random | None = None):
        self.bot, self.faults, self.rng = bot, faults, rng
        # Spend and ratings draw from a generator of their own, so that the
        # simulator's traffic and the other faults are what they were.
        self.spend_rng = spend_rng or random.Random(0)
        self.t = 0.0
        self.minutes = int(DAYS * DAY // MINUTE)
        self.series: dict[tuple, list] = {}

    def add(self, key: tuple, n: float = 1.0) -> None:
        if self.faults and self.bot == SILENT[0] and self.t >= SILENT[1]:
            return
        col = self.series.setdefault(key, [0.0] * self.minutes)
        col[min(int(self.t // MINUTE), self.minutes - 1)] += n

    def during(self, fault: tuple) -> bool:
        return self.faults and self.bot == fault[0] and fault[1] <= self.t < fault[2]

    def message(self, user_id, role="user", **_):
        self.add(("bot_messages_total", (("role", role),)))

    def limit_reached(self, user_id, **_):
        self.add(("bot_limit_reached_total", ()))

    def cache(self, hit, cache="default", **_):
        if hit and cache == "user_context" and self.during(CACHE_DROP) and self.rng.random() < 0.45:
            hit = False
        self.add(("bot_cache_requests_total", (("cache", cache), ("result", "hit" if hit else "miss"))))

    def response(self, user_id, status, duration_ms, model=None, tokens=None, cost=None, rated=True, **_):
        if status == "success" and self.during(ERRORS) and self.rng.random() < 0.3:
            status, duration_ms = "error", duration_ms / 4
        if self.during(SLOW):
            duration_ms *= 6
        self.add(("bot_responses_total", (("status", status),)))
        seconds = duration_ms / 1000
        for le in BUCKETS[bisect.bisect_left(BUCKETS, seconds):]:
            self.add(("bot_response_duration_seconds_bucket", (("le", repr(le)),)))
        self.add(("bot_response_duration_seconds_bucket", (("le", "+Inf"),)))
        if model:
            self.spend(model, tokens, cost)
        if rated:
            self.rate(status)

    def spend(self, model, tokens, cost) -> None:
        """What botmetrics counts for a call's cost: reported, or its tokens
        at the table's prices, or its tokens as unpriced."""
        rng = self.spend_rng
        prompt, completion = (tokens or (0, 0))[:2] if not isinstance(tokens, dict) else (
            tokens.get("prompt", 0), tokens.get("completion", 0))
        if self.during(UNPRICED) and rng.random() < 0.5:
            model = UNKNOWN_MODEL
        if cost is not None:
            self.add(("bot_llm_cost_total", (("model", model), ("source", "reported"))), cost)
            return
        if model not in PRICES:
            self.add(("bot_llm_unpriced_tokens_total", (("model", model),)), prompt + completion)
            return
        # Half the calls find part of their prompt (the system prompt and
        # the conversation so far) in the provider's cache.
        cached = int(prompt * rng.uniform(0.3, 0.9)) if rng.random() < 0.5 else 0
        p_in, p_cached, p_out = PRICES[model]
        usd = ((prompt - cached) * p_in + cached * p_cached + completion * p_out) / 1e6
        self.add(("bot_llm_cost_total", (("model", model), ("source", "table"))), usd)

    def rate(self, status) -> None:
        """A user rating the answer, now and then: thumbs, or 1-5."""
        rng = self.spend_rng
        if rng.random() >= RATED:
            return
        liked = status == "success" and rng.random() < (0.35 if self.during(BAD_ANSWERS) else 0.8)
        if self.bot in RATING_BOTS:
            score = rng.choice(["4", "5", "5"]) if liked else rng.choice(["1", "2", "3", "3"])
        else:
            score = "+1" if liked else "-1"
        self.add(("bot_feedback_total", (("score", score),)))

    def __getattr__(self, name):  # registrations, consent, custom events, errors
        return lambda *a, **k: None


def play(bot: str, users: int, seed: int, faults: bool) -> Recorder:
    rng = random.Random(seed)
    sim = Simulation(rng, users, 20, 3.0, 0.06)
    rec = Recorder(bot, faults, random.Random(seed + 1000), random.Random(seed + 2000))
    # Every series of the closed label sets exists at 0 from start-up, as
    # botmetrics exposes them.
    for role in ("user", "assistant"):
        rec.series[("bot_messages_total", (("role", role),))] = [0.0] * rec.minutes
    for status in STATUSES:
        rec.series[("bot_responses_total", (("status", status),))] = [0.0] * rec.minutes
    for le in [repr(b) for b in BUCKETS] + ["+Inf"]:
        rec.series[("bot_response_duration_seconds_bucket", (("le", le),))] = [0.0] * rec.minutes
    rec.series[("bot_limit_reached_total", ())] = [0.0] * rec.minutes
    for score in FEEDBACK_SCORES:
        rec.series[("bot_feedback_total", (("score", score),))] = [0.0] * rec.minutes
    t = 0.0
    while t < DAYS * DAY:
        for _ in range(sim.sessions_between(t, t + MINUTE)):
            rec.t = t + rng.random() * MINUTE
            sim.session(rec, rec.t)
        rec.t = t
        if faults and bot == LIMIT_SURGE[0] and LIMIT_SURGE[1] <= t < LIMIT_SURGE[2]:
            rec.add(("bot_limit_reached_total", ()), 10)
        if faults and bot == SPEND_LOOP[0] and SPEND_LOOP[1] <= t < SPEND_LOOP[2]:
            # A loop re-asking the dearer model, with no user to rate it.
            for _ in range(20):
                rec.response(0, "success", 2000.0, model="gpt-4o", tokens=(3000, 500), rated=False)
        t += MINUTE
    return rec


def series_lines(rec: Recorder) -> list:
    lines = []
    for (name, labels), per_minute in sorted(rec.series.items()):
        all_labels = (("job", "botmetrics"), ("instance", "a:9464"), ("bot", rec.bot)) + labels
        sel = ", ".join(f'{k}="{v}"' for k, v in all_labels)
        total, values = 0.0, ["0"]
        for n in per_minute:  # the scrape at the end of each minute
            total += n
            values.append(f"{total:g}")
        lines.append(f"      - series: '{name}{{{sel}}}'\n        values: '{compress(values)}'\n")
    return lines


def compress(values: list) -> str:
    """Runs of one value as promtool's `vxn` (v repeated n more times)."""
    out, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        out.append(values[i] if j == i else f"{values[i]}x{j - i}")
        i = j + 1
    return " ".join(out)


def hm(seconds: float) -> str:
    return f"{int(seconds // 60)}m"


def test_group(faults: bool) -> str:
    minutes = int(DAYS * DAY // MINUTE)
    out = ["  - interval: 1m\n    input_series:\n",
           f"      - series: 'up{{job=\"botmetrics\", instance=\"a:9464\"}}'\n        values: '1x{minutes}'\n"]
    for bot, users, seed in BOTS:
        out += series_lines(play(bot, users, seed, faults))
    end = hm(DAYS * DAY)
    out.append("    promql_expr_test:\n")
    if not faults:
        out.append(f"""      # Nothing was pending or firing at any evaluation of the three days.
      - expr: count by (alertname, bot, alertstate) (count_over_time(ALERTS[{DAYS}d]))
        eval_time: {end}
        exp_samples: []
      - expr: count by (alertname, bot, alertstate) (count_over_time(ALERTS[1d]))
        eval_time: 1d
        exp_samples: []
      - expr: count by (alertname, bot, alertstate) (count_over_time(ALERTS[1d]))
        eval_time: 2d
        exp_samples: []
""")
        return "".join(out)
    out.append(f"""      # The first two days stay quiet with faults to come on the third.
      - expr: count by (alertname, bot, alertstate) (count_over_time(ALERTS[2d]))
        eval_time: {hm(D3)}
        exp_samples: []
      # Over the third day, exactly the eight faults' alerts fired.
      - expr: count by (alertname, bot) (max_over_time(ALERTS{{alertstate="firing"}}[1d]))
        eval_time: {end}
        exp_samples:
          - labels: '{{alertname="BotSilent", bot="{SILENT[0]}"}}'
            value: 1
          - labels: '{{alertname="BotHighErrorRate", bot="{ERRORS[0]}"}}'
            value: 1
          - labels: '{{alertname="BotSlowResponses", bot="{SLOW[0]}"}}'
            value: 1
          - labels: '{{alertname="BotLowCacheHitRatio", bot="{CACHE_DROP[0]}"}}'
            value: 1
          - labels: '{{alertname="BotDailyLimitSurge", bot="{LIMIT_SURGE[0]}"}}'
            value: 1
          - labels: '{{alertname="BotSpendSpike", bot="{SPEND_LOOP[0]}"}}'
            value: 1
          - labels: '{{alertname="BotUnpricedTokens", bot="{UNPRICED[0]}"}}'
            value: 1
          - labels: '{{alertname="BotSatisfactionFalling", bot="{BAD_ANSWERS[0]}"}}'
            value: 1
""")
    # Each one fires during its own fault (the last minutes of it) and not in
    # the hour before.
    checks = [("BotSilent", SILENT[0], SILENT[1], SILENT[1] + 3 * HOUR),
              ("BotHighErrorRate", *ERRORS), ("BotSlowResponses", *SLOW),
              ("BotLowCacheHitRatio", *CACHE_DROP), ("BotDailyLimitSurge", *LIMIT_SURGE),
              ("BotSpendSpike", *SPEND_LOOP), ("BotUnpricedTokens", *UNPRICED),
              ("BotSatisfactionFalling", *BAD_ANSWERS)]
    for alert, bot, start, stop in checks:
        extra = ', cache="user_context"' if alert == "BotLowCacheHitRatio" else ""
        out.append(f"""      - expr: count_over_time(ALERTS{{alertname="{alert}", alertstate="firing"}}[1h])
        eval_time: {hm(start)}
        exp_samples: []
      - expr: count by (alertname, bot{", cache" if extra else ""}) (ALERTS{{alertname="{alert}", alertstate="firing"}})
        eval_time: {hm(stop - 60)}
        exp_samples:
          - labels: '{{alertname="{alert}", bot="{bot}"{extra}}}'
            value: 1
""")
    return "".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the promtool test file to write")
    p.add_argument("--rules", default=os.path.join(REPO, "prometheus", "rules.yml"))
    p.add_argument("--only", choices=["ordinary", "faults"], help="write one of the two tests")
    args = p.parse_args()
    with open(args.out, "w") as f:
        f.write("# Generated by scripts/simulated_days.py: the traffic simulator's days.\n")
        # Recording rules first at every evaluation (promtool's order is
        # random otherwise; see rules_test.yml).
        f.write(
            f"rule_files:\n  - {os.path.abspath(args.rules)}\n\nevaluation_interval: 1m\n\n"
            "group_eval_order:\n  - botmetrics.recording\n  - botmetrics.bot.alerts\n"
            "  - botmetrics.self.alerts\n\ntests:\n"
        )
        if args.only != "faults":
            f.write(test_group(faults=False))
        if args.only != "ordinary":
            f.write(test_group(faults=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
