/**
 * What the grammY and Telegraf middleware share: which Bot API calls are
 * messages, how a thrown value becomes an error kind, how an admin's
 * /metrics is recognised and kept out of the counts. Imports neither
 * framework: the client never depends on them.
 */

import { AsyncLocalStorage } from "node:async_hooks";

import type { BotMetrics, UserId } from "./index.js";

/**
 * Bot API methods that put a message in a chat: each successful call is one
 * assistant message (the Python client's list). Chat actions, edits and
 * deletions are not messages.
 */
export const SENDING_METHODS: ReadonlySet<string> = new Set([
  "sendMessage", "sendPhoto", "sendAudio", "sendDocument", "sendVideo", "sendAnimation",
  "sendVoice", "sendVideoNote", "sendSticker", "sendLocation", "sendVenue", "sendContact",
  "sendPoll", "sendDice", "sendGame", "sendInvoice", "sendMediaGroup", "sendPaidMedia",
  "sendChecklist", "sendLivePhoto", "sendRichMessage", "copyMessage", "forwardMessage",
]);

const CHAT_TYPES: ReadonlySet<string> = new Set(["private", "group", "supergroup", "channel"]);

/** What both middlewares take. */
export interface MiddlewareOptions<C> {
  /**
   * Telegram user ids allowed to run `/metrics` (answered with
   * `GET /v1/summary?format=text`). Without it there is no command and
   * every `/metrics` goes to the bot's own handlers.
   */
  adminIds?: Iterable<number>;
  /** The command's name, without the slash ("metrics"). */
  command?: string;
  /** Which bot's summary `/metrics` shows on a server that serves several. */
  botName?: string;
  /** How many database queries handling the update took, read after the handler. */
  dbQueries?: (ctx: C) => number | undefined;
  /** Count the messages the bot sends (true). */
  countOutgoing?: boolean;
}

/** What the handlers of the update being handled said about counting it. */
interface UpdateMark {
  uncounted: boolean;
}

// The update being handled, so that the reply to an admin's /metrics is not
// counted: AsyncLocalStorage follows the handler's awaits into the API call.
const currentUpdate = new AsyncLocalStorage<UpdateMark>();

/** Runs a handler with its own mark; the mark says afterwards whether to count the update. */
export function runMarked<T>(fn: () => Promise<T>): { mark: UpdateMark; done: Promise<T> } {
  const mark: UpdateMark = { uncounted: false };
  return { mark, done: currentUpdate.run(mark, fn) };
}

/** Runs `fn` (the answer to an admin's /metrics) with nothing it sends counted. */
export function runUncounted<T>(fn: () => Promise<T>): Promise<T> {
  const mark = currentUpdate.getStore();
  if (mark) mark.uncounted = true;
  return currentUpdate.run({ uncounted: true }, fn);
}

/** A successful Bot API call, counted when it put a message in a chat. */
export function countSent(metrics: BotMetrics, method: string, payload: unknown): void {
  if (!SENDING_METHODS.has(method) || currentUpdate.getStore()?.uncounted) return;
  const chatId = (payload as { chat_id?: unknown } | null | undefined)?.chat_id;
  // In a private chat the chat id is the user's id, so the user is known;
  // in groups and channels (negative ids, @names) the event has no user.
  if (typeof chatId === "number" && Number.isSafeInteger(chatId) && chatId > 0) {
    metrics.message(chatId, "assistant", { chatType: "private" });
  } else {
    metrics.message(null, "assistant");
  }
}

/** An incoming message, counted after its handlers ran. */
export function countReceived<C>(
  metrics: BotMetrics,
  options: MiddlewareOptions<C>,
  ctx: C,
  userId: UserId | undefined,
  chatType: string | undefined,
): void {
  let dbQueries: number | undefined;
  if (options.dbQueries) {
    try {
      dbQueries = options.dbQueries(ctx);
    } catch (e) {
      // Metrics must never break the bot.
      metrics.logger?.error(`botmetrics: dbQueries() failed: ${String(e)}`);
    }
  }
  metrics.message(userId, "user", {
    dbQueries,
    chatType: chatType !== undefined && CHAT_TYPES.has(chatType) ? chatType : undefined,
  });
}

const KIND_CHARS = /[^A-Za-z0-9_.:-]+/g;

/**
 * The error kind of a thrown value: its class name (`LLMTimeout`,
 * `GrammyError`, `TypeError`), never its message, which could carry user
 * data and would make a label per distinct text. Characters outside the
 * server's pattern `[A-Za-z0-9_.:-]{1,64}` become `_`.
 */
export function errorKind(error: unknown): string {
  let name: unknown;
  if (typeof error === "object" && error !== null) {
    const ctor = (error as { constructor?: { name?: unknown } }).constructor;
    name = ctor && ctor !== Object ? ctor.name : undefined;
    // A plain Error whose name was set (`err.name = "LLMTimeout"`) says more than "Error".
    const own = (error as { name?: unknown }).name;
    if ((name === "Error" || !name) && typeof own === "string" && own) name = own;
  }
  if (typeof name !== "string" || !name) name = error === null ? "null" : typeof error === "object" ? "Object" : typeof error;
  const kind = (name as string).replace(KIND_CHARS, "_").slice(0, 64);
  return kind.replace(/^_+$/, "") || "Error";
}

/** A message's text starts with `/command` or `/command@this_bot`. */
export function isCommand(text: string | undefined, command: string, botUsername: string | undefined): boolean {
  if (!text || text[0] !== "/") return false;
  const m = /^\/([A-Za-z0-9_]+)(?:@([A-Za-z0-9_]+))?(?:\s|$)/.exec(text);
  if (!m || m[1]?.toLowerCase() !== command.toLowerCase()) return false;
  return m[2] === undefined || (botUsername !== undefined && m[2].toLowerCase() === botUsername.toLowerCase());
}

/** The text the admins' /metrics answers with; a failure says so instead of throwing. */
export async function metricsReply(metrics: BotMetrics, options: MiddlewareOptions<unknown>): Promise<string> {
  try {
    return await metrics.summaryText(options.botName);
  } catch (e) {
    metrics.logger?.warn(`botmetrics: /${options.command ?? "metrics"} could not read the summary: ${String(e)}`);
    return "Metrics are not available right now.";
  }
}
