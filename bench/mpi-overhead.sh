#!/usr/bin/env bash
# MPI launch overhead: a 3-node, 6-rank MPI job (shoal-mpi-train, 1 epoch) submitted
# to warm local nodes and waited for (`shoal job submit --wait`), against the same
# mpirun run by hand over three hostfile entries of this machine whose daemons are
# started by a plain `sh -c` remote shell (the best case: no agents, no coordinator).
# Both include MPI start-up, the run and teardown; the difference is Shoal's share.
# Usage: bench/mpi-overhead.sh [RUNS, default 10]
#   (after cargo build --release && images/build.sh mpi-train)
set -euo pipefail
cd "$(dirname "$0")/.."
train="$PWD/target/release/shoal-mpi-train"
runs="${1:-10}"
source bench/lib.sh   # $shoal, $work, $ep: a coordinator of our own
"$shoal" cluster create --endpoint "$ep" --name mpi --vm-size Standard_D2_v2 --min-nodes 3 --max-nodes 3 --wait >/dev/null
printf 'compute: mpi\ncommand: %s --epochs 1\nresources: {instance_count: 3}\ndistribution: {type: mpi, process_count_per_instance: 2}\n' "$train" >"$work/job.yaml"
ms() { echo $(( $(date +%s%N) / 1000000 )); }
median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

"$shoal" job submit --endpoint "$ep" -f "$work/job.yaml" --wait >/dev/null   # warm-up
for _ in $(seq "$runs"); do
  t0=$(ms); "$shoal" job submit --endpoint "$ep" -f "$work/job.yaml" --wait -o json >"$work/job.json"; t1=$(ms)
  grep -q '"status": "completed"' "$work/job.json" || { echo "job failed:"; cat "$work/job.json"; exit 1; }
  echo $((t1 - t0))
done >"$work/shoal.ms"
barrier=$("$shoal" job list --endpoint "$ep" -o json | grep -o '"id": "job-[0-9]*"' | tail -1 | cut -d'"' -f4)
barrier=$("$shoal" job logs --endpoint "$ep" "$barrier" | grep -o 'ready in [0-9]* ms' || true)

cat >"$work/rsh" <<'SH'
#!/bin/sh
host=$1; shift
mkdir -p "$WORK/$host"
export TMPDIR="$WORK/$host" OMPI_MCA_orte_tmpdir_base="$WORK/$host" OMPI_MCA_btl_vader_backing_directory="$WORK/$host"
exec sh -c "$*"
SH
chmod +x "$work/rsh"
printf 'a slots=2\nb slots=2\nc slots=2\n' >"$work/hosts"
export WORK="$work" OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
by_hand() {
  mpirun -np 6 --hostfile "$work/hosts" --mca plm_rsh_agent "$work/rsh" --mca plm_rsh_no_tree_spawn 1 \
    --mca orte_leave_session_attached 1 --mca plm_rsh_pass_environ_mca_params 0 \
    -x SHOAL_OUTPUT_DIR="$work/out" "$train" --epochs 1 >/dev/null
}
by_hand
for _ in $(seq "$runs"); do t0=$(ms); by_hand; t1=$(ms); echo $((t1 - t0)); done >"$work/hand.ms"

s=$(median <"$work/shoal.ms"); h=$(median <"$work/hand.ms")
echo "3 nodes x 2 ranks, $runs runs each, medians:"
echo "  shoal job submit --wait (submit -> completed): $s ms   [$(tr '\n' ' ' <"$work/shoal.ms")]"
echo "  mpirun by hand (sh remote shell):              $h ms   [$(tr '\n' ' ' <"$work/hand.ms")]"
echo "  Shoal's overhead: $(awk -v s="$s" -v h="$h" 'BEGIN {print s - h}') ms (barrier: ${barrier:-?})"
