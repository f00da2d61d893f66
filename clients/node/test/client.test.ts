/**
 * The client (BotMetrics) against the real botmetrics server, and against
 * servers that are down, lose answers or never answer. Each test starts the
 * server binary on a free port with its own SQLite file and data dir and
 * reads the results back from /metrics (rendered fresh: --metrics-cache-ttl 0s).
 */

import assert from "node:assert/strict";
import { createServer } from "node:http";
import { test } from "node:test";

import { BotMetrics, backoffDelays } from "botmetrics";

import { BOT, HangingServer, Server, TOKEN, haveBinary, recordingLogger, sleep } from "./helpers.js";

const quiet = { logger: null };

test("batching sends few requests and counts every event", async (t) => {
  if (!haveBinary(t)) return;
  const server = await Server.forTest(t);
  const m = new BotMetrics(server.url, TOKEN, { batchSize: 100, flushIntervalMs: 60_000, ...quiet });
  for (let i = 0; i < 1000; i++) m.message(i % 37, "user", { dbQueries: 3 });
  assert.equal(m.pending, 1000);
  assert.equal(await m.flush(20_000), true);
  assert.equal(await m.close(), true);
  assert.deepEqual([m.sent, m.dropped, m.rejected, m.retries, m.duplicates], [1000, 0, 0, 0, 0]);
  assert.ok(m.requests <= 10, `1000 events in batches of 100, ${m.requests} requests`);
  assert.equal(await server.value("bot_messages_total", { role: "user" }), 1000);
  assert.equal(await server.value("botmetrics_events_accepted_total"), 1000);
  assert.equal(await server.value("bot_db_queries_per_message_sum"), 3000);
});

test("a partial batch is sent after the flush interval", async (t) => {
  if (!haveBinary(t)) return;
  const server = await Server.forTest(t);
  const m = new BotMetrics(server.url, TOKEN, { batchSize: 100, flushIntervalMs: 200, ...quiet });
  for (let i = 0; i < 5; i++) m.userRegistered(i);
  await sleep(1000); // no flush(): the timer alone sends it
  assert.deepEqual([m.sent, m.requests], [5, 1]);
  await m.close();
  assert.equal(await server.value("bot_users_registered_total"), 5);
});

test("retry after a server restart counts everything once", async (t) => {
  if (!haveBinary(t)) return;
  const server = await Server.forTest(t);
  const m = new BotMetrics(server.url, TOKEN, { batchSize: 50, flushIntervalMs: 100, maxBackoffMs: 500, ...quiet });
  for (let i = 0; i < 120; i++) m.custom("before_restart", { userId: i });
  assert.equal(await m.flush(10_000), true);

  await server.stop();
  for (let i = 0; i < 300; i++) m.custom("during_outage", { userId: i });
  await sleep(1500); // the sender fails and backs off meanwhile
  assert.deepEqual([m.pending, m.sent], [300, 120]);
  assert.ok(m.retries >= 1, "attempts failed during the outage");

  await server.start(); // same port, same database
  assert.equal(await m.flush(20_000), true, "events still pending after the restart");
  assert.equal(await m.close(), true);
  assert.deepEqual([m.sent, m.dropped, m.rejected], [420, 0, 0]);
  // The first 120 were restored from the database, not sent again.
  assert.equal(await server.value("bot_custom_events_total", { name: "before_restart" }), 120);
  assert.equal(await server.value("bot_custom_events_total", { name: "during_outage" }), 300);
});

test("a retried batch whose answer was lost keeps its event_ids and is counted once", async (t) => {
  if (!haveBinary(t)) return;
  const server = await Server.forTest(t);
  // A proxy in front of the real server: the first POST reaches the
  // server, which counts it, and the client's connection is cut before
  // the answer. Every request body is kept.
  const bodies: string[] = [];
  const proxy = createServer(async (req, res) => {
    const chunks: Buffer[] = [];
    for await (const c of req) chunks.push(c as Buffer);
    const body = Buffer.concat(chunks).toString("utf8");
    const r = await fetch(server.url + (req.url ?? "/"), {
      method: req.method,
      headers: { authorization: String(req.headers.authorization), "content-type": "application/json" },
      body: req.method === "POST" ? body : undefined,
    });
    const answer = await r.text();
    if (req.method === "POST") bodies.push(body);
    if (req.method === "POST" && bodies.length === 1) {
      req.socket.destroy(); // counted by the server; the client never hears so
      return;
    }
    res.writeHead(r.status, { "content-type": "application/json" });
    res.end(answer);
  });
  await new Promise<void>((r) => proxy.listen(0, "127.0.0.1", r));
  t.after(() => new Promise<void>((r) => { proxy.closeAllConnections(); proxy.close(() => r()); }));
  const url = `http://127.0.0.1:${(proxy.address() as { port: number }).port}`;

  const m = new BotMetrics(url, TOKEN, { batchSize: 100, flushIntervalMs: 100, maxBackoffMs: 200, ...quiet });
  for (let i = 0; i < 80; i++) m.message(i, "user");
  assert.equal(await m.flush(10_000), true);
  assert.equal(await m.close(), true);
  assert.deepEqual([m.sent, m.retries, m.duplicates], [80, 1, 80]);
  assert.equal(bodies.length, 2);
  const ids = (body: string) => (JSON.parse(body) as { event_id: string }[]).map((e) => e.event_id);
  assert.deepEqual(ids(bodies[1]), ids(bodies[0]), "the retry sends the same event_ids");
  assert.equal(new Set(ids(bodies[0])).size, 80, "every event has its own id");
  assert.equal(await server.value("bot_messages_total", { role: "user" }), 80);
  assert.equal(await server.value("botmetrics_events_duplicate_total"), 80);
});

test("a full queue drops the oldest and counts them", async (t) => {
  if (!haveBinary(t)) return;
  const server = await Server.forTest(t);
  await server.stop();
  const m = new BotMetrics(server.url, TOKEN, { batchSize: 20, flushIntervalMs: 100, maxQueue: 50, maxBackoffMs: 300, ...quiet });
  for (let i = 1; i <= 80; i++) m.custom("queued", { value: i }); // the queue keeps the newest 50
  assert.deepEqual([m.pending, m.dropped], [50, 30]);
  await sleep(500); // failing attempts meanwhile lose nothing more
  assert.deepEqual([m.pending, m.dropped], [50, 30]);
  assert.ok(m.retries >= 1);
  await server.start();
  assert.equal(await m.flush(20_000), true);
  assert.equal(await m.close(), false, "close() is false: events were dropped");
  assert.deepEqual([m.sent, m.dropped], [50, 30]);
  let sum = 0;
  for (let i = 31; i <= 80; i++) sum += i;
  assert.equal(await server.value("bot_custom_events_total", { name: "queued" }), sum);
});

test("an invalid event is dropped alone and the rest delivered", async (t) => {
  if (!haveBinary(t)) return;
  const server = await Server.forTest(t);
  const log = recordingLogger();
  const m = new BotMetrics(server.url, TOKEN, { batchSize: 10, flushIntervalMs: 100, logger: log });
  m.error("llm_timeout");
  m.error("not a valid kind!"); // 422: names are [A-Za-z0-9_.:-]
  m.error("db");
  assert.equal(await m.flush(10_000), true);
  assert.equal(await m.close(), false);
  assert.deepEqual([m.sent, m.rejected], [2, 1]);
  assert.match(log.lines[0]!.message, /dropped invalid error event/);
  assert.equal(await server.value("bot_errors_total", { kind: "llm_timeout" }), 1);
  assert.equal(await server.value("bot_errors_total", { kind: "db" }), 1);
});

test("close() is true only when every event was delivered", async (t) => {
  if (!haveBinary(t)) return;
  const server = await Server.forTest(t);
  const log = recordingLogger();
  const wrong = new BotMetrics(server.url, "not-the-token", { batchSize: 10, flushIntervalMs: 50, logger: log });
  for (let i = 0; i < 25; i++) wrong.message(i, "user");
  assert.equal(await wrong.close(10_000), false);
  assert.ok(log.lines.some((l) => l.level === "error" && l.message.includes("(401)")), JSON.stringify(log.lines));
  assert.deepEqual([wrong.sent, wrong.rejected, wrong.pending], [0, 25, 0]);
  assert.equal(await server.value("bot_messages_total", { role: "user" }), 0);

  const right = new BotMetrics(server.url, TOKEN, { batchSize: 10, flushIntervalMs: 50, ...quiet });
  for (let i = 0; i < 25; i++) right.message(i, "user");
  assert.equal(await right.close(10_000), true);
  assert.deepEqual([right.sent, right.rejected, right.dropped], [25, 0, 0]);
  right.message(99, "user"); // after close(): dropped and counted, never thrown
  assert.equal(right.dropped, 1);
  assert.equal(await server.value("bot_messages_total", { role: "user" }), 25);
});

class LLMTimeout extends Error {
  override name = "TimeoutError";
}

test("every helper sends a valid event", async (t) => {
  if (!haveBinary(t)) return;
  const server = await Server.forTest(t);
  const m = new BotMetrics(server.url, TOKEN, { flushIntervalMs: 100, ...quiet });
  m.message(1, "user", { dbQueries: 4, chatType: "private" });
  m.message(1, "assistant");
  m.response(1, "success", 1234.5, { model: "gpt-4o-mini", tokens: [100, 20] });
  m.response("user-2", "timeout", 30000, { tokens: { prompt: 50, completion: 0 } });
  const answer = await m.measureResponse(1, async (call) => {
    call.tokens = [10, 5];
    return "an answer";
  }, { model: "gpt-4o" });
  assert.equal(answer, "an answer");
  await assert.rejects(m.measureResponse(1, async () => { throw new LLMTimeout("slow"); }, { model: "gpt-4o" }), LLMTimeout);
  await assert.rejects(m.measureResponse(1, async () => { throw new Error("500"); }), /500/);
  m.cache(true, { cache: "llm_answer" });
  m.cache("miss");
  m.userRegistered(1);
  m.consent(1, true);
  m.consent(2, false);
  m.limitReached(1);
  m.error("llm_api", { userId: 1 });
  m.custom("voice_message");
  m.custom("payment", { value: 2.5, userId: 1 });
  m.response(1, "success", 900, {
    model: "gpt-4o-mini", tokens: [100, 20], cachedTokens: 60, cacheWriteTokens: 10, reasoningTokens: 5,
    ttftMs: 300, provider: "openai", cost: 0.002,
  });
  m.feedback(1, 1);
  m.feedback(2, 4, { scale: 5, reason: "helpful" });
  m.track("custom", { name: "tracked", value: undefined, user_id: null });
  assert.equal(await m.flush(10_000), true);
  const text = await m.summaryText();
  const summary = await m.summary(BOT);
  assert.equal(await m.close(), true);

  assert.deepEqual([m.sent, m.rejected], [20, 0]);
  // The text is the server's, relayed as it is.
  assert.equal(text, await server.get("/v1/summary?format=text"));
  assert.ok(text.split("\n").includes("All time: 2 messages, 1 registered user, 1 error reported"), text);
  assert.equal(summary.bot, BOT);
  assert.deepEqual(summary.messages, { total: 2, today: 2 });
  assert.equal((summary.responses as { total: number }).total, 6);
  assert.deepEqual(summary.errors, { total: 1 });
  const v = (name: string, labels: Record<string, string> = {}) => server.value(name, labels);
  assert.equal(await v("bot_responses_total", { status: "success" }), 3);
  assert.equal(await v("bot_responses_total", { status: "timeout" }), 2);
  assert.equal(await v("bot_responses_total", { status: "error" }), 1);
  assert.equal(await v("bot_llm_cost_total", { model: "gpt-4o-mini", source: "reported" }), 0.002);
  assert.equal(await v("bot_llm_tokens_total", { model: "gpt-4o-mini", kind: "cache_write" }), 10);
  assert.equal(await v("bot_llm_tokens_total", { model: "gpt-4o-mini", kind: "prompt" }), 200);
  assert.equal(await v("bot_llm_tokens_total", { model: "gpt-4o", kind: "completion" }), 5);
  assert.equal(await v("bot_llm_ttft_seconds_count"), 1);
  assert.equal(await v("bot_feedback_total", { score: "+1" }), 1);
  assert.equal(await v("bot_feedback_total", { score: "4" }), 1);
  assert.equal(await v("bot_cache_requests_total", { cache: "llm_answer", result: "hit" }), 1);
  assert.equal(await v("bot_consent_total", { decision: "denied" }), 1);
  assert.equal(await v("bot_limit_reached_total"), 1);
  assert.equal(await v("bot_custom_events_total", { name: "payment" }), 2.5);
  assert.equal(await v("bot_custom_events_total", { name: "tracked" }), 1);
  assert.equal(await v("bot_db_queries_per_message_sum"), 4);
});

test("the backoff sequence doubles to the cap with jitter in the upper half", () => {
  const draws = [0, 1, 0.5, 0.25, 0.75, 0.1, 0.9];
  let i = 0;
  const delays = backoffDelays(250, 4000, () => draws[i++]!);
  const steps = [250, 500, 1000, 2000, 4000, 4000, 4000];
  for (let k = 0; k < steps.length; k++) assert.equal(delays.next().value, steps[k]! * (0.5 + 0.5 * draws[k]!));
});

test("retries wait the backoff sequence between real attempts", async (t) => {
  const down = await new HangingServer(false).start();
  t.after(() => down.close());
  const log = recordingLogger();
  const m = new BotMetrics(down.url, TOKEN, { flushIntervalMs: 50, initialBackoffMs: 200, maxBackoffMs: 800, logger: log });
  m.message(1);
  while (down.accepted.length < 5) await sleep(20);
  assert.equal(await m.close(0), false);
  const waits = log.lines
    .map((l) => /retrying in ([0-9.]+)s/.exec(l.message))
    .filter((x) => x !== null)
    .map((x) => Number(x[1]) * 1000)
    .slice(0, 4);
  assert.equal(waits.length, 4, JSON.stringify(log.lines));
  [200, 400, 800, 800].forEach((step, k) => {
    assert.ok(waits[k]! >= step * 0.5 - 1 && waits[k]! <= step + 1, `wait ${waits[k]} for step ${step}`);
  });
  const gaps = down.accepted.slice(1, 5).map((at, k) => at - down.accepted[k]!);
  gaps.forEach((gap, k) => assert.ok(gap >= waits[k]! - 2, `gap ${gap} shorter than the wait ${waits[k]}`));
  assert.ok(m.retries >= 4);
  assert.equal(m.sent, 0);
});

test("helpers return at once while the server holds the request, and close() gives up on it", async (t) => {
  const wedged = await new HangingServer(true).start();
  t.after(() => wedged.close());
  const m = new BotMetrics(wedged.url, TOKEN, { batchSize: 10, flushIntervalMs: 50, timeoutMs: 30_000, ...quiet });
  for (let i = 0; i < 10; i++) m.message(i);
  while (wedged.accepted.length === 0) await sleep(10);
  const started = performance.now();
  for (let i = 0; i < 1000; i++) m.message(i, "assistant");
  const tracking = performance.now() - started;
  assert.deepEqual([m.pending, m.requests, m.retries, m.sent], [1010, 1, 0, 0]);
  assert.ok(tracking < 1000, `1000 helpers took ${tracking} ms`);
  const closing = performance.now();
  assert.equal(await m.close(200), false);
  const took = performance.now() - closing;
  assert.ok(took >= 190 && took < 2000, `close(200) took ${took} ms`);
  await sleep(100);
  // The abandoned request was aborted, not retried.
  assert.deepEqual([m.requests, m.retries, wedged.requests], [1, 0, 1]);
});

test("the constructor refuses nonsense options", () => {
  assert.throws(() => new BotMetrics("http://x", TOKEN, { batchSize: 0 }), RangeError);
  assert.throws(() => new BotMetrics("http://x", TOKEN, { flushIntervalMs: -1 }), RangeError);
});
