#!/usr/bin/env bash
# Parallel jobs: (1) per-mini-batch overhead: 2,000 one-line mini-batches through a
# trivial scorer (`cat`), 2 warm local nodes x 2 workers; (2) scaling of a CPU-bound
# scorer (about 0.25 s of awk per mini-batch, 40 mini-batches) from 1 node to 2
# nodes, one worker each (this machine has 2 cores: 1 node uses one, 2 use both).
# Usage: bench/parallel.sh   (after cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh   # $shoal, $work, $ep: a coordinator of our own
ms() { echo $(( $(date +%s%N) / 1000000 )); }
run() { # cluster lines batch instances workers command [task settings] -> wall ms
  printf 'type: parallel\ncompute: %s\ninputs: {data: {type: uri_file, path: ./in.csv}}\nmini_batch_size: %s\nresources: {instance_count: %s}\nmax_concurrency_per_instance: %s\ntask: {command: %s%s}\noutput: {append_row_to: out.csv}\n' \
    "$1" "$3" "$4" "$5" "$6" "${7:-}" >"$work/job.yaml"
  seq 1 "$2" >"$work/in.csv"
  local t0 t1; t0=$(ms)
  "$shoal" job submit --endpoint "$ep" -f "$work/job.yaml" --wait -o json >"$work/job.json"
  t1=$(ms)
  grep -q '"status": "completed"' "$work/job.json" || { cat "$work/job.json"; exit 1; }
  echo $((t1 - t0))
}
"$shoal" cluster create --endpoint "$ep" --name two --vm-size Standard_D2_v2 --min-nodes 2 --max-nodes 2 --wait >/dev/null
"$shoal" cluster create --endpoint "$ep" --name one --vm-size Standard_D2_v2 --min-nodes 1 --max-nodes 1 --wait >/dev/null
sleep 1
run two 200 1 2 2 "'cat \$SHOAL_MINI_BATCH'" >/dev/null   # warm-up
trivial=$(run two 2000 1 2 2 "'cat \$SHOAL_MINI_BATCH'")
echo "overhead: 2000 mini-batches (cat) on 2 nodes x 2 workers in $trivial ms:" \
  "$(awk -v t="$trivial" 'BEGIN { printf "%.0f mini-batches/s, %.2f ms per mini-batch per worker", 2000000 / t, 4 * t / 2000 }')"
serial=$(run one 500 1 1 1 "'cat \$SHOAL_MINI_BATCH'")
echo "latency: 500 mini-batches (cat) on 1 node x 1 worker in $serial ms:" \
  "$(awk -v t="$serial" 'BEGIN { printf "%.2f ms per mini-batch, end to end", t / 500 }')"
resident=$(run one 500 1 1 1 "'while read b; do cat \$b; echo SHOAL_MINI_BATCH_DONE; done'" ", mode: worker")
echo "worker mode: 500 mini-batches through one long-lived process: $resident ms:" \
  "$(awk -v t="$resident" 'BEGIN { printf "%.2f ms per mini-batch", t / 500 }')"
if docker image inspect shoal/base >/dev/null 2>&1; then
  per=$(run one 20 1 1 1 "'cat \$SHOAL_MINI_BATCH'" ", environment: {image: shoal/base}")
  fed=$(run one 500 1 1 1 "'while read b; do cat \$b; echo SHOAL_MINI_BATCH_DONE; done'" ", mode: worker, environment: {image: shoal/base}")
  echo "containers: a container per mini-batch $(awk -v t="$per" 'BEGIN { printf "%.0f", t / 20 }') ms each (20);" \
    "one worker container fed on stdin $(awk -v t="$fed" 'BEGIN { printf "%.2f", t / 500 }') ms each (500)"
fi
busy="'awk \"BEGIN { for (i = 0; i < 3000000; i++) s += i }\"; cat \$SHOAL_MINI_BATCH'"
one=$(run one 40 1 1 1 "$busy")
two=$(run two 40 1 2 1 "$busy")
echo "scaling: 40 CPU-bound mini-batches: 1 node $one ms, 2 nodes $two ms:" \
  "$(awk -v a="$one" -v b="$two" 'BEGIN { printf "speed-up %.2fx, efficiency %.0f%% of 2 cores", a / b, 50 * a / b }')"
