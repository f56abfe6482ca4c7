#!/bin/sh
# Scores CSV rows `id,x1,x2,x3` with a fixed linear model and prints `id,score`
# (one result row per input row). A Shoal parallel job runs it
# - once per mini-batch (task mode per_mini_batch, the default): $SHOAL_MINI_BATCH is
#   a file of the mini-batch's items, one per line: the rows themselves (uri_file
#   input) or paths of CSV files (uri_folder input);
# - or once per worker (task mode worker, SHOAL_WORKER_PROTOCOL=1): it reads one such
#   file path per line on stdin and answers each with its rows and then a line
#   SHOAL_MINI_BATCH_DONE (or SHOAL_MINI_BATCH_FAILED <why>).
# Runs as a plain process (sh images/batch-score/score.sh) or in shoal/batch-score.
set -u
score() {
  awk -F, 'BEGIN { w1 = 0.8; w2 = -1.3; w3 = 0.4; b = 0.1 }
    /^[ \t]*$/ || $1 == "id" { next }
    NF < 4 { printf "bad row: %s\n", $0 > "/dev/stderr"; bad = 1; next }
    { printf "%s,%.6f\n", $1, w1 * $2 + w2 * $3 + w3 * $4 + b }
    END { exit bad }' "$@"
}
score_batch() {
  if [ "${SHOAL_MINI_BATCH_TYPE:-uri_file}" = uri_folder ]; then
    while IFS= read -r file; do score "$file" || return 1; done < "$1"
  else
    score "$1"
  fi
}
if [ "${SHOAL_WORKER_PROTOCOL:-}" = 1 ]; then
  while IFS= read -r batch; do
    if score_batch "$batch"; then
      echo SHOAL_MINI_BATCH_DONE
    else
      echo "SHOAL_MINI_BATCH_FAILED bad rows in $batch"
    fi
  done
  exit 0
fi
score_batch "${SHOAL_MINI_BATCH:?run me from a Shoal parallel job, or set SHOAL_MINI_BATCH}"
