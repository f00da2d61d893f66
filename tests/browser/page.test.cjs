// The built-in page in a real, headless Chromium (Debian's, driven by
// playwright-core), as a person would see it. Run by tests/browser/ci.sh:
//
//   BOTMETRICS_BIN=target/debug/botmetrics tests/browser/ci.sh
//
// 1. An open server with two bots and a scripted day of events: the page
//    lists both bots, its figures equal /v1/summary's, every chart has
//    points, and new events reach figures and charts without a reload. It
//    loads nothing from anywhere but the server. Desktop (light) and phone
//    (dark) screenshots are saved to $SCREENSHOTS.
// 2. A server with --metrics-token: the page asks for a token, refuses a
//    wrong one, a bot's own token sees that bot only, the metrics token
//    every bot, and the token lives in sessionStorage only.
"use strict";
const assert = require("node:assert/strict");
const { spawn } = require("node:child_process");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const { chromium } = require("playwright-core");

const BIN = process.env.BOTMETRICS_BIN;
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const SHOTS = process.env.SCREENSHOTS;
assert.ok(BIN, "BOTMETRICS_BIN must name the server binary");
// Flags for a closed network: nothing phones home, nothing updates.
const ARGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
  "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
  "--disable-default-apps", "--disable-extensions", "--metrics-recording-only",
];

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Starts the server on port 0 and reads its port from the log. */
async function startServer(extra) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "botmetrics-browser-"));
  const args = ["--listen", "127.0.0.1:0", "--database-url", `sqlite://${dir}/bm.db`,
    "--history-interval", "1s", "--flush-interval", "1s", "--summary-cache-ttl", "0s",
    "--log-format", "text", ...extra];
  const proc = spawn(BIN, args, { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, RUST_LOG: "info" } });
  let log = "";
  const port = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("no port in 20 s:\n" + log)), 20000);
    const read = (chunk) => {
      log += chunk;
      const m = log.match(/botmetrics serving listen=127\.0\.0\.1:(\d+)/);
      if (m) { clearTimeout(timer); resolve(Number(m[1])); }
    };
    proc.stdout.on("data", read);
    proc.stderr.on("data", read);
    proc.on("exit", (code) => reject(new Error(`botmetrics exited with ${code}:\n${log}`)));
  });
  const base = `http://127.0.0.1:${port}`;
  return {
    base,
    log: () => log,
    async stop() {
      proc.kill("SIGTERM");
      await new Promise((r) => proc.exitCode !== null ? r() : proc.on("exit", r));
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

async function getJson(url, token) {
  const res = await fetch(url, { headers: token ? { Authorization: `Bearer ${token}` } : {} });
  assert.equal(res.status, 200, `${url}: ${res.status} ${await res.clone().text()}`);
  return res.json();
}

async function post(base, token, events) {
  const res = await fetch(`${base}/v1/events`, {
    method: "POST",
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
    body: JSON.stringify(events),
  });
  assert.equal(res.status, 202, await res.text());
}

/** A day of a small AI bot, its events spread from midnight (UTC) to now. */
function scriptedDay(users, seed) {
  const now = Math.floor(Date.now() / 1000);
  const midnight = now - (now % 86400);
  const span = Math.max(60, now - midnight - 60);
  const events = [];
  let x = seed;
  const rand = () => ((x = (x * 1103515245 + 12345) % 2147483648) / 2147483648);
  for (let i = 0; i < users * 4; i++) {
    const ts = midnight + Math.floor((i / (users * 4)) * span);
    const user = 1 + Math.floor(rand() * users);
    events.push({ type: "message", user_id: user, role: "user", ts });
    const status = i % 17 === 0 ? "error" : i % 29 === 0 ? "timeout" : "success";
    events.push({ type: "response", user_id: user, status, ts, duration_ms: 300 + Math.floor(rand() * 4000),
      model: "gpt-4o-mini", tokens: { prompt: 800, completion: 200 } });
    events.push({ type: "message", user_id: user, role: "assistant", ts });
    events.push({ type: "cache", user_id: user, result: rand() < 0.6 ? "hit" : "miss", ts });
    if (i % 11 === 0) events.push({ type: "error", user_id: user, kind: "db_timeout", ts });
    if (i < users / 2) events.push({ type: "user_registered", user_id: user, ts });
  }
  return events;
}

/** Waits until `check()` is truthy, or fails after `ms`. */
async function until(what, check, ms = 20000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(200);
  }
}

const sum = (xs) => xs.reduce((a, v) => a + (v || 0), 0);

/** Opens the page in a fresh context that fails on any request elsewhere. */
async function open(browser, base, options = {}) {
  const context = await browser.newContext(options);
  const page = await context.newPage();
  const problems = [];
  page.on("console", (m) => { if (m.type() === "error") problems.push("console: " + m.text()); });
  page.on("pageerror", (e) => problems.push("page error: " + e.message));
  await context.route("**/*", (route) => {
    const url = route.request().url();
    if (url.startsWith(base + "/")) return route.continue();
    problems.push("request outside the server: " + url);
    return route.abort();
  });
  return { context, page, problems };
}

async function figuresOf(page) {
  return page.$$eval("[data-figure]", (els) => els.map((e) => ({
    path: e.dataset.figure, value: e.dataset.value, text: e.querySelector(".value").textContent,
  })));
}

const field = (obj, p) => p.split(".").reduce((o, k) => (o == null ? undefined : o[k]), obj);

async function openServer(browser) {
  const server = await startServer(["--tokens", "alpha=tok-alpha,beta=tok-beta"]);
  try {
    const day = scriptedDay(40, 7);
    const messages = day.filter((e) => e.type === "message").length;
    await post(server.base, "tok-alpha", day);
    await post(server.base, "tok-beta", scriptedDay(5, 3));
    await until("history of the scripted day", async () => {
      const c = await getJson(`${server.base}/v1/charts?bot=alpha&range=24h`);
      return sum(c.series.messages) === messages;
    });

    const { context, page, problems } = await open(browser, server.base, { viewport: { width: 1280, height: 900 }, colorScheme: "light" });
    const requests = [];
    page.on("request", (r) => requests.push(r.url()));
    await page.goto(`${server.base}/?refresh=1`);
    await page.waitForSelector("body[data-state=ready]", { timeout: 20000 });
    assert.deepEqual(await page.$$eval("#bot option", (os) => os.map((o) => o.value)), ["alpha", "beta"]);
    assert.equal(await page.isVisible("#login"), false, "no token prompt on an open server");
    // The document and its four assets, then the API.
    const assets = requests.filter((u) => !u.includes("/v1/"));
    assert.equal(assets.length, 5, "requests for the page: " + assets.join(", "));

    // The figures are the summary's.
    const summary = await getJson(`${server.base}/v1/summary?bot=alpha`);
    const figures = await figuresOf(page);
    const shown = figures.map((f) => f.path);
    for (const want of ["messages.today", "users.active_1d", "users.active_7d", "users.active_30d",
      "spend.today", "spend.month", "responses.success_rate", "responses.p50_ms", "responses.p95_ms",
      "cache.hit_rate", "errors.total"]) {
      assert.ok(shown.includes(want), `figure ${want} is not shown (shown: ${shown})`);
    }
    for (const f of figures) {
      const v = field(summary, f.path);
      assert.equal(f.value, v === null ? "null" : String(v), `figure ${f.path}`);
    }
    const byPath = Object.fromEntries(figures.map((f) => [f.path, f]));
    assert.equal(summary.messages.today, messages);
    assert.equal(byPath["messages.today"].text, messages.toLocaleString("en-US"));
    assert.equal(byPath["users.active_1d"].text, String(summary.users.active_1d));
    assert.equal(byPath["responses.success_rate"].text, (summary.responses.success_rate * 100).toFixed(1) + " %");
    assert.ok(summary.errors.total > 0 && summary.spend.today > 0 && summary.responses.p95_ms > 0);

    // Every chart has points, drawn on a canvas of real size.
    const charts = await page.$$eval("[data-chart]", (els) => els.map((e) => {
      const c = e.querySelector("canvas");
      return { id: e.dataset.chart, points: Number(e.dataset.points), w: c ? c.width : 0, h: c ? c.height : 0 };
    }));
    assert.deepEqual(charts.map((c) => c.id), ["messages", "active", "latency", "errors", "spend"]);
    for (const c of charts) {
      assert.ok(c.points > 0, `chart ${c.id} has no points`);
      assert.ok(c.w > 100 && c.h > 50, `chart ${c.id} is not drawn (${c.w}x${c.h})`);
    }
    const drawn = await page.evaluate(() => window.botmetrics.data.series);
    assert.equal(sum(drawn.messages), messages, "messages chart");
    for (const key of ["active_users", "latency_p50_ms", "latency_p95_ms", "errors", "failed_responses", "spend"]) {
      assert.ok(sum(drawn[key]) > 0, `chart series ${key} has nothing above 0`);
    }

    // New events reach the figures and the charts without a reload.
    await page.evaluate(() => { window.notReloaded = true; });
    const more = Array.from({ length: 6 }, (_, i) => ({ type: "message", user_id: 1000 + i, role: "user" }));
    await post(server.base, "tok-alpha", more);
    await until("the new messages on the page", () => page.evaluate((n) =>
      document.querySelector('[data-figure="messages.today"]').dataset.value === String(n) &&
      window.botmetrics.data.series.messages.reduce((a, v) => a + (v || 0), 0) === n, messages + 6));
    assert.equal(await page.evaluate(() => window.notReloaded), true, "the page reloaded");

    // Another bot, another range.
    await page.selectOption("#bot", "beta");
    await page.click('#ranges button[data-range="7d"]');
    await until("beta's week", () => page.evaluate(() =>
      window.botmetrics.data.bot === "beta" && window.botmetrics.data.range === "7d" &&
      document.querySelector('[data-figure="messages.today"]').dataset.value === "40"));
    await page.selectOption("#bot", "alpha");
    await page.click('#ranges button[data-range="24h"]');
    await until("alpha's day again", () => page.evaluate(() =>
      window.botmetrics.data.bot === "alpha" && window.botmetrics.data.range === "24h"));

    if (SHOTS) {
      fs.mkdirSync(SHOTS, { recursive: true });
      await page.screenshot({ path: path.join(SHOTS, "page-desktop.png"), fullPage: true });
    }
    assert.deepEqual(problems, []);
    await context.close();

    // A phone in dark mode: one column, nothing wider than the screen.
    const phone = await open(browser, server.base, {
      viewport: { width: 390, height: 844 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true, colorScheme: "dark",
    });
    await phone.page.goto(server.base + "/");
    await phone.page.waitForSelector("body[data-state=ready]", { timeout: 20000 });
    const widths = await phone.page.evaluate(() => ({
      doc: document.documentElement.scrollWidth, vw: window.innerWidth,
      bg: getComputedStyle(document.body).backgroundColor,
    }));
    assert.ok(widths.doc <= widths.vw, `the page is wider than the phone: ${widths.doc} > ${widths.vw}`);
    assert.notEqual(widths.bg, "rgb(247, 247, 248)", "dark mode is not applied");
    if (SHOTS) await phone.page.screenshot({ path: path.join(SHOTS, "page-phone.png"), fullPage: true });
    assert.deepEqual(phone.problems, []);
    await phone.context.close();
  } catch (e) {
    console.error("--- server log\n" + server.log().slice(-4000));
    throw e;
  } finally {
    await server.stop();
  }
}

async function guardedServer(browser) {
  const server = await startServer(["--tokens", "alpha=tok-alpha,beta=tok-beta", "--metrics-token", "metrics-secret"]);
  try {
    await post(server.base, "tok-alpha", scriptedDay(10, 5));
    await post(server.base, "tok-beta", scriptedDay(3, 9));
    const { context, page, problems } = await open(browser, server.base);
    await page.goto(server.base + "/");
    await page.waitForSelector("body[data-state=login]", { timeout: 20000 });
    assert.equal(await page.isVisible("#login"), true, "the token prompt");
    assert.equal(await page.isVisible("#today"), false, "figures without a token");

    await page.fill("#token", "not-a-token");
    await page.click("#login button[type=submit]");
    await until("the refusal", () => page.evaluate(() =>
      document.body.dataset.state === "login" && /refused/.test(document.getElementById("login-why").textContent)));

    // A bot's own token: its bot only.
    await page.fill("#token", "tok-alpha");
    await page.click("#login button[type=submit]");
    await page.waitForSelector("body[data-state=ready]", { timeout: 20000 });
    assert.deepEqual(await page.$$eval("#bot option", (os) => os.map((o) => o.value)), ["alpha"]);
    const own = await getJson(`${server.base}/v1/summary`, "tok-alpha");
    for (const f of await figuresOf(page)) {
      const v = field(own, f.path);
      assert.equal(f.value, v === null ? "null" : String(v), `figure ${f.path} under alpha's token`);
    }
    const stored = await page.evaluate(() => ({ session: sessionStorage.length, local: localStorage.length, cookie: document.cookie }));
    assert.deepEqual(stored, { session: 1, local: 0, cookie: "" }, "the token is kept in sessionStorage only");
    assert.deepEqual(problems.filter((p) => !/401/.test(p)), []);
    await context.close();

    // A new session asks again; the metrics token sees every bot.
    const fresh = await open(browser, server.base);
    await fresh.page.goto(server.base + "/");
    await fresh.page.waitForSelector("body[data-state=login]", { timeout: 20000 });
    await fresh.page.fill("#token", "metrics-secret");
    await fresh.page.click("#login button[type=submit]");
    await fresh.page.waitForSelector("body[data-state=ready]", { timeout: 20000 });
    assert.deepEqual(await fresh.page.$$eval("#bot option", (os) => os.map((o) => o.value)), ["alpha", "beta"]);
    await fresh.context.close();
  } catch (e) {
    console.error("--- server log\n" + server.log().slice(-4000));
    throw e;
  } finally {
    await server.stop();
  }
}

(async () => {
  const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ARGS });
  try {
    await openServer(browser);
    console.log("ok: open server (figures, charts, live update, phone, dark mode)");
    await guardedServer(browser);
    console.log("ok: --metrics-token (prompt, bot token sees one bot, session only)");
  } finally {
    await browser.close();
  }
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
