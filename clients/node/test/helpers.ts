/**
 * The real botmetrics server for the client's tests, a stand-in for
 * Telegram, and stand-ins for a server that is down or never answers.
 *
 * BOTMETRICS_BIN names the server binary (default target/debug/botmetrics
 * of the repository). Where it is missing the tests are skipped, except in
 * CI (CI set to anything but "", "0" or "false"), where they fail.
 */

import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, openSync, readFileSync, rmSync, accessSync, constants } from "node:fs";
import { createServer as createHttpServer, type IncomingMessage, type Server as HttpServer } from "node:http";
import { createServer as createNetServer, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import type { TestContext } from "node:test";

export const CLIENT_DIR = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
export const REPO = resolve(CLIENT_DIR, "..", "..");
export const BIN = process.env.BOTMETRICS_BIN || join(REPO, "target", "debug", "botmetrics");
export const BOT = "testbot";
export const TOKEN = "change-me";

export function inCi(): boolean {
  return !["", "0", "false"].includes((process.env.CI ?? "").trim().toLowerCase());
}

/** Fails in CI, skips (loudly) elsewhere. Returns false when the test must stop. */
export function cannotRun(t: TestContext, why: string): false {
  if (inCi()) throw new Error(`${why}: required in CI`);
  t.skip(why);
  return false;
}

export function haveBinary(t: TestContext): boolean {
  try {
    accessSync(BIN, constants.X_OK);
    return true;
  } catch {
    return cannotRun(t, `no executable botmetrics at ${BIN}: build it or set BOTMETRICS_BIN`);
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export async function freePort(): Promise<number> {
  const srv = createNetServer();
  await new Promise<void>((r) => srv.listen(0, "127.0.0.1", r));
  const port = (srv.address() as { port: number }).port;
  await new Promise<void>((r) => srv.close(() => r()));
  return port;
}

/** The botmetrics binary on a fixed port, database and data dir: restartable. */
export class Server {
  readonly url: string;
  private proc: ChildProcess | null = null;
  private constructor(
    readonly port: number,
    readonly dir: string,
  ) {
    this.url = `http://127.0.0.1:${port}`;
  }

  /** A started server in a temporary directory, stopped (and removed) after the test. */
  static async forTest(t: TestContext): Promise<Server> {
    const dir = mkdtempSync(join(tmpdir(), "botmetrics-node-test-"));
    const server = new Server(await freePort(), dir);
    t.after(async () => {
      await server.stop();
      rmSync(dir, { recursive: true, force: true });
    });
    await server.start();
    return server;
  }

  async start(): Promise<void> {
    const log = openSync(join(this.dir, "server.log"), "a");
    const proc = spawn(
      BIN,
      [
        "--listen", `127.0.0.1:${this.port}`,
        "--tokens", `${BOT}=${TOKEN}`,
        "--database-url", `sqlite://${join(this.dir, "bm.db")}`,
        "--data-dir", join(this.dir, "data"),
        "--metrics-cache-ttl", "0s",
        "--flush-interval", "1s",
      ],
      { stdio: ["ignore", log, log] },
    );
    this.proc = proc;
    const deadline = Date.now() + 20_000;
    while (Date.now() < deadline) {
      if (proc.exitCode !== null) throw new Error(`botmetrics exited with ${proc.exitCode}:\n${this.tail()}`);
      try {
        const r = await fetch(this.url + "/readyz", { signal: AbortSignal.timeout(1000) });
        if (r.status === 200) return;
      } catch {
        // not listening yet
      }
      await sleep(50);
    }
    throw new Error(`botmetrics not ready after 20 s:\n${this.tail()}`);
  }

  /** SIGTERM: a clean stop, which flushes the counters first. */
  async stop(): Promise<void> {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    const exited = new Promise<void>((r) => proc.once("exit", () => r()));
    proc.kill("SIGTERM");
    const timer = setTimeout(() => proc.kill("SIGKILL"), 15_000);
    await exited;
    clearTimeout(timer);
  }

  tail(): string {
    try {
      return readFileSync(join(this.dir, "server.log"), "utf8").slice(-3000);
    } catch {
      return "";
    }
  }

  async get(path: string): Promise<string> {
    const r = await fetch(this.url + path, { headers: { authorization: `Bearer ${TOKEN}` } });
    if (r.status !== 200) throw new Error(`GET ${path}: ${r.status}`);
    return r.text();
  }

  /** /metrics as a map from `name{label="v",...}` (labels sorted) to value. */
  async metrics(): Promise<Map<string, number>> {
    const out = new Map<string, number>();
    for (const line of (await this.get("/metrics")).split("\n")) {
      if (!line || line.startsWith("#")) continue;
      const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
      if (!m) continue;
      const labels = [...(m[2] ?? "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)]
        .map((l) => `${l[1]}="${l[2]}"`)
        .sort();
      out.set(`${m[1]}{${labels.join(",")}}`, Number(m[3]));
    }
    return out;
  }

  /** One series' value; 0 when it does not exist (yet). `bot` is the test bot unless given. */
  async value(name: string, labels: Record<string, string> = {}): Promise<number> {
    const all = { bot: BOT, ...labels };
    const key = `${name}{${Object.entries(all).map(([k, v]) => `${k}="${v}"`).sort().join(",")}}`;
    return (await this.metrics()).get(key) ?? 0;
  }
}

/**
 * Accepts connections and never answers (a wedged server), or with
 * `hang: false` closes each at once (a server dying mid-request). Records
 * when each connection arrived.
 */
export class HangingServer {
  readonly accepted: number[] = [];
  /** Connections that sent a request (undici may open an idle one after an abort). */
  requests = 0;
  private readonly sockets: Socket[] = [];
  private readonly server = createNetServer((s) => {
    this.accepted.push(performance.now());
    s.once("data", () => this.requests++);
    if (this.hang) this.sockets.push(s);
    else s.destroy();
  });
  url = "";
  constructor(private readonly hang = true) {}

  async start(): Promise<this> {
    await new Promise<void>((r) => this.server.listen(0, "127.0.0.1", r));
    this.url = `http://127.0.0.1:${(this.server.address() as { port: number }).port}`;
    return this;
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}

function readBody(req: IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => resolve(Buffer.concat(chunks).toString("utf8")));
    req.on("error", reject);
  });
}

export const THE_BOT = { id: 42, is_bot: true, first_name: "Bot", username: "test_bot" };

export interface TelegramCall {
  method: string;
  payload: Record<string, unknown>;
}

/**
 * A stand-in for the Telegram Bot API over real HTTP (`apiRoot` of grammY
 * and Telegraf): records each call and answers as Telegram would.
 * `getUpdates` hands out the updates queued with `queue()` once, and holds
 * an empty poll for a moment as a long poll does.
 */
export class FakeTelegram {
  readonly calls: TelegramCall[] = [];
  private updates: unknown[] = [];
  private nextMessageId = 1000;
  private server: HttpServer = createHttpServer((req, res) => void this.handle(req, res));
  url = "";

  async start(): Promise<this> {
    await new Promise<void>((r) => this.server.listen(0, "127.0.0.1", r));
    this.url = `http://127.0.0.1:${(this.server.address() as { port: number }).port}`;
    return this;
  }

  queue(...updates: unknown[]): void {
    this.updates.push(...updates);
  }

  /** The texts of the messages sent, in order. */
  sent(): string[] {
    return this.calls.filter((c) => c.method === "sendMessage").map((c) => String(c.payload.text));
  }

  async close(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((r) => this.server.close(() => r()));
  }

  private async handle(req: import("node:http").IncomingMessage, res: import("node:http").ServerResponse) {
    const raw = await readBody(req);
    const method = (req.url ?? "").split("?")[0]!.split("/").pop() ?? "";
    let payload: Record<string, unknown> = {};
    if (raw) {
      try {
        payload = JSON.parse(raw) as Record<string, unknown>;
      } catch {
        payload = Object.fromEntries(new URLSearchParams(raw));
      }
    }
    let result: unknown = true;
    if (method === "getUpdates") {
      if (this.updates.length === 0) await sleep(100);
      result = this.updates.splice(0);
    } else {
      this.calls.push({ method, payload });
      if (method === "getMe") result = THE_BOT;
      else if (method === "sendMessage") {
        const chatId = Number(payload.chat_id);
        result = {
          message_id: this.nextMessageId++,
          date: Math.floor(Date.now() / 1000),
          chat: chatId > 0 ? { id: chatId, type: "private", first_name: "U" } : { id: chatId, type: "supergroup", title: "G" },
          from: THE_BOT,
          text: payload.text,
        };
      }
    }
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify({ ok: true, result }));
  }
}

/** A Telegram message update. */
export function messageUpdate(n: number, user: { id: number; first_name: string }, chat: { id: number; type: string }, text: string) {
  const entities = text.startsWith("/") ? [{ type: "bot_command", offset: 0, length: text.split(/\s/)[0]!.length }] : undefined;
  return {
    update_id: n,
    message: {
      message_id: n,
      date: Math.floor(Date.now() / 1000),
      chat: chat.type === "private" ? { ...chat, first_name: user.first_name } : { ...chat, title: "Group" },
      from: { ...user, is_bot: false },
      text,
      ...(entities ? { entities } : {}),
    },
  };
}

export const ANN = { id: 7, first_name: "Ann" }; // an admin of the bot
export const BOB = { id: 8, first_name: "Bob" };
export const ANN_CHAT = { id: 7, type: "private" };
export const BOB_CHAT = { id: 8, type: "private" };
export const GROUP = { id: -1001, type: "supergroup" };

/** A logger that keeps what the client says, for the tests to read. */
export function recordingLogger() {
  const lines: { level: string; message: string; at: number }[] = [];
  return {
    lines,
    warn: (message: string) => lines.push({ level: "warn", message, at: performance.now() }),
    error: (message: string) => lines.push({ level: "error", message, at: performance.now() }),
  };
}
