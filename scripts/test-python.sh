#!/usr/bin/env bash
# The Python SDK's suite: target/sdk-venv with `pip install ./sdk/python[test]`,
# then ruff, mypy (strict) and pytest against real `shoal up` coordinators started by the
# fixtures (the binary: $SHOAL_BIN, else target/debug/shoal, built if missing).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/target/sdk-venv"
command -v python3 >/dev/null || { echo "the SDK tests need python3 (apt-get install python3 python3-venv)" >&2; exit 1; }
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" || { echo "python3 cannot make a venv (apt-get install python3-venv)" >&2; exit 1; }
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check "$root/sdk/python[test]"
export SHOAL_BIN="${SHOAL_BIN:-$root/target/debug/shoal}"
[ -x "$SHOAL_BIN" ] || cargo build --locked --bin shoal --manifest-path "$root/Cargo.toml"
# The tracking test's job logs with the real mlflow client, from the Rust tests' venv.
export SHOAL_TEST_PYTHON="${SHOAL_TEST_PYTHON:-$("$root/scripts/test-venv.sh")}"
cd "$root/sdk/python"
"$venv/bin/ruff" check shoal tests
"$venv/bin/ruff" format --check shoal tests
"$venv/bin/python" -m mypy
"$venv/bin/python" -m pytest -q "$@"
