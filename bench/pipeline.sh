#!/usr/bin/env bash
# Pipelines: the gap from one step's end to the next step's start, on a warm
# one-node local cluster: a chain of 10 steps, each reading the one before's output
# (a folder of one small file) and writing its own; 3 pipelines (force_rerun: none
# reused), so 27 gaps. A gap
# is the next step's started_at (its process running on the node) less the step
# before's ended_at (its exit recorded), as `shoal job show -o json` gives them.
# Usage: bench/pipeline.sh   (after cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh   # $shoal, $work, $ep: a coordinator of our own
"$shoal" cluster create --endpoint "$ep" --name one --vm-size Standard_D2_v2 --min-nodes 1 --max-nodes 1 --wait >/dev/null
sleep 1
{
  printf 'type: pipeline\ncompute: one\nsettings: {force_rerun: true}\njobs:\n'
  printf '  s0: {command: "echo 0 > ${{outputs.o}}/n", environment: host, outputs: {o: }}\n'
  for i in $(seq 1 9); do
    printf '  s%d: {command: "cat ${{inputs.i}}/n > ${{outputs.o}}/n; echo %d >> ${{outputs.o}}/n", environment: host, inputs: {i: "${{parent.jobs.s%d.outputs.o}}"}, outputs: {o: }}\n' "$i" "$i" $((i - 1))
  done
} >"$work/chain.yml"
gaps="$work/gaps.txt"; : >"$gaps"
for run in 1 2 3; do
  id=$("$shoal" job submit --endpoint "$ep" -f "$work/chain.yml" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  for _ in $(seq 600); do
    status=$("$shoal" job show --endpoint "$ep" "$id" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
    [ "$status" = running ] || break
    sleep 0.1
  done
  [ "$status" = completed ] || { "$shoal" job show --endpoint "$ep" "$id"; exit 1; }
  for step in $("$shoal" job show --endpoint "$ep" "$id" -o json | python3 -c 'import json,sys; print(" ".join(s["id"] for s in json.load(sys.stdin)["pipeline"]["steps"]))'); do
    "$shoal" job show --endpoint "$ep" "$step" -o json
  done | python3 -c '
import json, sys
from datetime import datetime
text = sys.stdin.read()
jobs, at = [], 0
decoder = json.JSONDecoder()
while at < len(text):
    while at < len(text) and text[at].isspace():
        at += 1
    if at >= len(text):
        break
    job, at = decoder.raw_decode(text, at)
    jobs.append(job)
t = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() * 1000
for before, after in zip(jobs, jobs[1:]):
    print(round(t(after["started_at"]) - t(before["ended_at"]), 1))
' >>"$gaps"
done
python3 - "$gaps" <<'PY'
import statistics, sys
gaps = sorted(float(l) for l in open(sys.argv[1]))
q = statistics.quantiles(gaps, n=20)
print(f"step end -> next step start: {len(gaps)} gaps, median {statistics.median(gaps):.1f} ms, "
      f"p95 {q[18]:.1f} ms, min {gaps[0]:.1f} ms, max {gaps[-1]:.1f} ms")
PY
