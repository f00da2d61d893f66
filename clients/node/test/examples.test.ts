/**
 * The README's Node examples, as written: README.md's "Node.js bots"
 * section holds examples/*.mjs verbatim, and each runs as a real bot
 * process: long polling through grammY's or Telegraf's own HTTP client
 * against a stand-in for the Bot API on loopback (TELEGRAM_API_ROOT, which
 * the examples read for a local Bot API server), reporting to the real
 * server, stopped with SIGTERM. Counts are exact.
 */

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import { ANN, ANN_CHAT, BOB, BOB_CHAT, CLIENT_DIR, FakeTelegram, GROUP, REPO, Server, TOKEN, haveBinary, messageUpdate, sleep } from "./helpers.js";

const EXAMPLES = readdirSync(join(CLIENT_DIR, "examples")).filter((f) => f.endsWith(".mjs")).sort();

function nodeSection(): string {
  const readme = readFileSync(join(REPO, "README.md"), "utf8");
  const m = /^## Node\.js bots\n([\s\S]*?)(?=^## )/m.exec(readme);
  assert.ok(m, "README.md has no 'Node.js bots' section");
  return m[1]!;
}

test("the README's Node.js section holds every example verbatim", () => {
  assert.deepEqual(EXAMPLES, ["grammy-bot.mjs", "telegraf-bot.mjs"]);
  const section = nodeSection();
  for (const name of EXAMPLES) {
    const code = readFileSync(join(CLIENT_DIR, "examples", name), "utf8");
    assert.ok(section.includes("```js\n" + code + "```\n"), `README.md does not hold examples/${name} as it is`);
    // The command in its first lines is the one the README gives.
    const command = /^\/\/ {3}(.*)$/m.exec(code)![1]!;
    assert.ok(section.includes(command), `README.md does not give the command ${command}`);
  }
});

for (const name of EXAMPLES) {
  test(`examples/${name} runs as written and counts exactly`, async (t) => {
    if (!haveBinary(t)) return;
    const server = await Server.forTest(t);
    const telegram = await new FakeTelegram().start();
    t.after(() => telegram.close());
    const bot = spawn(process.execPath, [join("examples", name)], {
      cwd: CLIENT_DIR,
      env: {
        ...process.env,
        BOT_TOKEN: "42:TEST",
        BOTMETRICS_URL: server.url,
        BOTMETRICS_TOKEN: TOKEN,
        BOT_ADMIN_IDS: String(ANN.id),
        TELEGRAM_API_ROOT: telegram.url,
      },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let output = "";
    bot.stdout.on("data", (d: Buffer) => (output += d.toString()));
    bot.stderr.on("data", (d: Buffer) => (output += d.toString()));
    const exited = new Promise<number | null>((r) => bot.once("exit", (code) => r(code)));
    t.after(() => void bot.kill("SIGKILL"));

    // One update at a time, each after the answer to the one before.
    const updates = [
      messageUpdate(1, ANN, ANN_CHAT, "/start"),
      messageUpdate(2, ANN, ANN_CHAT, "what is botmetrics?"),
      messageUpdate(3, BOB, GROUP, "hello"),
      messageUpdate(4, ANN, ANN_CHAT, "/metrics"),
      messageUpdate(5, BOB, BOB_CHAT, "/metrics"),
    ];
    for (const [i, update] of updates.entries()) {
      telegram.queue(update);
      const deadline = Date.now() + 20_000;
      while (telegram.sent().length <= i) {
        assert.ok(Date.now() < deadline, `no answer to update ${i + 1}:\n${output}`);
        assert.equal(bot.exitCode, null, `the bot exited:\n${output}`);
        await sleep(20);
      }
    }
    bot.kill("SIGTERM");
    assert.equal(await exited, 0, `the bot did not stop cleanly:\n${output}`);

    const sent = telegram.sent();
    assert.deepEqual(sent.filter((_, i) => i !== 3), [
      "Hello! Ask me anything.", "You said: what is botmetrics?", "You said: hello", "You said: /metrics",
    ]);
    assert.equal(sent[3], await server.get("/v1/summary?format=text"), "/metrics answers with the server's text");
    const v = (metric: string, labels: Record<string, string> = {}) => server.value(metric, labels);
    assert.equal(await v("bot_messages_total", { role: "user" }), 4); // not the admin's /metrics
    assert.equal(await v("bot_messages_total", { role: "assistant" }), 4); // nor its answer
    assert.equal(await v("bot_users_registered_total"), 1);
    assert.equal(await v("bot_responses_total", { status: "success" }), 3);
    assert.equal(await v("bot_llm_tokens_total", { model: "gpt-4o-mini", kind: "prompt" }), 19 + 5 + 8);
    assert.equal(await v("bot_llm_tokens_total", { model: "gpt-4o-mini", kind: "completion" }), 9);
    assert.equal(await v("bot_active_users", { window: "1d" }), 2);
    assert.equal(await v("botmetrics_events_rejected_total"), 0);
  });
}
