/**
 * botmetrics/telegraf in a real Telegraf bot: updates fed through the bot's
 * own handleUpdate, its Telegram client talking real HTTP to a stand-in for
 * the Bot API on loopback (`telegram.apiRoot`), counted by the real server.
 */

import assert from "node:assert/strict";
import { test } from "node:test";

import { Telegraf } from "telegraf";
import { message } from "telegraf/filters";
import { BotMetrics } from "botmetrics";
import { botMetrics } from "botmetrics/telegraf";

import { ANN, ANN_CHAT, BOB, BOB_CHAT, FakeTelegram, GROUP, Server, THE_BOT, TOKEN, haveBinary, messageUpdate } from "./helpers.js";

class LLMDown extends Error {}

test("Telegraf: incoming, outgoing, errors by kind and the admins' /metrics, counted exactly", async (t) => {
  if (!haveBinary(t)) return;
  const server = await Server.forTest(t);
  const telegram = await new FakeTelegram().start();
  t.after(() => telegram.close());
  const metrics = new BotMetrics(server.url, TOKEN, { flushIntervalMs: 50, logger: null });

  const bot = new Telegraf("42:TEST", { telegram: { apiRoot: telegram.url } });
  const caught: unknown[] = [];
  bot.catch((err) => void caught.push(err));
  const queries = new WeakMap<object, number>();
  bot.use(async (ctx, next) => {
    queries.set(ctx, 3); // a session middleware before ours: each update costs 3 queries
    await next();
  });
  bot.use(botMetrics(metrics, { adminIds: [ANN.id], dbQueries: (ctx) => queries.get(ctx) }));
  bot.start(async (ctx) => {
    metrics.userRegistered(ctx.from.id);
    await ctx.reply("Hello!");
  });
  bot.hears("fail please", () => {
    throw new LLMDown("the LLM API answered 500");
  });
  bot.on(message("text"), (ctx) => ctx.reply(`You said: ${ctx.message.text}`));

  // botInfo from the stand-in's getMe, as a real start would get it.
  await bot.handleUpdate(messageUpdate(1, ANN, ANN_CHAT, "/start") as never);
  await bot.handleUpdate(messageUpdate(2, ANN, ANN_CHAT, "what is botmetrics?") as never);
  await bot.handleUpdate(messageUpdate(3, BOB, GROUP, "hello") as never);
  await bot.handleUpdate(messageUpdate(4, ANN, ANN_CHAT, "fail please") as never);
  assert.equal(caught.length, 1);
  assert.ok(caught[0] instanceof LLMDown, "the error reaches bot.catch unchanged");
  assert.equal(await metrics.flush(10_000), true);
  const before = await server.get("/v1/summary?format=text");

  await bot.handleUpdate(messageUpdate(5, ANN, ANN_CHAT, "/metrics") as never);
  await bot.handleUpdate(messageUpdate(6, BOB, BOB_CHAT, "/metrics") as never); // not an admin
  await bot.handleUpdate(messageUpdate(7, ANN, ANN_CHAT, "/metrics@test_bot") as never); // addressed to this bot
  await bot.telegram.sendMessage(ANN.id, "a broadcast, not counted: not attached");
  botMetrics(metrics).attach(bot);
  await bot.telegram.sendMessage(ANN.id, "a broadcast");
  assert.equal(await metrics.close(10_000), true);

  assert.deepEqual(telegram.sent(), [
    "Hello!", "You said: what is botmetrics?", "You said: hello", before, "You said: /metrics", before,
    "a broadcast, not counted: not attached", "a broadcast",
  ]);
  assert.equal(telegram.calls[0]!.method, "getMe");
  const reply = telegram.calls.find((c) => c.payload.text === before)!;
  assert.equal(reply.payload.parse_mode, undefined, "the summary goes as plain text");
  assert.equal(reply.payload.chat_id, ANN.id);
  // 4 in (the failing one included), 3 out.
  assert.ok(before.split("\n").includes("All time: 7 messages, 1 registered user, 1 error reported"), before);

  const v = (name: string, labels: Record<string, string> = {}) => server.value(name, labels);
  // In: /start, question, hello, the failing one, Bob's /metrics; not Ann's two.
  assert.equal(await v("bot_messages_total", { role: "user" }), 5);
  // Out: Hello, question, hello (group), Bob's /metrics, the attached broadcast.
  assert.equal(await v("bot_messages_total", { role: "assistant" }), 5);
  assert.equal(await v("bot_errors_total", { kind: "LLMDown" }), 1);
  assert.equal(await v("bot_users_registered_total"), 1);
  assert.equal(await v("bot_active_users", { window: "1d" }), 2);
  assert.equal(await v("bot_db_queries_per_message_count"), 5);
  assert.equal(await v("bot_db_queries_per_message_sum"), 15);
  assert.equal(metrics.rejected, 0);
  assert.deepEqual(THE_BOT.username, "test_bot");
});
