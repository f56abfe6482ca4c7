#!/bin/sh
# Scores CSV rows `id,x1,x2,x3` with a fixed linear model and prints `id,score`
# (one result row per input row). A Shoal parallel job runs it once per mini-batch:
# $SHOAL_MINI_BATCH is a file of the mini-batch's items, one per line: the rows
# themselves (uri_file input) or paths of CSV files (uri_folder input).
# Runs as a plain process (sh images/batch-score/score.sh) or in shoal/batch-score.
set -eu
batch="${SHOAL_MINI_BATCH:?run me from a Shoal parallel job, or set SHOAL_MINI_BATCH}"
score() {
  awk -F, 'BEGIN { w1 = 0.8; w2 = -1.3; w3 = 0.4; b = 0.1 }
    /^[ \t]*$/ || $1 == "id" { next }
    NF < 4 { printf "bad row: %s\n", $0 > "/dev/stderr"; bad = 1; next }
    { printf "%s,%.6f\n", $1, w1 * $2 + w2 * $3 + w3 * $4 + b }
    END { exit bad }' "$@"
}
if [ "${SHOAL_MINI_BATCH_TYPE:-uri_file}" = uri_folder ]; then
  # One CSV file per line.
  while IFS= read -r file; do score "$file" || exit 1; done < "$batch"
else
  score "$batch"
fi
