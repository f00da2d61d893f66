// What a helper costs the bot's handler: ns per call of metrics.message()
// and metrics.custom(), beside the cheapest possible counting (incrementing
// a field of an object) and building the same event object by hand. The
// sender is kept from running (a flush interval longer than the run and a
// batch larger than the queue), so only the handler's side is measured;
// the queue bound drops the oldest, as it would under a long outage.
//   node clients/node/benchmarks/hot_path.mjs   (after npm ci && npm run build in clients/node)
import { BotMetrics } from "botmetrics";

const N = Number(process.env.N ?? 2_000_000);
const metrics = new BotMetrics("http://127.0.0.1:9", "x", {
  batchSize: 1_000_000, maxQueue: 10_000, flushIntervalMs: 3_600_000, logger: null,
});

function bench(name, fn) {
  for (let i = 0; i < 100_000; i++) fn(i); // warm up the JIT
  const start = process.hrtime.bigint();
  for (let i = 0; i < N; i++) fn(i);
  const ns = Number(process.hrtime.bigint() - start) / N;
  console.log(`${name.padEnd(44)} ${ns.toFixed(1)} ns/call`);
  return ns;
}

const counters = { messages: 0 };
const sink = [];
bench("counter field += 1 (the floor)", () => { counters.messages++; });
bench("event object literal built by hand", (i) => { sink[i & 1023] = { type: "message", event_id: "p-" + i, ts: Date.now() / 1000, role: "user", user_id: i }; });
const m = bench("metrics.message(userId, \"user\")", (i) => metrics.message(i, "user"));
bench("metrics.message(.., { chatType, dbQueries })", (i) => metrics.message(i, "user", { chatType: "private", dbQueries: 3 }));
bench("metrics.custom(name, { userId })", (i) => metrics.custom("voice_message", { userId: i }));
console.log(`per second at that cost: ${(1e9 / m / 1e6).toFixed(1)} million messages on one core`);
console.log(`dropped by the bound meanwhile: ${metrics.dropped}`);
await metrics.close(0);
