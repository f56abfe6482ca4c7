#!/usr/bin/env bash
# Fuzzing the edges: every proptest suite of coordinator/src/fuzz_tests.rs
# (protobuf into the wire conversions, job and compute YAML into their parsers,
# bodies into the HTTP API on a real control loop), N cases each (default
# 100000), in a release build; prints the time and the peak memory.
#
#   bench/fuzz.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
cases=${1:-100000}
binary=$(cargo test --release -p shoal-coordinator --lib --no-run --message-format=json 2>/dev/null |
  sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
[ -x "$binary" ] || { echo "no test binary built" >&2; exit 1; }
echo "fuzz: $cases cases per suite, $(nproc) cores, $(date -u +%Y-%m-%d)"
report=$(mktemp)
SHOAL_FUZZ_CASES=$cases /usr/bin/time -v "$binary" fuzz_tests --test-threads 1 2> "$report" |
  grep -E '^test |test result'
grep -E 'Elapsed \(wall clock\)|Maximum resident set size' "$report"
rm -f "$report"
