// A grammY bot that reports to botmetrics:
//   BOT_TOKEN=123:abc BOTMETRICS_TOKEN=change-me BOT_ADMIN_IDS=123456789 node examples/grammy-bot.mjs
import { Bot } from "grammy";
import { BotMetrics } from "botmetrics";
import { botMetrics } from "botmetrics/grammy";

const metrics = new BotMetrics(process.env.BOTMETRICS_URL ?? "http://127.0.0.1:9464", process.env.BOTMETRICS_TOKEN ?? "change-me");
const bot = new Bot(process.env.BOT_TOKEN ?? "", {
  client: { apiRoot: process.env.TELEGRAM_API_ROOT ?? "https://api.telegram.org" }, // or a local Bot API server
});
const adminIds = (process.env.BOT_ADMIN_IDS ?? "").split(",").filter(Boolean).map(Number);

bot.use(botMetrics(metrics, { adminIds })); // the one line: messages in and out, errors, /metrics for the admins

bot.command("start", async (ctx) => {
  if (ctx.from) metrics.userRegistered(ctx.from.id);
  await ctx.reply("Hello! Ask me anything.");
});
bot.on("message:text", async (ctx) => {
  const answer = await metrics.measureResponse(ctx.from.id, async (call) => {
    call.tokens = [ctx.message.text.length, 3]; // your LLM call here, and its usage
    return `You said: ${ctx.message.text}`;
  }, { model: "gpt-4o-mini" });
  await ctx.reply(answer);
});
bot.catch((err) => console.error("handler failed:", err.error));

async function stop() {
  await bot.stop();
  await metrics.close(); // sends what is still queued
}
process.once("SIGINT", stop);
process.once("SIGTERM", stop);
await bot.start();
