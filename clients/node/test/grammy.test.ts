/**
 * botmetrics/grammy in a real grammY Bot: updates fed through the bot's own
 * handleUpdate, with an API transformer that answers instead of Telegram
 * (nothing leaves the machine), counted by the real server.
 */

import assert from "node:assert/strict";
import { test } from "node:test";

import { Bot, BotError, type Context, type Transformer } from "grammy";
import { BotMetrics } from "botmetrics";
import { botMetrics } from "botmetrics/grammy";

import { ANN, ANN_CHAT, BOB, BOB_CHAT, GROUP, Server, THE_BOT, TOKEN, haveBinary, messageUpdate } from "./helpers.js";

class LLMDown extends Error {}

interface Call {
  method: string;
  payload: Record<string, unknown>;
}

/** The bot API as Telegram would answer it, recorded; installed first, so it is the innermost transformer. */
function noTelegram(calls: Call[]): Transformer {
  let id = 1000;
  return (async (_prev, method, payload) => {
    const p = payload as Record<string, unknown>;
    calls.push({ method, payload: p });
    if (method === "sendMessage") {
      const chatId = Number(p.chat_id);
      return {
        ok: true,
        result: {
          message_id: id++,
          date: Math.floor(Date.now() / 1000),
          chat: chatId > 0 ? { id: chatId, type: "private", first_name: "U" } : { id: chatId, type: "supergroup", title: "G" },
          from: THE_BOT,
          text: p.text,
        },
      };
    }
    if (method === "sendPhoto" && p.chat_id === 13) return { ok: false, error_code: 400, description: "Bad Request: no photo" };
    return { ok: true, result: true };
  }) as Transformer;
}

function buildBot(metrics: BotMetrics, calls: Call[]): Bot {
  const bot = new Bot("42:TEST", { botInfo: { ...THE_BOT, can_join_groups: true, can_read_all_group_messages: false, supports_inline_queries: false, can_connect_to_business: false, has_main_web_app: false } as never });
  bot.api.config.use(noTelegram(calls));
  const queries = new WeakMap<Context, number>();
  bot.use(async (ctx, next) => {
    queries.set(ctx, 2); // a session middleware before ours: each update costs 2 queries
    await next();
  });
  bot.use(botMetrics(metrics, { adminIds: [ANN.id], dbQueries: (ctx) => queries.get(ctx) }));
  bot.command("start", async (ctx) => {
    metrics.userRegistered(ctx.from!.id);
    await ctx.reply("Hello!");
  });
  bot.hears("fail please", () => {
    throw new LLMDown("the LLM API answered 500");
  });
  bot.hears("photo", async (ctx) => {
    await ctx.replyWithPhoto("file-id"); // a second kind of sending method
  });
  bot.on("message:text", (ctx) => ctx.reply(`You said: ${ctx.message.text}`));
  return bot;
}

test("grammY: incoming, outgoing, errors by kind and the admins' /metrics, counted exactly", async (t) => {
  if (!haveBinary(t)) return;
  const server = await Server.forTest(t);
  const metrics = new BotMetrics(server.url, TOKEN, { flushIntervalMs: 50, logger: null });
  const calls: Call[] = [];
  const bot = buildBot(metrics, calls);

  await bot.handleUpdate(messageUpdate(1, ANN, ANN_CHAT, "/start") as never);
  await bot.handleUpdate(messageUpdate(2, ANN, ANN_CHAT, "what is botmetrics?") as never);
  await bot.handleUpdate(messageUpdate(3, BOB, GROUP, "hello") as never);
  await bot.handleUpdate(messageUpdate(4, BOB, BOB_CHAT, "photo") as never);
  // The handler's error reaches grammY unchanged and is counted on its way.
  await assert.rejects(bot.handleUpdate(messageUpdate(5, ANN, ANN_CHAT, "fail please") as never), (e: unknown) => {
    assert.ok(e instanceof BotError);
    assert.ok(e.error instanceof LLMDown);
    return true;
  });
  assert.equal(await metrics.flush(10_000), true);
  const before = await server.get("/v1/summary?format=text");

  await bot.handleUpdate(messageUpdate(6, ANN, ANN_CHAT, "/metrics") as never);
  // Bob is not an admin: his /metrics is an ordinary text.
  await bot.handleUpdate(messageUpdate(7, BOB, BOB_CHAT, "/metrics") as never);
  // A /metrics addressed to another bot is not this bot's command.
  await bot.handleUpdate(messageUpdate(8, ANN, GROUP, "/metrics@other_bot") as never);
  // Sent outside any update: counted once attached to bot.api.
  await bot.api.sendMessage(ANN.id, "a broadcast, not counted: not attached");
  botMetrics(metrics).attach(bot);
  await bot.api.sendMessage(ANN.id, "a broadcast");
  assert.equal(await metrics.close(10_000), true);

  const sent = calls.filter((c) => c.method === "sendMessage").map((c) => String(c.payload.text));
  assert.deepEqual(sent, [
    "Hello!", "You said: what is botmetrics?", "You said: hello", before, "You said: /metrics",
    "You said: /metrics@other_bot", "a broadcast, not counted: not attached", "a broadcast",
  ]);
  const reply = calls.find((c) => c.payload.text === before)!;
  assert.equal(reply.payload.parse_mode, undefined, "the summary goes as plain text");
  assert.ok(before.split("\n").includes("All time: 9 messages, 1 registered user, 1 error reported"), before);

  const v = (name: string, labels: Record<string, string> = {}) => server.value(name, labels);
  // In: /start, question, hello, photo, the failing one, Bob's /metrics,
  // /metrics@other_bot; not Ann's /metrics.
  assert.equal(await v("bot_messages_total", { role: "user" }), 7);
  // Out: Hello, question, hello (group), photo, Bob's /metrics, @other_bot,
  // the attached broadcast; not the answer to Ann's /metrics, not the
  // refused photo, not the broadcast before attach().
  assert.equal(await v("bot_messages_total", { role: "assistant" }), 7);
  assert.equal(await v("bot_errors_total", { kind: "LLMDown" }), 1);
  assert.equal(await v("bot_users_registered_total"), 1);
  assert.equal(await v("bot_active_users", { window: "1d" }), 2);
  // 2 database queries per counted incoming message.
  assert.equal(await v("bot_db_queries_per_message_count"), 7);
  assert.equal(await v("bot_db_queries_per_message_sum"), 14);
  assert.equal(metrics.rejected, 0);
});

test("grammY: a refused API call is not a message; error kinds are class names within the pattern", async (t) => {
  if (!haveBinary(t)) return;
  const server = await Server.forTest(t);
  const metrics = new BotMetrics(server.url, TOKEN, { flushIntervalMs: 50, logger: null });
  const calls: Call[] = [];
  const bot = new Bot("42:TEST", { botInfo: THE_BOT as never });
  bot.api.config.use(noTelegram(calls));
  bot.use(botMetrics(metrics));
  const Weird = class extends Error {};
  Object.defineProperty(Weird, "name", { value: "Bad Kind!".padEnd(80, "x") });
  bot.hears("photo", (ctx) => ctx.replyWithPhoto("file-id"));
  bot.hears("weird", () => {
    throw new Weird("x");
  });
  bot.hears("string", () => {
    throw "a string"; // eslint-disable-line no-throw-literal
  });
  const errors: unknown[] = [];
  const feed = (n: number, user: { id: number; first_name: string }, text: string) =>
    bot.handleUpdate(messageUpdate(n, user, { id: user.id, type: "private" }, text) as never).catch((e: BotError) => errors.push(e.error));
  await feed(1, { id: 13, first_name: "C" }, "photo"); // "Telegram" refuses it (ok: false): GrammyError
  await feed(2, BOB, "photo"); // taken: one message out
  await feed(3, BOB, "weird");
  await feed(4, BOB, "string");
  assert.equal(await metrics.close(10_000), true);
  assert.equal(errors.length, 3);
  assert.equal((errors[0] as Error).constructor.name, "GrammyError");
  const v = (name: string, labels: Record<string, string> = {}) => server.value(name, labels);
  assert.equal(await v("bot_errors_total", { kind: "GrammyError" }), 1);
  // "Bad Kind!xxx..." -> "Bad_Kind_xxx...", cut to 64.
  assert.equal(await v("bot_errors_total", { kind: ("Bad_Kind_" + "x".repeat(80)).slice(0, 64) }), 1);
  assert.equal(await v("bot_errors_total", { kind: "string" }), 1);
  assert.equal(await v("bot_messages_total", { role: "user" }), 4);
  assert.equal(await v("bot_messages_total", { role: "assistant" }), 1, "the refused photo is not a message");
  assert.equal(metrics.rejected, 0);
});
