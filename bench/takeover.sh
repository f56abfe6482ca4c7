#!/usr/bin/env bash
# Takeover of a PostgreSQL store: a leader and a standby (`shoal up --store`), a
# joined machine given both endpoints; SIGKILL the leader and time until the
# standby listens, and until the first job submitted after the kill has
# completed through it (`shoal job submit --wait`, endpoints leader,standby).
# Usage (from the repository root, after `cargo build --release`):
#   bench/takeover.sh [RUNS]   (default 5; leader_lease_seconds 6, the default)
set -euo pipefail
runs=${1:-5}
shoal="$PWD/target/release/shoal"
base=$(scripts/pg-up.sh | sed -n 's/^export SHOAL_TEST_POSTGRES=//p')
server=${base%/*}
now() { date +%s.%N; }
for run in $(seq "$runs"); do
  work=$(mktemp -d)
  db="shoal_takeover_$run"
  psql "$base" -qc "DROP DATABASE IF EXISTS $db" -qc "CREATE DATABASE $db" >/dev/null
  url="$server/$db"
  a="127.0.0.1:$((20000 + RANDOM % 20000))"; b="127.0.0.1:$((20000 + RANDOM % 20000))"
  SHOAL_CONFIG_DIR="$work/config" "$shoal" up --listen "$a" --data-dir "$work/a" --store "$url" >"$work/a.log" 2>&1 &
  leader=$!
  for _ in $(seq 100); do [ -s "$work/a/admin.token" ] && "$shoal" --endpoint "$a" cluster list --token "$(cat "$work/a/admin.token")" >/dev/null 2>&1 && break; sleep 0.1; done
  SHOAL_CONFIG_DIR="$work/configb" "$shoal" up --listen "$b" --data-dir "$work/b" --store "$url" >"$work/b.log" 2>&1 &
  standby=$!
  export SHOAL_TOKEN=$(cat "$work/a/admin.token") SHOAL_ENDPOINT="$a,$b"
  "$shoal" cluster create --name ha --vm-size Standard_D2_v2 --max-nodes 1 >/dev/null
  join=$("$shoal" -o json join-token create --cluster ha | sed -n 's/.*"token": *"\([^"]*\)".*/\1/p')
  "$shoal" agent --endpoint "$a,$b" --join-token "$join" --work-dir "$work/machine" >"$work/agent.log" 2>&1 &
  agent=$!
  "$shoal" job submit --cluster ha --wait -- true >/dev/null   # warm: the machine runs work
  sleep 1
  kill -KILL "$leader"; killed=$(now)
  until (exec 3<>"/dev/tcp/${b%:*}/${b#*:}") 2>/dev/null; do sleep 0.05; done; listening=$(now)
  until "$shoal" job submit --cluster ha --wait -- true >/dev/null 2>&1; do sleep 0.05; done; placed=$(now)
  awk -v k="$killed" -v l="$listening" -v p="$placed" -v r="$run" \
    'BEGIN { printf "run %d: standby listening %.2f s, first job completed %.2f s after the SIGKILL\n", r, l - k, p - k }'
  kill "$agent" "$standby" 2>/dev/null || true; wait 2>/dev/null || true
  rm -rf "$work"
done
