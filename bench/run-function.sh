#!/usr/bin/env bash
# run_function's overhead per mini-batch: 500 one-line mini-batches on one warm
# local node, one worker, through (1) the run_function driver with a trivial entry
# script (`run` returns its mini-batch) and (2) Shoal's own worker mode with a
# shell loop (`cat` of each mini-batch), the same engine underneath; 3 runs each,
# alternated. Per mini-batch = the job's submit-to-completed wall time / 500.
# Usage: bench/run-function.sh   (after cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh   # $shoal, $work, $ep: a coordinator of our own
"$shoal" cluster create --endpoint "$ep" --name one --vm-size Standard_D2_v2 --min-nodes 1 --max-nodes 1 --wait >/dev/null
mkdir -p "$work/src"
printf 'def init():\n    pass\n\ndef run(mini_batch):\n    return mini_batch\n' >"$work/src/score.py"
seq 1 500 >"$work/in.txt"
printf 'type: parallel\ncompute: one\ninputs: {data: {type: uri_file, path: ./in.txt}}\noutputs: {rows: {type: uri_folder}}\ninput_data: ${{inputs.data}}\nmini_batch_size: 1\ntask: {type: run_function, code: ./src, entry_script: score.py, environment: host, append_row_to: "${{outputs.rows}}/rows.txt"}\n' >"$work/rf.yml"
printf 'type: parallel\ncompute: one\ninputs: {data: {type: uri_file, path: ./in.txt}}\nmini_batch_size: 1\ntask: {command: "while read b; do cat $b; echo SHOAL_MINI_BATCH_DONE; done", mode: worker}\noutput: {append_row_to: rows.txt}\n' >"$work/worker.yml"
ms() { echo $(( $(date +%s%N) / 1000000 )); }
run() {
  local t0 t1; t0=$(ms)
  "$shoal" job submit --endpoint "$ep" -f "$work/$1.yml" --wait -o json >"$work/job.json"
  t1=$(ms)
  grep -q '"status": "completed"' "$work/job.json" || { cat "$work/job.json"; exit 1; }
  echo $((t1 - t0))
}
run rf >/dev/null   # warm-up
for i in 1 2 3; do
  w=$(run worker); r=$(run rf)
  echo "run $i: run_function $(awk -v t="$r" 'BEGIN { printf "%.2f", t / 500 }') ms per mini-batch ($r ms); worker-mode shell loop $(awk -v t="$w" 'BEGIN { printf "%.2f", t / 500 }') ms ($w ms)"
done
