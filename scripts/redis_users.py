#!/usr/bin/env python3
"""Cluster-mode active users: the error and the Redis cost of the exact sets
(BENCHMARKS.md, "Cluster mode: active users").

    scripts/redis_users.py [TRIALS]

On a private redis-server:

1. Error by size. For each size, TRIALS times (default 200): fresh random
   8-byte user hashes, as replicas send them, into one sketch. Redis'
   PFCOUNT alone against botmetrics' count (`lua/exact.lua`: the bot's set
   of users while it holds at most 1,024, PFCOUNT past it), each through a
   sync script. Printed: the 1d window's worst error and how many trials
   missed by more than 2 %.

2. Redis' cost per sync. A sync adds a batch of users to its hour's and
   day's sketches and counts the three windows (24 hourly, 7 and 30 daily
   sketches). The same work with PFADD + PFCOUNT alone (before the sets)
   and through exact.lua, in turn, usec per call from INFO commandstats,
   for a bot of 400 users (exact) and one of 5,000 (past 1,024).
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from claims_redis import Conn  # noqa: E402
from cluster_ingest import commandstats, redis_server  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "src/cluster/lua/exact.lua")) as f:
    EXACT = f.read()

# A sync as sync.lua does it, of users of the current hour. KEYS: the five
# per-bot keys, 24 hourly then 30 daily sketches; ARGV: user hashes.
WINDOWS = """
local hours, week, month = {}, {}, {}
for j = 6, 29 do hours[#hours + 1] = KEYS[j] end
for j = 30, 59 do month[#month + 1] = KEYS[j] end
for j = 53, 59 do week[#week + 1] = KEYS[j] end
local function pfadd(key)
  for i = 1, #ARGV, 1000 do
    redis.call('PFADD', key, unpack(ARGV, i, math.min(#ARGV, i + 999)))
  end
  redis.call('EXPIRE', key, 3600)
end
"""
SYNC_ALONE = WINDOWS + """
pfadd(KEYS[29]); pfadd(KEYS[59])
return {redis.call('PFCOUNT', unpack(hours)), redis.call('PFCOUNT', unpack(week)),
  redis.call('PFCOUNT', unpack(month))}
"""
SYNC_EXACT = EXACT + WINDOWS + """
local prefix = string.sub(KEYS[1], 1, #KEYS[1] - #'series')
local hour, day = exact_now()
local open = exact_open(prefix, hour, {unpack(KEYS, 6, 59)})
if open then exact_add(prefix, hour, 1, #ARGV) end
pfadd(KEYS[29]); pfadd(KEYS[59])
if open then exact_settle(prefix, hour, day) end
local users = exact_count(prefix, hour, day, hours, week, month)
exact_restart(prefix, hour, users[3])
return users
"""

HOUR = int(time.time()) // 3600
DAY = HOUR // 24


def keys(bot):
    p = f"bm:{{{bot}}}:"
    return ([p + k for k in ["series", "applied", "seeded", "today", "dirty"]]
            + [f"{p}u:h:{h}" for h in range(HOUR - 23, HOUR + 1)]
            + [f"{p}u:d:{d}" for d in range(DAY - 29, DAY + 1)])


def errors(conn, trials):
    print("| users | trials | PFCOUNT alone: worst | over 2 % | botmetrics: worst | over 2 % |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    alone = conn.call("SCRIPT", "LOAD", SYNC_ALONE).decode()
    exact = conn.call("SCRIPT", "LOAD", SYNC_EXACT).decode()
    for n in [1, 10, 50, 80, 100, 200, 500, 1000, 1024, 1025, 2000, 10000]:
        worst = [0.0, 0.0]
        over = [0, 0]
        for t in range(trials):
            users = [os.urandom(8) for _ in range(n)]
            for k, sha in enumerate([alone, exact]):
                ks = keys(f"t{k}")
                conn.call("DEL", *ks, ks[0][:-6] + "u:seen", ks[0][:-6] + "u:seen:since")
                for i in range(0, n, 1000):
                    got = conn.call("EVALSHA", sha, len(ks), *ks, *users[i:i + 1000])
                e = (int(got[0]) - n) / n
                if abs(e) > abs(worst[k]):
                    worst[k] = e
                over[k] += abs(e) > 0.02
        print(f"| {n:,} | {trials} | {worst[0] * 100:+.2f} % | {over[0]} | "
              f"{worst[1] * 100:+.2f} % | {over[1]} |")


def cost(conn, port):
    print()
    print("| a bot's users in 30 days, in every sketch | users a sync adds "
          "| PFADD + PFCOUNT alone, usec/sync | with the exact set, usec/sync | ratio |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    alone = conn.call("SCRIPT", "LOAD", SYNC_ALONE).decode()
    exact = conn.call("SCRIPT", "LOAD", SYNC_EXACT).decode()
    for audience in [400, 5000]:
        for batch in [10, 200]:
            pool = [os.urandom(8) for _ in range(audience)]
            results = []
            for sha, bot in [(alone, "alone"), (exact, "exact")]:
                ks = keys(f"{bot}{audience}-{batch}")
                for key in ks[5:]:
                    for i in range(0, audience, 1000):
                        conn.call("PFADD", key, *pool[i:i + 1000])
                if sha == exact:
                    seen = ks[0][:-6] + "u:seen"
                    if audience <= 1024:
                        conn.call("SET", seen + ":since", "0")
                        for i in range(0, audience, 500):
                            flat = []
                            for u in pool[i:i + 500]:
                                flat += [str(HOUR), u]
                            conn.call("ZADD", seen, *flat)
                    else:
                        conn.call("SET", seen + ":since", "off")
                conn.call("CONFIG", "RESETSTAT")
                for r in range(300):
                    start = r * batch % audience
                    conn.call("EVALSHA", sha, len(ks), *ks, *(pool + pool)[start:start + batch])
                calls, usec = commandstats(port)["evalsha"]
                results.append(usec / calls)
            print(f"| {audience:,} | {batch} | {results[0]:.0f} | {results[1]:.0f} | "
                  f"{results[1] / results[0]:.2f} |")


def main():
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = redis_server(tmp)
        try:
            conn = Conn(port)
            errors(conn, trials)
            cost(conn, port)
        finally:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
