#!/usr/bin/env python3
"""Checks for scripts/e2e.sh, run against a live Prometheus scraping botmetrics.

    e2e_check.py wait-http URL SECONDS               until URL answers 200
    e2e_check.py short-for-rules RULES ALERT OUT     write a copy of one alert with `for: 1s`
    e2e_check.py reject --url URL --token TOKEN      send one request of each rejected kind
    e2e_check.py wait-alert --prom URL --alert NAME --bot BOT --rules-file F [--timeout S]
    e2e_check.py counts --prom URL --bot BOT --counts FILE [--timeout S]
                                                     Prometheus holds exactly what the simulator sent
    e2e_check.py no-alerts --prom URL                no alert pending or firing
    e2e_check.py check --prom URL --bot BOT --rules-file F [--psql-url URL] [--cluster] DASHBOARD.json...
    e2e_check.py lint DASHBOARD.json...              static checks, no server needed

`check` evaluates, through Prometheus' HTTP API, every PromQL expression of
every dashboard panel and template variable, and every rule of the shipped
rules file (taken from /api/v1/rules, i.e. exactly what Prometheus loaded).
Each must parse and return at least one non-NaN sample, and a dashboard
target about the bot (one that uses `$bot`) a sample above 0: every closed
series exists at 0 from start-up, so "returns data" alone would pass with
nothing counted. A panel gated on a day of history (`X and on (bot) (Y
offset 1d > 0)`: empty until the daily-user window is full) must parse
whole, and X must return data. The only exceptions are ZERO_ON_A_HEALTHY_RUN below,
the unpriced tokens of a model the price table does not know
(ABSENT_ON_A_HEALTHY_RUN below: no such series on a run that uses only
priced models, so an expression over them that returns nothing is reported
as skipped), the remote-write self-metrics (REMOTE_WRITE_ONLY below: only
with --remote-write-url, which tests/api/remote_write.rs runs against real
receivers), and the cluster-mode self-metrics (CLUSTER_ONLY below), which
botmetrics exposes only with --redis-url: without `--cluster` an
expression over them that returns nothing is reported as skipped (it must
still parse); with `--cluster` (botmetrics run with --redis-url) it must
return data like any other. Rules:

* A recording rule: its expression and the series it records.
* An alert rule: its full expression must parse, but may be empty (the
  condition is false on healthy traffic). Its data-carrying operands must
  return data: the operands of `and`/`or`, the left-hand side of a
  comparison, the argument of absent() (the right-hand side of a comparison
  is a threshold or a baseline such as `offset 1h` that a short test
  cannot have, and so is an operand with `offset`: both are only parsed as
  part of the whole).
* Every rule must report health "ok" after evaluation.

SQL panel targets (the PostgreSQL history panel) are run with psql against
--psql-url, the database botmetrics writes to, and must return rows with a
value (the last column) above 0; without
--psql-url they are reported as skipped.

Standard library only. Prints one line per expression and ends with
"N passed, M failed"; exits 1 when anything failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

# Grafana's built-in variables, as a 1-second-scrape test needs them.
# $__rate_interval is 5m so that a rate covers the whole run (about a minute
# of traffic), and a panel of a rare event still has its events in range.
GRAFANA_VARS = {"__rate_interval": "5m", "__interval": "15s", "__interval_ms": "15000",
                "__range": "5m", "__range_s": "300", "__range_ms": "300000"}


# --------------------------------------------------------------- HTTP helpers

def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read()


def prom_get(prom: str, path: str, **params: str) -> dict:
    status, body = http("GET", f"{prom}{path}?{urllib.parse.urlencode(params)}")
    try:
        return json.loads(body)
    except ValueError:
        return {"status": "error", "error": f"HTTP {status}: {body[:200]!r}"}


def query(prom: str, expr: str) -> tuple[bool, str, list]:
    """Instant query. Returns (parsed_ok, error, [(labels, value)])."""
    reply = prom_get(prom, "/api/v1/query", query=expr)
    if reply.get("status") != "success":
        return False, f"{reply.get('errorType', '')}: {reply.get('error', '')}", []
    data = reply["data"]
    if data["resultType"] in ("scalar", "string"):
        return True, "", [({}, float(data["result"][1]))]
    if data["resultType"] == "vector":
        return True, "", [(s["metric"], float(s["value"][1])) for s in data["result"]]
    return True, "", [(s["metric"], float(s["values"][-1][1])) for s in data["result"]]


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def ok(self, what: str, detail: str) -> None:
        self.passed += 1
        print(f"PASS  {what}\n      {detail}", flush=True)

    def fail(self, what: str, detail: str) -> None:
        self.failed += 1
        print(f"FAIL  {what}\n      {detail}", flush=True)

    def data(self, what: str, prom: str, expr: str, positive: bool = False,
             may_be_empty: bool | str = False) -> None:
        """Pass when expr parses and has at least one non-NaN sample (with
        `positive`, one above 0). With `may_be_empty` (True, or the reason
        why as a string), no sample at all is reported as skipped instead
        of failed."""
        parsed, err, samples = query(prom, expr)
        shown = f"`{one_line(expr)}`"
        if not parsed:
            self.fail(what, f"{shown}: does not evaluate: {err}")
        elif not samples and may_be_empty:
            why = may_be_empty if isinstance(may_be_empty, str) else (
                "cluster-mode series, and this botmetrics runs without --redis-url "
                "(check --cluster requires them)")
            print(f"SKIP  {what}\n      {shown}: parsed OK, no data: {why}", flush=True)
        elif not samples:
            self.fail(what, f"{shown}: parsed, but returned no data")
        elif all(math.isnan(v) for _, v in samples):
            self.fail(what, f"{shown}: {len(samples)} series, all NaN")
        elif positive and not any(v > 0 for _, v in samples):
            self.fail(what, f"{shown}: {len(samples)} series, none above 0: nothing was counted")
        else:
            labels, value = max(((l, v) for l, v in samples if not math.isnan(v)), key=lambda lv: lv[1])
            self.ok(what, f"{shown}: {len(samples)} series, e.g. {fmt_labels(labels)} = {value:.6g}")

    def parses(self, what: str, prom: str, expr: str) -> None:
        parsed, err, samples = query(prom, expr)
        shown = f"`{one_line(expr)}`"
        if parsed:
            self.ok(what, f"{shown}: parsed OK, {len(samples)} series now "
                          "(may be empty: the alert condition is false)")
        else:
            self.fail(what, f"{shown}: does not evaluate: {err}")


def one_line(expr: str) -> str:
    return re.sub(r"\s+", " ", expr).strip()


def fmt_labels(labels: dict) -> str:
    return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


# ----------------------------------------------------- PromQL decomposition

_WORD_OPS = ("or", "and", "unless")
_CMP_OPS = ("==", "!=", ">=", "<=", ">", "<")


def _top_level_ops(expr: str) -> list:
    """(position, operator) of binary set and comparison operators outside
    any brackets or string literal."""
    ops, depth, i, n = [], 0, 0, len(expr)
    while i < n:
        c = expr[i]
        if c in "\"'`":
            j = i + 1
            while j < n and expr[j] != c:
                j += 2 if expr[j] == "\\" else 1
            i = j + 1
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            two = expr[i:i + 2]
            if two in _CMP_OPS:
                ops.append((i, two))
                i += 2
                continue
            if c in "<>":
                ops.append((i, c))
            elif c.isalpha() and (i == 0 or not (expr[i - 1].isalnum() or expr[i - 1] in "_:")):
                m = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", expr[i:])
                word = m.group(0)
                if word in _WORD_OPS:
                    ops.append((i, word))
                i += len(word)
                continue
        i += 1
    return ops


def _strip_parens(expr: str) -> str:
    expr = expr.strip()
    while expr.startswith("(") and expr.endswith(")"):
        depth = 0
        for i, c in enumerate(expr):
            depth += c == "("
            depth -= c == ")"
            if depth == 0 and i < len(expr) - 1:
                return expr  # the first "(" closes before the end: not one group
        expr = expr[1:-1].strip()
    return expr


def _strip_modifiers(rhs: str) -> str:
    """Drop `bool`, `on(...)`, `ignoring(...)`, `group_left(...)` after an operator."""
    while True:
        m = re.match(r"\s*(bool\b|(?:on|ignoring|group_left|group_right)\s*\([^)]*\))", rhs)
        if not m:
            return rhs.strip()
        rhs = rhs[m.end():]


def data_operands(expr: str) -> list:
    """The sub-expressions of an alert condition that must return data."""
    expr = _strip_parens(expr)
    ops = _top_level_ops(expr)
    for group in (("or",), ("and", "unless")):
        cuts = [(p, op) for p, op in ops if op in group]
        if cuts:
            parts, start = [], 0
            for p, op in cuts:
                parts.append(expr[start:p])
                start = p + len(op)
            parts.append(expr[start:])
            if cuts[-1][1] == "unless":
                parts = parts[:-1]  # `unless X`: X is expected to be empty
            return [o for part in parts for o in data_operands(_strip_modifiers(part))]
    cmps = [(p, op) for p, op in ops if op in _CMP_OPS]
    if cmps:
        return data_operands(expr[:cmps[0][0]])
    m = re.fullmatch(r"absent(?:_over_time)?\s*\((.*)\)", expr, re.S)
    if m:
        return data_operands(m.group(1))
    if re.search(r"\boffset\b", expr):
        return []  # history (`x offset 1d`: "a day of history exists") a short run cannot have
    return [expr.strip()]


# ------------------------------------------------------------------ commands

def substitute(expr: str, bot: str) -> str:
    values = dict(GRAFANA_VARS, bot=bot, instance=".+")
    out = re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)",
                 lambda m: values.get(m.group(1) or m.group(2), m.group(0)), expr)
    return out


def panels(items: list):
    for p in items:
        yield p
        yield from panels(p.get("panels", []))


def sql_substitute(sql: str, bot: str) -> str:
    """Grafana's SQL macros and variables, as Grafana would expand them for
    the last hour and one selected bot (SQL variables are quoted)."""
    sql = re.sub(r"\$__timeFilter\((\w+)\)", r"\1 between now() - interval '1 hour' and now()", sql)
    return re.sub(r"\$\{?bot\}?", "'" + bot.replace("'", "''") + "'", sql)


def check_sql(rep: Report, what: str, psql_url: str, sql: str, bot: str) -> None:
    sql = sql_substitute(sql, bot)
    shown = f"`{one_line(sql)}`"
    if "$" in sql:
        rep.fail(what, f"unknown macro or variable left in {shown}")
        return
    run = subprocess.run(["psql", psql_url, "-X", "-q", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1", "-c", sql],
                         capture_output=True, text=True, timeout=30)
    rows = [r for r in run.stdout.splitlines() if r.strip()]
    if run.returncode != 0:
        rep.fail(what, f"{shown}: psql failed: {run.stderr.strip()}")
    elif not rows:
        rep.fail(what, f"{shown}: no rows")
    elif not any(float(r.split("\t")[-1]) > 0 for r in rows):
        rep.fail(what, f"{shown}: {len(rows)} rows, no value above 0: nothing was counted")
    else:
        rep.ok(what, f"{shown}: {len(rows)} rows, e.g. {rows[-1]!r}")


def cluster_only(expr: str, cluster: bool) -> bool | str:
    """True when expr reads a cluster-mode series and the run has none; the
    reason, when it reads a series a healthy run may not have at all."""
    if re.search(ABSENT_ON_A_HEALTHY_RUN, expr):
        return ("a series botmetrics creates only for a model the price table does not know, "
                "which the simulator may not use")
    if re.search(REMOTE_WRITE_ONLY, expr):
        return "a series botmetrics creates only with --remote-write-url, which this run does not set"
    return not cluster and re.search(CLUSTER_ONLY, expr) is not None


def check_dashboards(rep: Report, prom: str, bot: str, files: list, psql_url: str | None = None,
                     cluster: bool = False) -> None:
    for path in files:
        with open(path) as f:
            dash = json.load(f)  # also proves the file is valid JSON
        name = os.path.basename(path)
        for var in dash.get("templating", {}).get("list", []):
            if var.get("type") != "query":
                continue
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\)\s*", q)
            what = f"{name} variable ${var['name']}: {q}"
            if not m:
                rep.fail(what, "not a label_values(metric, label) query")
                continue
            rep.data(what, prom, f"count by ({m.group(2)}) ({substitute(m.group(1), bot)})")
            if var["name"] == "bot":
                _, _, samples = query(prom, f"count by (bot) ({m.group(1)})")
                if bot not in {labels.get("bot") for labels, _ in samples}:
                    rep.fail(what, f"bot {bot!r} is not among the variable's values")
        for panel in panels(dash.get("panels", [])):
            for t in panel.get("targets", []):
                what = f"{name} panel \"{panel.get('title')}\" [{t.get('refId')}]"
                ds = t.get("datasource") or panel.get("datasource") or {}
                if ds.get("type") != "prometheus":
                    if psql_url and "rawSql" in t:
                        check_sql(rep, what, psql_url, t["rawSql"], bot)
                    else:
                        print(f"SKIP  {what}\n      {ds.get('type')} target: SQL, run only with --psql-url",
                              flush=True)
                    continue
                expr = substitute(t["expr"], bot)
                if "$" in expr:
                    rep.fail(what, f"unknown variable left in `{one_line(expr)}`")
                    continue
                about_bot = "$bot" in t["expr"] and not any(m in expr for m in ZERO_ON_A_HEALTHY_RUN)
                ungated = without_history_gate(expr)
                if ungated is not None:
                    # Empty until a day of history exists, which a short
                    # run cannot have: the whole must parse, and what it
                    # shows once the gate opens must return data.
                    parsed, err, _ = query(prom, expr)
                    if not parsed:
                        rep.fail(what, f"`{one_line(expr)}`: does not evaluate: {err}")
                        continue
                    what += " (without its day-of-history gate)"
                    expr = ungated
                rep.data(what, prom, expr, positive=about_bot, may_be_empty=cluster_only(expr, cluster))


def without_history_gate(expr: str) -> str | None:
    """`X and on (...) (Y offset 1d > 0)`, a panel that stays empty until
    Prometheus holds a day of history: X. None for any other expression."""
    ops = [(p, op) for p, op in _top_level_ops(expr) if op in _WORD_OPS]
    if not ops or ops[-1][1] != "and":
        return None
    pos = ops[-1][0]
    if not re.search(r"\boffset\b", expr[pos:]) or re.search(r"\boffset\b", expr[:pos]):
        return None
    return expr[:pos].strip()


# Per-bot metrics that stay at 0 on a healthy run with a well-behaved
# client: their panels must return data, but may read 0.
ZERO_ON_A_HEALTHY_RUN = ("botmetrics_events_duplicate_total", "botmetrics_label_overflow_total",
                         "botmetrics_dedupe_fallbacks_total", "bot_llm_unpriced_tokens_total")

# Per-bot series that exist only once something unusual happened, labelled
# by what it was (a model the price table does not know): on a healthy run
# an expression over them may return nothing (it must still parse).
ABSENT_ON_A_HEALTHY_RUN = r"\bbot_llm_unpriced_tokens_total\b"

# Self-metrics botmetrics registers only with --remote-write-url (tested
# against real receivers in tests/api/remote_write.rs, not here).
REMOTE_WRITE_ONLY = r"\bbotmetrics_remote_write_\w+"

# Self-metrics botmetrics registers only with --redis-url (cluster mode).
CLUSTER_ONLY = (r"\bbotmetrics_(redis_up|sync_\w+|last_sync_timestamp_seconds|dedupe_fallbacks_total"
                r"|cluster_writer|redis_reseeds_total)\b")


def check_rules(rep: Report, prom: str, rules_file: str, cluster: bool = False) -> None:
    reply = prom_get(prom, "/api/v1/rules")
    groups = [g for g in reply.get("data", {}).get("groups", [])
              if os.path.realpath(g["file"]) == os.path.realpath(rules_file)]
    if not groups:
        rep.fail(f"rules file {rules_file}", "Prometheus has not loaded it")
        return
    for g in groups:
        for r in g["rules"]:
            kind = "recording rule" if r["type"] == "recording" else "alert"
            label = r.get("name")
            what = f"{g['name']} {kind} {label}"
            if r.get("health") != "ok":
                rep.fail(what, f"health {r.get('health')!r}: {r.get('lastError', '')}")
                continue
            if r["type"] == "recording":
                rep.data(what, prom, r["query"])
                rep.data(what + " (recorded series)", prom, label)
            else:
                rep.parses(what, prom, r["query"])
                for operand in data_operands(r["query"]):
                    rep.data(what + " operand", prom, operand, may_be_empty=cluster_only(operand, cluster))
                for a in r.get("alerts", []):
                    for k, v in a.get("annotations", {}).items():
                        if "error" in v and "template" in v:
                            rep.fail(what, f"annotation {k} did not render: {v}")


# Range selectors a dashboard may use besides [$__rate_interval]: the
# "last 24 h" stat panels.
FIXED_WINDOWS = {"24h"}


def active_users_problems(expr: str) -> list:
    """bot_active_users is the same cluster-wide estimate on every replica:
    it must be taken with `max by (bot[, window])`, and never summed (over
    replicas it would multiply the count, over bots count a user of two
    bots twice)."""
    problems = []
    for m in re.finditer(r"bot_active_users\b", expr):
        if not re.search(r"max by \(bot(, window)?\) \($", expr[:m.start()]):
            problems.append("bot_active_users not taken with `max by (bot)`")
    if "bot_active_users" in expr and re.search(r"\bsum\b[^(]*\(\s*max by \(bot", expr):
        problems.append("bot_active_users summed: use `max by (bot)` only")
    return problems


def lint_dashboard(rep: Report, path: str, uids: set) -> None:
    """What Grafana needs to import the file as-is, and the conventions the
    dashboards promise (datasource variable, bot variable, $__rate_interval)."""
    name = os.path.basename(path)
    try:
        with open(path) as f:
            dash = json.load(f)
    except ValueError as e:
        rep.fail(name, f"not valid JSON: {e}")
        return
    problems = []
    for key in ("uid", "title", "schemaVersion", "panels", "templating"):
        if key not in dash:
            problems.append(f"missing top-level {key!r}")
    if dash.get("id") is not None:
        problems.append("id must be null so that import creates a new dashboard")
    if not isinstance(dash.get("schemaVersion"), int) or dash["schemaVersion"] < 39:
        problems.append(f"schemaVersion {dash.get('schemaVersion')!r} < 39")
    uid = dash.get("uid", "")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", uid) or uid in uids:
        problems.append(f"uid {uid!r} is not 1-40 of [A-Za-z0-9_-] or is not unique")
    uids.add(uid)
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("datasource", {})
    if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("no Prometheus datasource variable named 'datasource'")
    bot = variables.get("bot", {})
    bot_q = bot.get("query", {})
    bot_q = bot_q.get("query") if isinstance(bot_q, dict) else bot_q
    if bot_q != "label_values(bot_messages_total, bot)":
        problems.append("no 'bot' variable from label_values(bot_messages_total, bot)")
    ids, cells = set(), {}
    for panel in panels(dash.get("panels", [])):
        title = panel.get("title", "?")
        if panel.get("id") in ids:
            problems.append(f"panel {title!r}: duplicate id {panel.get('id')}")
        ids.add(panel.get("id"))
        g = panel.get("gridPos", {})
        if not all(isinstance(g.get(k), int) for k in "hwxy") or g["x"] + g["w"] > 24:
            problems.append(f"panel {title!r}: bad gridPos {g}")
            continue
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        clash = mine & cells.keys()
        if clash:
            problems.append(f"panel {title!r} overlaps {cells[min(clash)]!r}")
        cells.update(dict.fromkeys(mine, title))
        if panel.get("type") == "row":
            continue
        refs = [t.get("refId") for t in panel.get("targets", [])]
        if not refs or len(set(refs)) != len(refs):
            problems.append(f"panel {title!r}: no targets, or duplicate refIds {refs}")
        for t in panel.get("targets", []):
            tds = t.get("datasource") or panel.get("datasource") or {}
            if tds.get("type") == "prometheus":
                if tds.get("uid") != "${datasource}":
                    problems.append(f"panel {title!r}: Prometheus target not on ${{datasource}}")
                for window in re.findall(r"\[([^\]]+)\]", t.get("expr", "")):
                    if window != "$__rate_interval" and window not in FIXED_WINDOWS:
                        problems.append(f"panel {title!r}: range [{window}] instead of [$__rate_interval]")
                if "$bot" not in t.get("expr", "") and "botmetrics_" not in t.get("expr", ""):
                    problems.append(f"panel {title!r}: bot_ query ignores $bot")
                problems += [f"panel {title!r}: {p}" for p in active_users_problems(t.get("expr", ""))]
            elif not str(tds.get("uid", "")).startswith("${"):
                problems.append(f"panel {title!r}: datasource {tds} is not a variable")
    if problems:
        for pr in problems:
            rep.fail(name, pr)
    else:
        rep.ok(name, f"uid {uid}, schemaVersion {dash['schemaVersion']}, {len(ids)} panels, "
                     f"variables {', '.join(variables)}")


def cmd_lint(args: argparse.Namespace) -> int:
    rep, uids = Report(), set()
    for path in args.dashboards:
        lint_dashboard(rep, path, uids)
    print(f"{rep.passed} passed, {rep.failed} failed")
    return 1 if rep.failed or not rep.passed else 0


def cmd_check(args: argparse.Namespace) -> int:
    rep = Report()
    check_rules(rep, args.prom, args.rules_file, args.cluster)
    check_dashboards(rep, args.prom, args.bot, args.dashboards, args.psql_url, args.cluster)
    print(f"{rep.passed} passed, {rep.failed} failed")
    return 1 if rep.failed or not rep.passed else 0


def cmd_wait_alert(args: argparse.Namespace) -> int:
    """Wait until the shipped alert is pending or firing for the bot, and
    the short-`for` copy (any other file) is firing."""
    deadline = time.monotonic() + args.timeout
    shipped = copy = "inactive"
    while time.monotonic() < deadline:
        reply = prom_get(args.prom, "/api/v1/rules", type="alert")
        shipped = copy = "inactive"
        for g in reply.get("data", {}).get("groups", []):
            is_shipped = os.path.realpath(g["file"]) == os.path.realpath(args.rules_file)
            for r in g["rules"]:
                if r["name"] != args.alert:
                    continue
                states = {a["state"] for a in r.get("alerts", []) if a["labels"].get("bot") == args.bot}
                state = "firing" if "firing" in states else "pending" if "pending" in states else "inactive"
                if is_shipped:
                    shipped = state
                else:
                    copy = state
        if shipped in ("pending", "firing") and copy == "firing":
            print(f"PASS  alert {args.alert} for bot {args.bot}: {shipped} (shipped rule), "
                  f"firing (copy with for: 1s)", flush=True)
            alerts = prom_get(args.prom, "/api/v1/alerts")["data"]["alerts"]
            for a in alerts:
                if a["labels"].get("alertname") == args.alert:
                    print(f"      {a['state']}: {a['annotations'].get('summary')}")
            return 0
        time.sleep(1)
    print(f"FAIL  alert {args.alert} for bot {args.bot}: shipped rule {shipped}, copy {copy} "
          f"after {args.timeout:.0f}s", flush=True)
    return 1


def cmd_counts(args: argparse.Namespace) -> int:
    """Prometheus' bot_messages_total (by role) and
    botmetrics_events_accepted_total for the bot equal exactly what the
    simulator tracked and delivered (its --counts file). Waits for the
    scrapes that carry the last events, up to --timeout."""
    with open(args.counts) as f:
        c = json.load(f)
    if c["rejected"] or c["dropped"] or c["unsent"]:
        print(f"FAIL  simulator counts: not everything was delivered: {c}", flush=True)
        return 1
    tracked = c["tracked"]
    want = {f"messages {role}": float(tracked.get(f"message:{role}", 0)) for role in ("user", "assistant")}
    want["events accepted"] = float(sum(n for k, n in tracked.items() if ":" not in k))
    if c["sent"] - c["duplicates"] != want["events accepted"]:
        print(f"FAIL  simulator counts: sent {c['sent']} - duplicates {c['duplicates']} "
              f"!= tracked {want['events accepted']:.0f}", flush=True)
        return 1
    if min(want.values()) <= 0:
        print(f"FAIL  simulator counts: nothing to check in {c}", flush=True)
        return 1
    bot = args.bot.replace("\\", "\\\\").replace('"', '\\"')
    deadline = time.monotonic() + args.timeout
    while True:
        got = {}
        for role in ("user", "assistant"):
            _, _, samples = query(args.prom, f'sum(bot_messages_total{{bot="{bot}", role="{role}"}})')
            got[f"messages {role}"] = samples[0][1] if samples else None
        _, _, samples = query(args.prom, f'sum(botmetrics_events_accepted_total{{bot="{bot}"}})')
        got["events accepted"] = samples[0][1] if samples else None
        if got == want or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    good = got == want
    print(f"{'PASS' if good else 'FAIL'}  counts of bot {args.bot} in Prometheus: "
          + ", ".join(f"{k} {got[k]} (sent {want[k]:.0f})" for k in want), flush=True)
    return 0 if good else 1


def cmd_no_alerts(args: argparse.Namespace) -> int:
    """No alert of the loaded rules is pending or firing."""
    alerts = prom_get(args.prom, "/api/v1/alerts").get("data", {}).get("alerts")
    if alerts is None:
        print("FAIL  no alerts: Prometheus did not answer /api/v1/alerts", flush=True)
        return 1
    for a in alerts:
        print(f"FAIL  alert {a['labels'].get('alertname')} is {a['state']} on ordinary traffic: "
              f"{a['annotations'].get('summary')}", flush=True)
    if not alerts:
        print("PASS  no alert pending or firing on the simulator's ordinary traffic", flush=True)
    return 1 if alerts else 0


def cmd_short_for_rules(args: argparse.Namespace) -> int:
    """Copy one alert rule, verbatim but for `for: 1s`, into its own group."""
    lines = open(args.rules).read().splitlines()
    start = next((i for i, l in enumerate(lines) if re.fullmatch(rf"\s*- alert: {args.alert}\s*", l)), None)
    if start is None:
        print(f"alert {args.alert} not found in {args.rules}", file=sys.stderr)
        return 1
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
        end += 1
    block = [re.sub(r"^(\s*)for: .*$", r"\1for: 1s", l[indent:]) for l in lines[start:end]]
    with open(args.out, "w") as f:
        f.write("# Generated by scripts/e2e_check.py for the end-to-end test only.\n"
                "groups:\n  - name: e2e.short-for\n    rules:\n")
        f.write("".join(f"      {l}\n" if l else "\n" for l in block))
    return 0


def cmd_wait_http(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        try:
            if http("GET", args.url)[0] == 200:
                return 0
        except OSError:
            pass
        time.sleep(0.2)
    print(f"e2e: {args.url} not ready after {args.seconds:.0f} s", file=sys.stderr)
    return 1


def cmd_reject(args: argparse.Namespace) -> int:
    """One request of each kind botmetrics must refuse, with its status."""
    ev = json.dumps({"type": "message", "user_id": 1, "role": "user"}).encode()
    auth = {"Authorization": f"Bearer {args.token}"}
    cases = [
        ("unauthorized", 401, ev, {"Authorization": "Bearer wrong", "Content-Type": "application/json"}),
        ("malformed", 400, b"{not json", dict(auth, **{"Content-Type": "application/json"})),
        ("unsupported_media_type", 415, ev, dict(auth, **{"Content-Type": "text/plain"})),
        ("invalid", 422, json.dumps({"type": "message", "user_id": 1, "role": "robot"}).encode(),
         dict(auth, **{"Content-Type": "application/json"})),
    ]
    failed = 0
    for reason, want, body, headers in cases:
        status, reply = http("POST", args.url + "/v1/events", body, headers)
        good = status == want
        failed += not good
        print(f"{'PASS' if good else 'FAIL'}  rejected request ({reason}): HTTP {status}, want {want}: "
              f"{reply[:120].decode('utf-8', 'replace')}", flush=True)
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("--prom", required=True)
    c.add_argument("--bot", required=True)
    c.add_argument("--rules-file", required=True)
    c.add_argument("--psql-url", help="botmetrics' PostgreSQL database, to run the SQL panels")
    c.add_argument("--cluster", action="store_true",
                   help="botmetrics runs with --redis-url: its cluster-mode series must return data too")
    c.add_argument("dashboards", nargs="+")
    w = sub.add_parser("wait-alert")
    w.add_argument("--prom", required=True)
    w.add_argument("--alert", required=True)
    w.add_argument("--bot", required=True)
    w.add_argument("--rules-file", required=True)
    w.add_argument("--timeout", type=float, default=60)
    wh = sub.add_parser("wait-http")
    wh.add_argument("url")
    wh.add_argument("seconds", type=float)
    s = sub.add_parser("short-for-rules")
    s.add_argument("rules")
    s.add_argument("alert")
    s.add_argument("out")
    li = sub.add_parser("lint")
    li.add_argument("dashboards", nargs="+")
    r = sub.add_parser("reject")
    r.add_argument("--url", required=True)
    r.add_argument("--token", required=True)
    co = sub.add_parser("counts")
    co.add_argument("--prom", required=True)
    co.add_argument("--bot", required=True)
    co.add_argument("--counts", required=True, help="the simulator's --counts file")
    co.add_argument("--timeout", type=float, default=15)
    na = sub.add_parser("no-alerts")
    na.add_argument("--prom", required=True)
    args = p.parse_args()
    return {"counts": cmd_counts, "no-alerts": cmd_no_alerts, "check": cmd_check, "lint": cmd_lint, "wait-alert": cmd_wait_alert, "wait-http": cmd_wait_http,
            "short-for-rules": cmd_short_for_rules, "reject": cmd_reject}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
