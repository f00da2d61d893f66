// The built-in page: today's figures from /v1/summary, charts from
// /v1/charts, both polled so the page stays current without a reload.
// Plain script, no build step: the binary serves this file as it is.
"use strict";
(() => {
  const TOKEN_KEY = "botmetrics.token";
  const params = new URLSearchParams(location.search);
  // ?refresh=SECONDS: how often to poll (the summary itself is cached
  // for --summary-cache-ttl, 30 s by default, so faster gains nothing).
  const refreshSeconds = Math.max(1, Number(params.get("refresh")) || 30);

  // Today's figures, one line each: the summary field, its label, how it
  // reads. A field the server does not send (an older build, a feature
  // not there yet) is left out, so adding a figure is adding a line.
  const FIGURES = [
    ["messages.today", "Messages today", "int"],
    ["users.active_1d", "Active users, 24 h", "int"],
    ["users.active_7d", "Active users, 7 d", "int"],
    ["users.active_30d", "Active users, 30 d", "int"],
    ["users.new_today", "New users today", "int"],
    ["users.returning_today", "Returning users today", "int"],
    ["spend.today", "Spend today", "money"],
    ["spend.month", "Spend this month", "money"],
    ["responses.success_rate", "Success rate", "pct"],
    ["responses.p50_ms", "Latency p50", "ms"],
    ["responses.p95_ms", "Latency p95", "ms"],
    ["cache.hit_rate", "Cache hit rate", "pct"],
    ["errors.total", "Errors, all time", "int"],
    ["feedback.satisfaction_today", "Satisfaction today", "pct"],
  ];

  // The charts: each a title and the /v1/charts series it draws. `per`
  // charts are counts per step (bars), the others values at a time.
  const CHARTS = [
    { id: "messages", title: "Messages", per: true, series: [["messages", "messages", "--accent"]] },
    { id: "active", title: "Active users (24 h window)", series: [["active_users", "active users", "--accent"]] },
    { id: "latency", title: "Latency, ms", series: [["latency_p50_ms", "p50", "--accent"], ["latency_p95_ms", "p95", "--accent2"]] },
    { id: "errors", title: "Errors", per: true, series: [["errors", "errors", "--bad"], ["failed_responses", "failed answers", "--accent2"]] },
    { id: "spend", title: "Spend", per: true, series: [["spend", "spend", "--good"]] },
  ];

  const $ = (id) => document.getElementById(id);
  const state = { bot: params.get("bot"), range: "24h", charts: {}, timer: null, refreshes: 0 };
  // For tests and the curious: what the page last drew.
  window.botmetrics = state;

  class Unauthorized extends Error {}

  async function api(path) {
    const headers = { Accept: "application/json" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = "Bearer " + token;
    const res = await fetch(path, { headers, cache: "no-store" });
    let body = null;
    try { body = await res.json(); } catch (_) { /* a non-JSON error page */ }
    if (res.status === 401) throw new Unauthorized(body && body.message || "a token is needed");
    if (!res.ok) throw new Error((body && body.message) || ("HTTP " + res.status));
    return body;
  }

  function field(obj, path) {
    return path.split(".").reduce((o, k) => (o == null ? undefined : o[k]), obj);
  }

  function format(kind, v, currency) {
    if (v === null) return "—";
    switch (kind) {
      case "int": return Math.round(v).toLocaleString("en-US");
      case "pct": return (v * 100).toFixed(1) + " %";
      case "ms": return v >= 1000 ? (v / 1000).toFixed(2) + " s" : Math.round(v) + " ms";
      case "money": {
        const digits = v !== 0 && Math.abs(v) < 10 ? 4 : 2;
        try {
          return new Intl.NumberFormat("en-US", { style: "currency", currency, minimumFractionDigits: 2, maximumFractionDigits: digits }).format(v);
        } catch (_) {
          return v.toFixed(digits) + " " + currency;
        }
      }
      default: return String(v);
    }
  }

  function status(message) {
    const el = $("status");
    el.hidden = !message;
    el.textContent = message || "";
  }

  function askForToken(why) {
    clearInterval(state.timer);
    document.body.dataset.state = "login";
    $("login").hidden = false;
    $("today").hidden = true;
    $("history").hidden = true;
    $("login-why").textContent = sessionStorage.getItem(TOKEN_KEY)
      ? "That token was refused: " + why
      : "This server asks for a token to show its figures.";
    $("token").focus();
  }

  function renderFigures(summary) {
    const box = $("figures");
    box.replaceChildren();
    const currency = field(summary, "spend.currency") || "USD";
    for (const [path, label, kind] of FIGURES) {
      const v = field(summary, path);
      if (v === undefined) continue;
      const card = document.createElement("div");
      card.className = "figure";
      card.dataset.figure = path;
      card.dataset.value = v === null ? "null" : String(v);
      const l = document.createElement("div");
      l.className = "label";
      l.textContent = label;
      const value = document.createElement("div");
      value.className = "value";
      value.textContent = format(kind, v, currency);
      card.append(l, value);
      if (path.startsWith("spend.") && summary.spend && summary.spend.complete === false) {
        const note = document.createElement("div");
        note.className = "note";
        note.textContent = "incomplete: unpriced tokens";
        card.append(note);
      }
      box.append(card);
    }
    $("generated").textContent = "as of " + new Date(summary.generated_at).toLocaleTimeString() +
      (summary.timezone ? " · " + summary.timezone : "");
  }

  function color(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || "#888";
  }

  function chartOptions(def, width, step) {
    const bars = def.per && uPlot.paths && uPlot.paths.bars ? uPlot.paths.bars({ size: [0.7, 40] }) : undefined;
    const axis = { stroke: color("--muted"), grid: { stroke: color("--line"), width: 1 }, ticks: { stroke: color("--line"), width: 1 } };
    return {
      width,
      height: 180,
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
      axes: [Object.assign({}, axis), Object.assign({ size: 50 }, axis)],
      series: [{}].concat(def.series.map(([, label, c]) => ({
        label,
        stroke: color(c),
        width: 2,
        fill: def.per ? color(c) + "55" : undefined,
        paths: bars,
        points: { show: !def.per, size: 4 },
        spanGaps: false,
        value: (u, v) => (v == null ? "—" : (def.id === "spend" ? v.toFixed(4) : Math.round(v * 100) / 100)),
      }))),
    };
  }

  function renderCharts(data) {
    const box = $("charts");
    const per = data.step_seconds >= 86400 ? "per day" : "per hour";
    $("step").textContent = "last " + data.range + ", " + per;
    for (const def of CHARTS) {
      let entry = state.charts[def.id];
      if (!entry) {
        const card = document.createElement("div");
        card.className = "chart";
        card.dataset.chart = def.id;
        const h = document.createElement("h3");
        const plot = document.createElement("div");
        plot.className = "plot";
        card.append(h, plot);
        box.append(card);
        entry = state.charts[def.id] = { card, h, plot, u: null, step: 0 };
      }
      entry.h.textContent = def.title + (def.per ? " " + per : "") + (def.id === "spend" ? ", " + data.currency : "");
      const columns = [data.times].concat(def.series.map(([key]) => data.series[key] || data.times.map(() => null)));
      const points = columns.slice(1).reduce((n, col) => n + col.filter((v) => v != null).length, 0);
      entry.card.dataset.points = String(points);
      const width = Math.max(200, entry.plot.clientWidth || entry.card.clientWidth - 16);
      if (!entry.u || entry.step !== data.step_seconds) {
        if (entry.u) entry.u.destroy();
        entry.u = new uPlot(chartOptions(def, width, data.step_seconds), columns, entry.plot);
        entry.step = data.step_seconds;
      } else {
        entry.u.setData(columns);
      }
    }
  }

  function fillPicker(summary) {
    const bots = summary.bots ? summary.bots.map((b) => b.bot) : [summary.bot];
    const select = $("bot");
    select.replaceChildren(...bots.map((b) => {
      const o = document.createElement("option");
      o.value = b;
      o.textContent = b;
      return o;
    }));
    if (!state.bot || !bots.includes(state.bot)) state.bot = bots[0];
    select.value = state.bot;
    select.disabled = bots.length < 2;
    return bots.length > 0;
  }

  async function refresh() {
    try {
      const [summary, charts] = await Promise.all([
        api("/v1/summary?bot=" + encodeURIComponent(state.bot)),
        api("/v1/charts?bot=" + encodeURIComponent(state.bot) + "&range=" + state.range),
      ]);
      state.summary = summary;
      state.data = charts;
      renderFigures(summary);
      renderCharts(charts);
      status("");
      state.refreshes += 1;
      document.body.dataset.refreshes = String(state.refreshes);
      document.body.dataset.state = "ready";
    } catch (e) {
      if (e instanceof Unauthorized) return askForToken(e.message);
      status("Could not refresh: " + e.message);
    }
  }

  async function start() {
    $("login").hidden = true;
    $("today").hidden = false;
    $("history").hidden = false;
    $("signout").hidden = !sessionStorage.getItem(TOKEN_KEY);
    try {
      const all = await api("/v1/summary");
      if (!fillPicker(all)) {
        status("No bots are configured yet: start botmetrics with --tokens bot=token.");
        document.body.dataset.state = "empty";
        return;
      }
    } catch (e) {
      if (e instanceof Unauthorized) return askForToken(e.message);
      status("Could not load: " + e.message);
      return;
    }
    await refresh();
    clearInterval(state.timer);
    state.timer = setInterval(refresh, refreshSeconds * 1000);
  }

  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    start();
  });
  $("signout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    location.reload();
  });
  $("bot").addEventListener("change", (ev) => {
    state.bot = ev.target.value;
    refresh();
  });
  for (const b of document.querySelectorAll("#ranges button")) {
    b.addEventListener("click", () => {
      state.range = b.dataset.range;
      for (const other of document.querySelectorAll("#ranges button")) {
        other.setAttribute("aria-pressed", String(other === b));
      }
      refresh();
    });
  }
  // Charts follow the width of their card (a phone turned sideways) and
  // the colours of the scheme (dark mode switched while open).
  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => {
      for (const entry of Object.values(state.charts)) {
        if (entry.u) entry.u.setSize({ width: Math.max(200, entry.plot.clientWidth), height: 180 });
      }
    }, 100);
  });
  window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => {
    for (const entry of Object.values(state.charts)) {
      if (entry.u) entry.u.destroy();
      entry.u = null;
    }
    if (state.data) renderCharts(state.data);
  });
  start();
})();
