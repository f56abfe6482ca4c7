#!/usr/bin/env bash
# The Python the tests use: target/test-venv, with tests/python/requirements.txt
# installed from PyPI. Idempotent: does nothing when it is already there for this
# requirements file. Prints the interpreter's path.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/target/test-venv"
requirements="$root/tests/python/requirements.txt"
stamp="$venv/.installed-$(sha256sum "$requirements" | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  command -v python3 >/dev/null || { echo "the tests need python3 (apt-get install python3 python3-venv)" >&2; exit 1; }
  rm -rf "$venv"
  python3 -m venv "$venv" >&2 || { echo "python3 cannot make a venv (apt-get install python3-venv)" >&2; exit 1; }
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements" >&2
  touch "$stamp"
fi
echo "$venv/bin/python"
