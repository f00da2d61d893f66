/**
 * Telegraf 4 wiring: one line counts a bot's traffic.
 *
 * ```js
 * import { BotMetrics } from "botmetrics";
 * import { botMetrics } from "botmetrics/telegraf";
 * const metrics = new BotMetrics("http://127.0.0.1:9464", "change-me");
 * bot.use(botMetrics(metrics, { adminIds: [123456789] }));   // before the bot's handlers
 * ```
 *
 * Counts every incoming message with its user and chat type (`message`,
 * role `user`), every message the bot sends (each update's `ctx.telegram`
 * has its `callApi` wrapped: `message`, role `assistant`), every error a
 * later handler throws (`error`, its class name as `kind`; the error goes
 * on to `bot.catch` unchanged), and answers the admins' `/metrics` with the
 * server's summary. An admin's `/metrics` and its answer are not counted.
 * Only Telegraf's types are imported.
 */

import type { Context, MiddlewareFn } from "telegraf";

import type { BotMetrics } from "./index.js";
import {
  countReceived,
  countSent,
  errorKind,
  isCommand,
  metricsReply,
  runMarked,
  runUncounted,
  type MiddlewareOptions,
} from "./_shared.js";

export { SENDING_METHODS, errorKind } from "./_shared.js";
export type { MiddlewareOptions } from "./_shared.js";

type CallApi = (method: string, payload: unknown, options?: unknown) => Promise<unknown>;
interface HasCallApi {
  callApi: CallApi;
}

/** The middleware, with a way to count what `bot.telegram` sends outside handlers. */
export interface TelegrafMetricsMiddleware<C extends Context> extends MiddlewareFn<C> {
  /**
   * Count the messages `bot.telegram` sends outside handlers too (a
   * start-up notice, a broadcast). Idempotent. (Each update gets a
   * `Telegram` object of its own, which the middleware wraps.)
   */
  attach(bot: { telegram: object }): void;
}

// Which Telegram objects are wrapped already, for which client: never twice.
const wrapped = new WeakMap<object, Set<BotMetrics>>();

/** Wraps `telegram.callApi` so that each message it sends is counted (idempotent). */
export function countOutgoing(metrics: BotMetrics, telegram: object): void {
  let by = wrapped.get(telegram);
  if (by?.has(metrics)) return;
  if (!by) wrapped.set(telegram, (by = new Set()));
  by.add(metrics);
  const tg = telegram as HasCallApi;
  const callApi = tg.callApi.bind(tg);
  // Every Telegram method (sendMessage, ctx.reply, ...) goes through
  // this.callApi; it throws when Telegram refuses, so a return is a success.
  tg.callApi = async (method, payload, options) => {
    const result = await callApi(method, payload, options);
    countSent(metrics, method, payload);
    return result;
  };
}

/** The middleware; see the module's documentation. Register it before the bot's handlers. */
export function botMetrics<C extends Context = Context>(
  metrics: BotMetrics,
  options: MiddlewareOptions<C> = {},
): TelegrafMetricsMiddleware<C> {
  const admins = new Set(options.adminIds ?? []);
  const command = options.command ?? "metrics";
  const outgoing = options.countOutgoing ?? true;

  const middleware = async (ctx: C, next: () => Promise<void>): Promise<void> => {
    if (outgoing) countOutgoing(metrics, ctx.telegram);
    const userId = ctx.from?.id;
    const update = ctx.update as {
      message?: { text?: string; chat: { type: string } };
      business_message?: { text?: string; chat: { type: string } };
    };
    const message = update.message ?? update.business_message;

    if (
      message !== undefined &&
      userId !== undefined &&
      admins.has(userId) &&
      isCommand(message.text, command, ctx.botInfo?.username)
    ) {
      // Reading the figures does not change them: neither the command nor
      // its answer is counted. Plain text: no parse mode.
      const text = await metricsReply(metrics, options as MiddlewareOptions<unknown>);
      await runUncounted(() => ctx.reply(text));
      return;
    }

    const { mark, done } = runMarked(next);
    try {
      await done;
    } catch (e) {
      metrics.error(errorKind(e), { userId });
      throw e;
    } finally {
      if (message !== undefined && !mark.uncounted) countReceived(metrics, options, ctx, userId, message.chat.type);
    }
  };

  return Object.assign(middleware, {
    attach: (bot: { telegram: object }) => countOutgoing(metrics, bot.telegram),
  });
}
