#!/usr/bin/env bash
# Agent overhead: CPU (% of one core) and RSS of an idle node's `shoal agent`, with
# telemetry every 5 s (the default) and, for comparison, every hour (no sampling).
# Usage: bench/agent-overhead.sh [SECONDS per run, default 60]   (after cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."
shoal="$PWD/target/release/shoal"
seconds="${1:-60}"
ticks=$(getconf CLK_TCK)
measure() {
  local interval="$1" work port up pid t0 t1 rss
  work=$(mktemp -d); port=$((20000 + RANDOM % 20000))
  export SHOAL_CONFIG_DIR="$work/config"
  SHOAL_TELEMETRY_INTERVAL_SECONDS="$interval" "$shoal" up --data-dir "$work" --listen "127.0.0.1:$port" >/dev/null 2>&1 &
  up=$!
  for _ in $(seq 50); do "$shoal" cluster list --endpoint "127.0.0.1:$port" >/dev/null 2>&1 && break; sleep 0.2; done
  "$shoal" cluster create --endpoint "127.0.0.1:$port" --name bench --vm-size Standard_D2_v2 --min-nodes 1 --wait >/dev/null
  sleep 3
  pid=$(pgrep -f "shoal agent .*--work-dir $work/nodes" | head -1)
  t0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  sleep "$seconds"
  t1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
  kill "$up"; wait "$up" 2>/dev/null || true; rm -rf "$work"
  awk -v d="$((t1 - t0))" -v t="$ticks" -v s="$seconds" -v r="$rss" -v i="$interval" \
    'BEGIN { printf "telemetry every %5s s: %.3f%% of a core over %d s, RSS %.1f MB\n", i, 100 * d / t / s, s, r / 1024 }'
}
measure 5
measure 3600
