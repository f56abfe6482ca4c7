#!/usr/bin/env bash
# The peer's side of `shoal-bench backlog`: HyperQueue's server RSS, idle and
# with N tasks queued (one array of `true`, no workers, so nothing runs).
#   bench/peer-backlog.sh [N]     (default 100000; HQ=path/to/hq, default ../shared/peers/hq)
# Run it in the same session as `target/release/shoal-bench backlog N`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
HQ=${HQ:-$here/../../shared/peers/hq}
N=${1:-100000}
D=$(mktemp -d)
export HQ_SERVER_DIR=$D
"$HQ" server start --host 127.0.0.1 >"$D/server.log" 2>&1 &
S=$!
trap 'kill $S 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
sleep 2
rss() { awk '/VmRSS/{print $2}' "/proc/$S/status"; }
echo "hyperqueue: server RSS idle: $(rss) kB"
"$HQ" submit --array 1-"$N" -- true >/dev/null
sleep 2
echo "hyperqueue: server RSS with $N tasks queued (one array, no workers): $(rss) kB"
