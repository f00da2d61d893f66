#!/usr/bin/env bash
# The Node client's checks, as CI runs them (tests/api/stack.rs calls this
# script from `cargo test`):
#
#   BOTMETRICS_BIN=target/debug/botmetrics clients/node/ci.sh
#
# 1. `npm ci`: the pinned devDependencies (typescript, grammy, telegraf,
#    @types/node) from the npm registry, as package-lock.json has them;
# 2. tsc: the package, its tests and the examples (checkJs) type-check;
# 3. `npm pack` (prepack builds dist/ with tsc): the tarball holds
#    dist/*.js and dist/*.d.ts and nothing else of the tree; installed
#    alone into a fresh project, every entry point imports (ESM and
#    require) with no other package present (no runtime dependency); with
#    grammy, telegraf and typescript beside it a small consumer passes
#    `tsc --noEmit`, the package's types included;
# 4. the tests (node --test) against the server binary $BOTMETRICS_BIN,
#    with CI=true so a missing binary fails rather than skips; the README's
#    examples run as written among them.
#
# Any failure, a registry package that cannot be had included, exits non-zero.
set -euo pipefail
cd "$(dirname "$0")"
CLIENT=$PWD
export CI=true  # never an inherited CI=false or 0: a skip here would pass in silence
export npm_config_audit=false npm_config_fund=false npm_config_update_notifier=false
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost

# AbortSignal.any, require(esm) and --test-concurrency: Node 20.19+ (Debian
# 12's own nodejs is 18: too old, and that is a failure, not a skip).
node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 19) ? 0 : 1)' ||
    { echo "Node.js 20.19 or newer is needed, this is $(node --version)"; exit 1; }
echo "--- node: $(node --version), npm $(npm --version): npm ci"
npm ci --no-audit --no-fund

echo "--- node: tsc (package, tests, examples)"
# The package is built first: the examples import it by its own name
# (`botmetrics`, resolved through package.json's exports to dist/), as a
# bot's code would. A fresh clone has no dist/ until then.
rm -rf dist
npx tsc -p tsconfig.json
npx tsc -p tsconfig.examples.json

echo "--- node: npm pack"
rm -rf dist build ./*.tgz
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
npm pack --silent --pack-destination "$WORK" >/dev/null
TARBALL=$(ls "$WORK"/botmetrics-*.tgz)
VERSION=$(node -p 'require("./package.json").version')
[ "$(basename "$TARBALL")" = "botmetrics-$VERSION.tgz" ] || { echo "unexpected tarball $TARBALL"; exit 1; }
tar tzf "$TARBALL" | sort > "$WORK/contents"
cat > "$WORK/expected" <<LIST
package/README.md
package/dist/_shared.d.ts
package/dist/_shared.js
package/dist/grammy.d.ts
package/dist/grammy.js
package/dist/index.d.ts
package/dist/index.js
package/dist/telegraf.d.ts
package/dist/telegraf.js
package/package.json
LIST
diff -u "$WORK/expected" "$WORK/contents" || { echo "the tarball's files are not the expected ones"; exit 1; }

echo "--- node: the tarball alone in a fresh project"
mkdir "$WORK/bare"
(
  cd "$WORK/bare"
  npm init -y >/dev/null
  npm install --no-audit --no-fund --offline "$TARBALL" >/dev/null
  [ "$(ls node_modules)" = "botmetrics" ] || { echo "botmetrics brought packages with it: $(ls node_modules)"; exit 1; }
  node --input-type=module -e "
    import assert from 'node:assert/strict';
    import { BotMetrics, BotMetricsError, VERSION, backoffDelays } from 'botmetrics';
    import * as grammy from 'botmetrics/grammy';
    import * as telegraf from 'botmetrics/telegraf';
    assert.equal(VERSION, '$VERSION', 'VERSION differs from package.json');
    assert.equal(typeof BotMetrics, 'function');
    assert.equal(typeof BotMetricsError, 'function');
    assert.equal(typeof backoffDelays, 'function');
    assert.equal(typeof grammy.botMetrics, 'function');
    assert.equal(typeof telegraf.botMetrics, 'function');
    const m = new BotMetrics('http://127.0.0.1:9', 'x', { logger: null });
    m.message(1, 'user');
    assert.equal(m.pending, 1);
    assert.equal(await m.close(0), false);
    console.log('botmetrics', VERSION, 'imports (ESM) with no other package');
  "
  node -e "
    const { BotMetrics } = require('botmetrics');
    const { botMetrics } = require('botmetrics/grammy');
    if (typeof BotMetrics !== 'function' || typeof botMetrics !== 'function') process.exit(1);
    console.log('botmetrics requires (CommonJS, Node 20.19+)');
  " 2>&1
)

echo "--- node: a TypeScript consumer with grammy and telegraf (tsc --noEmit)"
mkdir "$WORK/consumer"
PINS=$(node -p 'const d = require("./package.json").devDependencies; ["grammy", "telegraf", "typescript", "@types/node"].map((n) => n + "@" + d[n]).join(" ")')
(
  cd "$WORK/consumer"
  npm init -y >/dev/null
  npm pkg set type=module >/dev/null
  # shellcheck disable=SC2086 # one word per package
  npm install --no-audit --no-fund --prefer-offline "$TARBALL" $PINS >/dev/null
  cat > tsconfig.json <<'JSON'
{ "compilerOptions": { "target": "ES2022", "module": "NodeNext", "moduleResolution": "NodeNext",
  "strict": true, "noEmit": true, "skipLibCheck": true, "types": ["node"] }, "files": ["bot.ts"] }
JSON
  cat > tsconfig.core.json <<'JSON'
{ "compilerOptions": { "target": "ES2022", "module": "NodeNext", "moduleResolution": "NodeNext",
  "strict": true, "noEmit": true, "skipLibCheck": false, "types": ["node"] }, "files": ["core.ts"] }
JSON
  cat > core.ts <<'TS'
import { BotMetrics, BotMetricsError, type BotMetricsOptions, type BotEvent } from "botmetrics";
const options: BotMetricsOptions = { batchSize: 10, flushIntervalMs: 500, logger: null };
const metrics = new BotMetrics("http://127.0.0.1:9464", "change-me", options);
metrics.message(1, "user", { chatType: "private", dbQueries: 2 });
// @ts-expect-error: a role is "user" or "assistant"
metrics.message(1, "bot");
metrics.response("u", "success", 12, { model: "m", tokens: [1, 2], cachedTokens: 1 });
const answer: Promise<string> = metrics.measureResponse(1, async (call) => { call.tokens = { prompt: 1, completion: 2 }; return "a"; });
const closed: Promise<boolean> = metrics.close();
const e: BotMetricsError = new BotMetricsError(500, "x");
const ev: BotEvent = { type: "custom", event_id: "1", ts: 0, name: "x" };
void answer; void closed; void e; void ev;
TS
  cat > bot.ts <<'TS'
import { Bot, type Context } from "grammy";
import { Telegraf } from "telegraf";
import { BotMetrics } from "botmetrics";
import { botMetrics } from "botmetrics/grammy";
import { botMetrics as telegrafMetrics } from "botmetrics/telegraf";
const metrics = new BotMetrics("http://127.0.0.1:9464", "change-me");
const bot = new Bot<Context>("1:x");
const mw = botMetrics(metrics, { adminIds: [1], dbQueries: (ctx) => (ctx.from ? 1 : undefined) });
bot.use(mw);
mw.attach(bot);
bot.api.config.use(mw.transformer);
const tg = new Telegraf("1:x");
tg.use(telegrafMetrics(metrics, { adminIds: [1], command: "stats", botName: "default" }));
// @ts-expect-error: adminIds are numbers
botMetrics(metrics, { adminIds: ["1"] });
TS
  npx tsc -p tsconfig.core.json
  npx tsc -p tsconfig.json
  echo "the consumer type-checks"
)

echo "--- node: tests against $BOTMETRICS_BIN"
[ -x "${BOTMETRICS_BIN:?set BOTMETRICS_BIN to the server binary}" ] || { echo "no server binary at $BOTMETRICS_BIN"; exit 1; }
npx tsc -p tsconfig.test.json
node --test --test-concurrency=1 build/test/*.test.js

echo "--- node: the hot-path benchmark runs (a short run; figures in BENCHMARKS.md)"
N=20000 node benchmarks/hot_path.mjs
