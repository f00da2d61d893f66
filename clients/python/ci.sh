#!/usr/bin/env bash
# The Python client's checks, as CI runs them (tests/api/stack.rs calls this
# script from `cargo test`):
#
#   BOTMETRICS_BIN=target/debug/botmetrics clients/python/ci.sh
#
# 1. a fresh virtualenv with nothing but `pip install ./clients/python`: the
#    package builds, installs with its py.typed, and imports;
# 2. the test virtualenv (kept between runs, $BOTMETRICS_PY_VENV, default
#    target/python-venv): this package reinstalled from the tree, and pinned
#    aiogram, mypy and prometheus-client from PyPI;
# 3. mypy --strict over the package, the example bot and the benchmark;
# 4. the tests against the server binary $BOTMETRICS_BIN, with CI=true so a
#    missing package or binary fails rather than skips.
#
# Any failure, a PyPI package that cannot be had included, exits non-zero.
set -euo pipefail
cd "$(dirname "$0")"
CLIENT=$PWD
REPO=$(cd ../.. && pwd)
VENV=${BOTMETRICS_PY_VENV:-$REPO/target/python-venv}
PYTHON=${PYTHON:-python3}
PINS=(aiogram==3.31.0 mypy==2.4.1 prometheus-client==0.26.0)
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
export CI=true  # never an inherited CI=false or 0: a skip here would pass in silence

echo "--- python: pip install ./clients/python in a fresh virtualenv"
# setuptools builds in the tree; a module removed since the last build
# would live on in build/lib.
rm -rf build src/*.egg-info
FRESH=$VENV-fresh
rm -rf "$FRESH"
"$PYTHON" -m venv "$FRESH"
(cd "$REPO" && "$FRESH/bin/pip" install -q ./clients/python)
"$FRESH/bin/python" - <<'PY'
import importlib.metadata, importlib.resources, botmetrics, botmetrics.simulate
assert importlib.resources.files("botmetrics").joinpath("py.typed").is_file(), "py.typed is not installed"
assert botmetrics.__version__ == importlib.metadata.version("botmetrics"), "__version__ differs from pyproject.toml"
assert not importlib.metadata.requires("botmetrics") or all("extra ==" in r for r in importlib.metadata.requires("botmetrics")), \
    "botmetrics must have no runtime dependencies"
print("botmetrics", botmetrics.__version__, "from", botmetrics.__file__)
PY
"$FRESH/bin/python" -m botmetrics.simulate --help >/dev/null
rm -rf "$FRESH"

echo "--- python: test virtualenv $VENV (${PINS[*]})"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q "${PINS[@]}"
"$VENV/bin/pip" install -q --force-reinstall --no-deps .
rm -rf build src/*.egg-info

echo "--- python: mypy --strict"
"$VENV/bin/mypy" --strict src/botmetrics example_aiogram_bot.py benchmarks/hot_path.py

echo "--- python: tests"
# From tests/: the package under test is the installed one, not src/.
cd tests
PATH="$VENV/bin:$PATH" "$VENV/bin/python" -m unittest discover -s . -v
