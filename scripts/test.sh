#!/usr/bin/env bash
# Every test: the Rust workspace's, then the Python SDK's (scripts/test-python.sh),
# which runs against the `shoal` binary the first part built.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --locked "$@"
scripts/test-python.sh
