/**
 * Count a chat bot's events in botmetrics without slowing the bot down.
 *
 * ```js
 * import { BotMetrics } from "botmetrics";
 * const metrics = new BotMetrics("http://127.0.0.1:9464", "change-me");
 * metrics.message(userId, "user");   // never blocks, never throws on I/O
 * ...
 * await metrics.close();             // on shutdown: send what is left
 * ```
 *
 * No runtime dependencies: Node 20's own `fetch`. grammY and Telegraf
 * wiring: `botmetrics/grammy`, `botmetrics/telegraf`.
 *
 * The same guarantees and the same events as the Python client
 * (clients/python): a bounded in-memory queue, batches posted in the
 * background, retries with the same `event_id`s, drops counted.
 */

import { randomBytes } from "node:crypto";

export const VERSION = "0.1.0";

export type UserId = number | string;
export type Role = "user" | "assistant";
export type ResponseStatus = "success" | "error" | "rate_limited" | "timeout";
export type ChatType = "private" | "group" | "supergroup" | "channel";

/** Token counts of one LLM call; `[prompt, completion]` is accepted too. */
export interface TokenCounts {
  prompt: number;
  completion: number;
  /** Prompt tokens served from the provider's cache (part of the prompt). */
  cached?: number;
  /** Prompt tokens written to the provider's cache (part of the prompt). */
  cache_write?: number;
  /** Reasoning tokens, billed as output beside the completion. */
  reasoning?: number;
}
export type Tokens = TokenCounts | readonly [number, number];

/** One event as the server's `POST /v1/events` takes it (DESIGN.md "Event object"). */
export interface BotEvent {
  type: string;
  event_id: string;
  /** Unix seconds of the call (not of the delivery). */
  ts: number;
  [field: string]: unknown;
}

/** Where the client reports retries and refusals. `console` by default; `null` for silence. */
export interface Logger {
  warn(message: string): void;
  error(message: string): void;
}

export interface BotMetricsOptions {
  /** Events per POST, and the queue length that wakes the sender (100). */
  batchSize?: number;
  /** Longest wait before a partial batch is sent, in ms (1000). */
  flushIntervalMs?: number;
  /** Events kept while the server is unreachable; past it the oldest are dropped and counted (10,000). */
  maxQueue?: number;
  /** One HTTP request's time limit, in ms (5000). */
  timeoutMs?: number;
  /** First wait before a failed batch is sent again, in ms (250); doubles up to `maxBackoffMs`. */
  initialBackoffMs?: number;
  /** Longest wait between attempts, in ms (30,000). */
  maxBackoffMs?: number;
  logger?: Logger | null;
}

/** The server answered a request with an error status. */
export class BotMetricsError extends Error {
  readonly status: number;
  readonly body: string;
  constructor(status: number, body: string) {
    super(`botmetrics answered ${status}: ${body.slice(0, 200)}`);
    this.name = "BotMetricsError";
    this.status = status;
    this.body = body;
  }
}

// Client errors that retrying cannot fix: the request itself is wrong.
const NOT_RETRYABLE = new Set([400, 401, 403, 404, 413, 415, 422]);

// Event ids: a random per-process prefix and a counter, as the Python client
// makes them. 64 random bits tell processes (cluster workers, restarts)
// apart, the counter tells events apart; no syscall per event.
const idPrefix = randomBytes(8).toString("hex") + "-";
let idCounter = 0;
function nextId(): string {
  return idPrefix + String(idCounter++);
}
function now(): number {
  return Date.now() / 1000;
}

/**
 * The waits between attempts to send a failing batch, in ms: `initialMs`
 * doubling up to `maxMs`, each drawn from the upper half of its step
 * (`step * uniform(0.5, 1)`), so that many bots recovering from one outage
 * do not retry in lockstep. `random` is for tests.
 */
export function* backoffDelays(
  initialMs: number,
  maxMs: number,
  random: () => number = Math.random,
): Generator<number, never, void> {
  let step = Math.min(initialMs, maxMs);
  for (;;) {
    yield step * (0.5 + 0.5 * random());
    step = Math.min(step * 2, maxMs);
  }
}

/** What to do with a batch after one attempt to post it. */
const enum Outcome {
  /** Taken, or refused for good: forget it. */
  Done,
  /** The server named a bad event, which was removed: send the rest now. */
  Resend,
  /** Too large: send it in two halves. */
  Split,
  /** No answer, or 5xx: wait and send the same events again. */
  Retry,
}

/**
 * A FIFO of events with O(1) push and shift: a ring that grows by doubling
 * up to the queue bound. (Array#shift is O(n) on a long array.)
 */
class Ring {
  private items: (BotEvent | undefined)[] = new Array(16);
  private head = 0;
  length = 0;

  push(event: BotEvent): void {
    if (this.length === this.items.length) {
      const bigger: (BotEvent | undefined)[] = new Array(this.items.length * 2);
      for (let i = 0; i < this.length; i++) bigger[i] = this.items[(this.head + i) % this.items.length];
      this.items = bigger;
      this.head = 0;
    }
    this.items[(this.head + this.length) % this.items.length] = event;
    this.length++;
  }

  shift(): BotEvent | undefined {
    if (this.length === 0) return undefined;
    const event = this.items[this.head];
    this.items[this.head] = undefined;
    this.head = (this.head + 1) % this.items.length;
    this.length--;
    return event;
  }
}

function withoutUndefined(fields: Record<string, unknown> | undefined, event: BotEvent): BotEvent {
  if (fields) for (const k in fields) if (fields[k] !== undefined && fields[k] !== null) event[k] = fields[k];
  return event;
}

/**
 * Batches a bot's events to a botmetrics server.
 *
 * `track()` and the helpers append to a bounded in-memory queue and
 * return; a sender running on the event loop posts the queue in batches
 * (every `batchSize` events or `flushIntervalMs`), with `fetch`, so the bot
 * never waits on the network. A helper never throws on network trouble.
 *
 * Counters, for the bot's own logs and tests: `sent` events the server
 * acknowledged (`duplicates` of them it had already counted), `dropped`
 * events pushed out of a full queue (or tracked after `close()`),
 * `rejected` events the server refused, `requests` POSTs attempted,
 * `retries` failed attempts that will be retried, `pending` events queued
 * or in flight.
 */
export class BotMetrics {
  readonly url: string;
  readonly batchSize: number;
  readonly flushIntervalMs: number;
  readonly maxQueue: number;
  readonly timeoutMs: number;
  readonly initialBackoffMs: number;
  readonly maxBackoffMs: number;

  sent = 0;
  duplicates = 0;
  dropped = 0;
  rejected = 0;
  requests = 0;
  retries = 0;

  readonly #token: string;
  readonly #log: Logger | null;
  readonly #queue = new Ring();
  #inflight = 0;
  #closed = false;
  #running = false;
  /** Wakes the sender from its flush-interval (or backoff) wait. */
  #wake: (() => void) | null = null;
  /** Resolved each time the sender has emptied the queue. */
  #idleWaiters: (() => void)[] = [];
  /** Aborts the request in flight: close() after its timeout. */
  #abort: AbortController | null = null;

  constructor(url: string, token: string, options: BotMetricsOptions = {}) {
    const {
      batchSize = 100,
      flushIntervalMs = 1000,
      maxQueue = 10000,
      timeoutMs = 5000,
      initialBackoffMs = 250,
      maxBackoffMs = 30000,
    } = options;
    if (!(batchSize >= 1) || !(maxQueue >= 1)) throw new RangeError("batchSize and maxQueue must be at least 1");
    if (!(Math.min(flushIntervalMs, initialBackoffMs, maxBackoffMs, timeoutMs) > 0)) {
      throw new RangeError("flushIntervalMs, timeoutMs, initialBackoffMs and maxBackoffMs must be positive");
    }
    this.url = url.replace(/\/+$/, "");
    this.#token = token;
    this.batchSize = batchSize;
    this.flushIntervalMs = flushIntervalMs;
    this.maxQueue = maxQueue;
    this.timeoutMs = timeoutMs;
    this.initialBackoffMs = initialBackoffMs;
    this.maxBackoffMs = maxBackoffMs;
    this.#log = options.logger === undefined ? console : options.logger;
  }

  /** Where retries and refusals are reported (the middleware reports there too). */
  get logger(): Logger | null {
    return this.#log;
  }

  /** Events tracked but not yet acknowledged (queued or in flight). */
  get pending(): number {
    return this.#queue.length + this.#inflight;
  }

  // ------------------------------------------------------------ hot path

  #push(event: BotEvent): void {
    const queue = this.#queue;
    while (queue.length >= this.maxQueue) {
      queue.shift();
      this.dropped++;
    }
    queue.push(event);
    if (!this.#running) this.#start();
    else if (queue.length >= this.batchSize && this.#wake) this.#wake();
  }

  /**
   * Queue one event of the given type. Never blocks, never does I/O.
   * Fields that are `undefined` or `null` are left out, so optional
   * arguments can be passed through as they are.
   */
  track(type: string, fields?: Record<string, unknown>): void {
    if (this.#closed) {
      this.dropped++; // a handler still running during shutdown must not crash on metrics
      return;
    }
    this.#push(withoutUndefined(fields, { type, event_id: nextId(), ts: now() }));
  }

  /** A message: `role` is "user" (received) or "assistant" (sent). `dbQueries`: database queries handling it took. */
  message(
    userId: UserId | null | undefined,
    role: Role = "user",
    options: { dbQueries?: number; chatType?: ChatType | string } = {},
  ): void {
    // Built directly, without track()'s field loop: this one runs for
    // every message in and out (benchmarks/hot_path.mjs).
    if (this.#closed) {
      this.dropped++;
      return;
    }
    const event: BotEvent = { type: "message", event_id: nextId(), ts: now(), role };
    if (userId !== undefined && userId !== null) event.user_id = userId;
    if (options.dbQueries !== undefined) event.db_queries = options.dbQueries;
    if (options.chatType !== undefined) event.chat_type = options.chatType;
    this.#push(event);
  }

  /**
   * An LLM call's outcome: `status` success, error, rate_limited or
   * timeout; `durationMs` its duration. `tokens`: `{prompt, completion}`
   * or `[prompt, completion]`; `cachedTokens` and `cacheWriteTokens` are
   * part of the prompt, `reasoningTokens` billed as output. `ttftMs`: a
   * streamed answer's first token. `cost`: what the provider reported
   * (without it the server prices the tokens from its table).
   */
  response(
    userId: UserId | null | undefined,
    status: ResponseStatus = "success",
    durationMs = 0,
    options: {
      model?: string;
      tokens?: Tokens;
      cachedTokens?: number;
      cacheWriteTokens?: number;
      reasoningTokens?: number;
      ttftMs?: number;
      provider?: string;
      cost?: number;
      chatType?: ChatType | string;
    } = {},
  ): void {
    let tokens: Record<string, number> | undefined;
    const t = options.tokens;
    if (Array.isArray(t)) tokens = { prompt: t[0], completion: t[1] };
    else if (t) tokens = { ...(t as TokenCounts) }; // a copy, never the caller's object
    if (
      options.cachedTokens !== undefined ||
      options.cacheWriteTokens !== undefined ||
      options.reasoningTokens !== undefined
    ) {
      tokens = { ...tokens };
      if (options.cachedTokens !== undefined) tokens.cached = options.cachedTokens;
      if (options.cacheWriteTokens !== undefined) tokens.cache_write = options.cacheWriteTokens;
      if (options.reasoningTokens !== undefined) tokens.reasoning = options.reasoningTokens;
    }
    this.track("response", {
      status,
      duration_ms: durationMs,
      user_id: userId,
      model: options.model,
      tokens,
      ttft_ms: options.ttftMs,
      provider: options.provider,
      cost: options.cost,
      chat_type: options.chatType,
    });
  }

  /**
   * Times `call` (an LLM call) and sends a `response` event when it ends:
   * success, timeout (an error named TimeoutError, as `AbortSignal.timeout`
   * throws) or error (any other, which is rethrown). Set `tokens`, `cost`
   * or `status` on the timer it is given to report more; call
   * `firstToken()` when a streamed answer's first token arrives.
   */
  async measureResponse<T>(
    userId: UserId | null | undefined,
    call: (timer: ResponseTimer) => Promise<T> | T,
    options: { model?: string; provider?: string } = {},
  ): Promise<T> {
    const timer = new ResponseTimer();
    try {
      const result = await call(timer);
      timer.status ??= "success";
      return result;
    } catch (e) {
      timer.status ??= (e as { name?: unknown } | null)?.name === "TimeoutError" ? "timeout" : "error";
      throw e;
    } finally {
      const duration = timer.elapsedMs();
      const ttft = timer.ttftMs === undefined ? undefined : Math.min(timer.ttftMs, duration);
      this.response(userId, timer.status ?? "error", duration, {
        model: options.model,
        provider: options.provider,
        tokens: timer.tokens,
        cost: timer.cost,
        ttftMs: ttft,
      });
    }
  }

  /** A user's rating of an answer: `score` -1 or 1 (thumbs), or 1 to 5 with `scale: 5`; `reason` a short name. */
  feedback(userId: UserId | null | undefined, score: number, options: { scale?: number; reason?: string } = {}): void {
    this.track("feedback", { score, user_id: userId, scale: options.scale, reason: options.reason });
  }

  /** A cache lookup: `hit` true/false or "hit"/"miss", per named cache. */
  cache(hit: boolean | "hit" | "miss", options: { cache?: string; userId?: UserId } = {}): void {
    this.track("cache", {
      result: typeof hit === "string" ? hit : hit ? "hit" : "miss",
      cache: options.cache,
      user_id: options.userId,
    });
  }

  /** A new user (first /start). */
  userRegistered(userId: UserId): void {
    this.track("user_registered", { user_id: userId });
  }

  /** The user's answer to the consent (privacy policy) question. */
  consent(userId: UserId, granted: boolean): void {
    this.track("consent", { user_id: userId, granted: Boolean(granted) });
  }

  /** The user hit the bot's daily message limit. */
  limitReached(userId: UserId): void {
    this.track("limit_reached", { user_id: userId });
  }

  /** An error in the bot, by a short kind name (`[A-Za-z0-9_.:-]{1,64}`). */
  error(kind: string, options: { userId?: UserId } = {}): void {
    this.track("error", { kind, user_id: options.userId });
  }

  /** A custom counter by name; `value` defaults to 1 on the server. */
  custom(name: string, options: { value?: number; userId?: UserId } = {}): void {
    this.track("custom", { name, value: options.value, user_id: options.userId });
  }

  // ---------------------------------------------------------------- life

  /**
   * Send everything tracked so far. True when all of it was acknowledged
   * (taken by the server, or refused and counted in `rejected`; `close()`
   * tells whether everything was delivered), false when `timeoutMs` passed
   * first (the events stay queued and are retried).
   */
  async flush(timeoutMs?: number): Promise<boolean> {
    if (this.pending === 0) return true;
    if (!this.#running) this.#start();
    let timer: NodeJS.Timeout | undefined;
    // This timer is not unref'd: a bot awaiting flush() or close() stays
    // alive until its events are sent or the time is up.
    const timedOut = new Promise<false>((resolve) => {
      if (timeoutMs !== undefined) timer = setTimeout(() => resolve(false), Math.max(0, timeoutMs));
    });
    const keepAlive = timeoutMs === undefined ? setInterval(() => {}, 60_000) : undefined;
    try {
      while (this.pending > 0) {
        const idle = new Promise<true>((resolve) => this.#idleWaiters.push(() => resolve(true)));
        this.#wake?.();
        if (!(await Promise.race([idle, timedOut]))) return false;
      }
      return true;
    } finally {
      clearTimeout(timer);
      clearInterval(keepAlive);
    }
  }

  /**
   * Flush for at most `timeoutMs` (5000), then stop the sender (a request
   * still open is aborted). True only when every event tracked was
   * delivered: none left unsent, none refused by the server (`rejected`:
   * a wrong token, an invalid event), none dropped from a full queue
   * (`dropped`). Events tracked after it are dropped and counted.
   */
  async close(timeoutMs = 5000): Promise<boolean> {
    this.#closed = true;
    const flushed = await this.flush(timeoutMs);
    if (!flushed) {
      this.#log?.warn(`botmetrics: closing with ${this.pending} events unsent`);
    } else if (this.rejected || this.dropped) {
      this.#log?.warn(
        `botmetrics: closing with ${this.rejected} events refused by the server and ${this.dropped} dropped`,
      );
    }
    // Stop the sender: a request still open is abandoned, a backoff wait
    // ends, and nothing is left to keep the process alive.
    this.#running = false;
    this.#abort?.abort();
    this.#wake?.();
    this.#wakeRetry?.();
    return flushed && this.rejected === 0 && this.dropped === 0;
  }

  // ------------------------------------------------------------- summary

  /** The ready-to-send text for the bot's /metrics command (`GET /v1/summary?format=text`). */
  async summaryText(bot?: string): Promise<string> {
    return this.#summaryRequest(bot, "text");
  }

  /** The summary object (see the server's `GET /v1/summary`). */
  async summary(bot?: string): Promise<Record<string, unknown>> {
    const value: unknown = JSON.parse(await this.#summaryRequest(bot, undefined));
    if (typeof value !== "object" || value === null || Array.isArray(value)) {
      throw new TypeError("the summary is not a JSON object");
    }
    return value as Record<string, unknown>;
  }

  async #summaryRequest(bot: string | undefined, format: string | undefined): Promise<string> {
    const query = new URLSearchParams();
    if (bot) query.set("bot", bot);
    if (format) query.set("format", format);
    const qs = query.toString();
    const { status, body } = await this.#request("GET", "/v1/summary" + (qs ? "?" + qs : ""));
    if (status !== 200) throw new BotMetricsError(status, body);
    return body;
  }

  // -------------------------------------------------------------- sender

  #start(): void {
    this.#running = true;
    void this.#run().catch((e: unknown) => {
      this.#running = false;
      this.#inflight = 0;
      this.#log?.error(`botmetrics: the sender stopped: ${String(e)}`);
    });
  }

  /** Waits `ms`, or less when woken; the timer never keeps the process alive on its own. */
  #sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        if (this.#wake === done) this.#wake = null;
        resolve();
      };
      const timer = setTimeout(done, ms);
      timer.unref();
      this.#wake = done;
    });
  }

  async #run(): Promise<void> {
    // One turn of the loop first: the events of the current tick join
    // the first batch rather than leaving alone.
    await new Promise<void>((resolve) => setImmediate(resolve));
    while (this.#running) {
      if (this.#queue.length < this.batchSize && this.#idleWaiters.length === 0) {
        await this.#sleep(this.flushIntervalMs);
        if (!this.#running) break;
      }
      while (this.#queue.length > 0 && this.#running) {
        const batch: BotEvent[] = [];
        while (batch.length < this.batchSize && this.#queue.length > 0) batch.push(this.#queue.shift() as BotEvent);
        this.#inflight = batch.length;
        try {
          await this.#deliver(batch);
        } finally {
          this.#inflight = 0;
        }
      }
      const waiters = this.#idleWaiters;
      this.#idleWaiters = [];
      for (const w of waiters) w();
    }
  }

  /** Posts one batch until the server has taken or refused every event. */
  async #deliver(batch: BotEvent[]): Promise<void> {
    const delays = backoffDelays(this.initialBackoffMs, this.maxBackoffMs);
    const todo = [batch];
    while (todo.length > 0 && this.#running) {
      const current = todo[todo.length - 1] as BotEvent[];
      const outcome = await this.#attempt(current);
      if (outcome === Outcome.Done) {
        todo.pop();
      } else if (outcome === Outcome.Split) {
        todo.pop();
        const half = Math.floor(current.length / 2);
        todo.push(current.slice(half), current.slice(0, half));
      } else if (outcome === Outcome.Retry) {
        const delay = delays.next().value;
        this.#log?.warn(
          `botmetrics: sending ${current.length} events failed (${this.#lastFailure}), retrying in ${(delay / 1000).toFixed(3)}s`,
        );
        // Not woken early by new events: the wait is the backoff.
        await new Promise<void>((resolve) => {
          const timer = setTimeout(() => {
            this.#wakeRetry = null;
            resolve();
          }, delay);
          timer.unref();
          this.#wakeRetry = () => {
            clearTimeout(timer);
            this.#wakeRetry = null;
            resolve();
          };
        });
      }
    }
  }

  #lastFailure = "";
  /** Ends a backoff wait at once: close() gave up. */
  #wakeRetry: (() => void) | null = null;

  /** Posts a batch once and decides what comes next. Removes the event the server names as invalid from `batch`. */
  async #attempt(batch: BotEvent[]): Promise<Outcome> {
    this.requests++;
    let status: number | null = null;
    let body = "";
    try {
      ({ status, body } = await this.#request("POST", "/v1/events", JSON.stringify(batch)));
    } catch (e) {
      // Aborted by close(): abandoned, not a failure to retry.
      if (!this.#running) return Outcome.Retry;
      body = describe(e);
    }
    if (status === 202) {
      this.sent += batch.length;
      const dup = jsonObject(body)["duplicates"];
      if (typeof dup === "number") this.duplicates += dup;
      return Outcome.Done;
    }
    if (status === 413 && batch.length > 1) return Outcome.Split;
    if (status !== null && NOT_RETRYABLE.has(status)) {
      const reply = jsonObject(body);
      const index = reply["index"];
      if (status === 422 && typeof index === "number" && Number.isInteger(index) && index >= 0 && index < batch.length) {
        const [bad] = batch.splice(index, 1);
        this.rejected++;
        this.#log?.warn(`botmetrics: dropped invalid ${String(bad?.type)} event: ${String(reply["message"])}`);
        return batch.length > 0 ? Outcome.Resend : Outcome.Done;
      }
      this.rejected += batch.length;
      this.#log?.error(
        `botmetrics: server refused ${batch.length} events (${status}): ${String(reply["message"] ?? body.slice(0, 200))}`,
      );
      return Outcome.Done;
    }
    // Down, overloaded or unreachable: the same events (same event_ids)
    // go again after a wait.
    this.retries++;
    this.#lastFailure = status !== null ? String(status) : body.slice(0, 200);
    return Outcome.Retry;
  }

  async #request(method: string, path: string, body?: string): Promise<{ status: number; body: string }> {
    const abort = new AbortController();
    if (method === "POST") this.#abort = abort;
    try {
      const headers: Record<string, string> = { authorization: `Bearer ${this.#token}` };
      if (body !== undefined) headers["content-type"] = "application/json";
      const resp = await fetch(this.url + path, {
        method,
        headers,
        body,
        signal: AbortSignal.any([abort.signal, AbortSignal.timeout(this.timeoutMs)]),
      });
      return { status: resp.status, body: await resp.text() };
    } finally {
      if (this.#abort === abort) this.#abort = null;
    }
  }
}

/** Times one LLM call for `measureResponse`; set its fields inside the call to report more. */
export class ResponseTimer {
  tokens: Tokens | undefined;
  status: ResponseStatus | undefined;
  cost: number | undefined;
  ttftMs: number | undefined;
  readonly #start = performance.now();

  /** The first token of a streamed answer arrived (only the first call counts). */
  firstToken(): void {
    this.ttftMs ??= this.elapsedMs();
  }

  elapsedMs(): number {
    return performance.now() - this.#start;
  }
}

function describe(e: unknown): string {
  if (e instanceof Error) {
    const cause = (e as { cause?: unknown }).cause;
    const more = cause instanceof Error ? `: ${cause.message}` : "";
    return `${e.name}: ${e.message}${more}`;
  }
  return String(e);
}

function jsonObject(body: string): Record<string, unknown> {
  try {
    const value: unknown = JSON.parse(body);
    return typeof value === "object" && value !== null && !Array.isArray(value) ? (value as Record<string, unknown>) : {};
  } catch {
    return {};
  }
}
