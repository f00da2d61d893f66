#!/usr/bin/env bash
# Regenerates the README's screenshots of the built-in page
# (docs/page-desktop.png, docs/page-phone.png) by running the browser test
# with its screenshots pointed at docs/. Needs chromium, node and npm.
#
#   scripts/screenshots.sh            # builds the debug binary first
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet
target=${CARGO_TARGET_DIR:-target}
BOTMETRICS_BIN="$target/debug/botmetrics" SCREENSHOTS="$PWD/docs" tests/browser/ci.sh
ls -l docs/page-desktop.png docs/page-phone.png
