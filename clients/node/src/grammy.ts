/**
 * grammY wiring: one line counts a bot's traffic.
 *
 * ```js
 * import { BotMetrics } from "botmetrics";
 * import { botMetrics } from "botmetrics/grammy";
 * const metrics = new BotMetrics("http://127.0.0.1:9464", "change-me");
 * bot.use(botMetrics(metrics, { adminIds: [123456789] }));   // before the bot's handlers
 * ```
 *
 * Counts every incoming message with its user and chat type (`message`,
 * role `user`), every message the bot sends through the API (an API
 * transformer installed on each update's `ctx.api`: `message`, role
 * `assistant`), every error a later handler throws (`error`, its class
 * name as `kind`; the error goes on to grammY unchanged), and answers the
 * admins' `/metrics` with the server's summary. An admin's `/metrics` and
 * its answer are not counted. Only grammY's types are imported.
 */

import type { Context, MiddlewareFn, Transformer } from "grammy";

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

/** The middleware, with the transformer it installs and a way to install it on a bot's own `api`. */
export interface GrammyMetricsMiddleware<C extends Context> extends MiddlewareFn<C> {
  /** Counts the messages sent through an `Api` it is installed on (`api.config.use(...)`). */
  readonly transformer: Transformer;
  /**
   * Count the messages `bot.api` sends outside handlers too (a start-up
   * notice, a broadcast). Idempotent; handlers' `ctx.api` inherits it.
   */
  attach(bot: { api: { config: { use(...t: Transformer[]): void; installedTransformers(): Transformer[] } } }): void;
}

/** The API transformer alone: `bot.api.config.use(outgoingMessages(metrics))`. */
export function outgoingMessages(metrics: BotMetrics): Transformer {
  const transformer: Transformer = async (prev, method, payload, signal) => {
    const result = await prev(method, payload, signal);
    if (result.ok) countSent(metrics, method, payload);
    return result;
  };
  return transformer;
}

/** The middleware; see the module's documentation. Register it before the bot's handlers. */
export function botMetrics<C extends Context = Context>(
  metrics: BotMetrics,
  options: MiddlewareOptions<C> = {},
): GrammyMetricsMiddleware<C> {
  const admins = new Set(options.adminIds ?? []);
  const command = options.command ?? "metrics";
  const countOutgoing = options.countOutgoing ?? true;
  const transformer = outgoingMessages(metrics);

  const install = (api: { config: { use(...t: Transformer[]): void; installedTransformers(): Transformer[] } }) => {
    if (!api.config.installedTransformers().includes(transformer)) api.config.use(transformer);
  };

  const middleware = async (ctx: C, next: () => Promise<void>): Promise<void> => {
    if (countOutgoing) install(ctx.api);
    const userId = ctx.from?.id;
    const message = ctx.update.message ?? ctx.update.business_message;

    if (
      message !== undefined &&
      userId !== undefined &&
      admins.has(userId) &&
      isCommand(message.text, command, ctx.me?.username)
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
    transformer,
    attach: (bot: { api: Parameters<typeof install>[0] }) => install(bot.api),
  });
}
