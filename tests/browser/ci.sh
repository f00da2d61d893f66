#!/usr/bin/env bash
# The built-in page in a real browser, as CI runs it (tests/api/page.rs
# calls this script from `cargo test`):
#
#   BOTMETRICS_BIN=target/debug/botmetrics tests/browser/ci.sh
#
# Installs the pinned playwright-core (package-lock.json) with `npm ci` into
# $BOTMETRICS_BROWSER_DIR (default target/browser-test), then runs
# page.test.cjs against Debian's Chromium ($CHROMIUM, default
# /usr/bin/chromium). Screenshots go to $SCREENSHOTS (default
# $BOTMETRICS_BROWSER_DIR/screenshots; scripts/screenshots.sh points it at
# docs/). Any failure, npm's included, exits non-zero.
set -euo pipefail
cd "$(dirname "$0")"
REPO=$(cd ../.. && pwd)
DIR=${BOTMETRICS_BROWSER_DIR:-$REPO/target/browser-test}
export CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
export SCREENSHOTS=${SCREENSHOTS:-$DIR/screenshots}
: "${BOTMETRICS_BIN:?BOTMETRICS_BIN must name the server binary}"
[ -x "$CHROMIUM" ] || { echo "no Chromium at $CHROMIUM (apt-get install chromium)" >&2; exit 1; }

mkdir -p "$DIR"
cp package.json package-lock.json "$DIR/"
# The browser is the system's: playwright-core downloads none.
(cd "$DIR" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)

echo "--- browser: $("$CHROMIUM" --version 2>/dev/null || echo chromium), playwright-core $(node -p "require('$DIR/node_modules/playwright-core/package.json').version")"
NODE_PATH="$DIR/node_modules" node page.test.cjs
