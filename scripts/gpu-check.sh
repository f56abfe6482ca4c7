#!/usr/bin/env bash
# Checks NVML telemetry and GPU job placement on a real NVIDIA GPU, asserting
# each reading against nvidia-smi or a bound.
# Usage: scripts/gpu-check.sh [path/to/shoal]     (default: target/release/shoal)
# Needs: an NVIDIA driver (nvidia-smi), python3 with PyTorch (CUDA) for the load.
# 1. shoal's NVML view of the node next to nvidia-smi (model, uuid, memory,
#    temperature, power, energy);
# 2. a ~20 s matrix-product job with one GPU through the process runtime: its live
#    utilization, its summary (peak utilization, GPU memory, energy), /metrics;
# 3. packing: two 1-cpu jobs that each want the node's one GPU take turns, while a
#    1-cpu job with no GPU runs beside the first.
set -uo pipefail
shoal="$(realpath "${1:-target/release/shoal}")"
[ -x "$shoal" ] || { echo "gpu-check: no shoal binary at $shoal; build it with cargo build --release" >&2; exit 2; }
command -v nvidia-smi >/dev/null || { echo "gpu-check: nvidia-smi not found: no NVIDIA driver here" >&2; exit 2; }
work="$(mktemp -d)"
port=$((20000 + RANDOM % 20000))
export SHOAL_ENDPOINT="127.0.0.1:$port" SHOAL_TELEMETRY_INTERVAL_SECONDS=1 SHOAL_CONFIG_DIR="$work/config"
cleanup() { kill "$up" 2>/dev/null; wait "$up" 2>/dev/null; rm -rf "$work"; }
"$shoal" up --data-dir "$work/data" --listen "$SHOAL_ENDPOINT" >"$work/up.log" 2>&1 &
up=$!
trap cleanup EXIT
for _ in $(seq 50); do "$shoal" cluster list >/dev/null 2>&1 && break; sleep 0.2; done
failed=0
check() { # check "what" python-expression-over-j (prints ok/FAILED)
  if python3 -c "import json,sys; j=json.load(open(sys.argv[1])); sys.exit(0 if ($2) else 1)" "$work/j.json"; then
    echo "   ok: $1"
  else
    echo "   FAILED: $1"; failed=1
  fi
}
echo "== date: $(date -u +%FT%TZ)   host: $(hostname)"
echo "== nvidia-smi"
nvidia-smi --query-gpu=index,name,uuid,utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw --format=csv
gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
smi_name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
smi_uuid=$(nvidia-smi --query-gpu=uuid --format=csv,noheader | head -1)
smi_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
size=Standard_NC6; [ "$gpus" -ge 8 ] && size=Standard_ND96isr_H100_v5
"$shoal" cluster create --name gpu --vm-size "$size" --min-nodes 1 --max-nodes 1 --wait >/dev/null || exit 1
node=$("$shoal" node list -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
# The first telemetry sample comes with a heartbeat: wait for it (per-core CPU is in every one).
for _ in $(seq 60); do
  "$shoal" -o json node show "$node" | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["per_core_percent"] else 1)' && break
  sleep 0.5
done
echo "== shoal node show $node (NVML through the agent)"
"$shoal" node show "$node"
"$shoal" -o json node show "$node" >"$work/j.json"
check "$gpus GPU(s), as nvidia-smi" "len(j['gpus']) == $gpus"
check "GPU 0 model is nvidia-smi's ($smi_name)" "j['gpus'][0]['model'] == '$smi_name'"
check "GPU 0 uuid is nvidia-smi's" "j['gpus'][0]['uuid'] == '$smi_uuid'"
check "GPU 0 memory total within 1% of nvidia-smi's $smi_mib MiB" "abs(j['gpus'][0]['memory_total_bytes'] / 2**20 - $smi_mib) <= $smi_mib / 100"
check "GPU 0 temperature between 1 and 110 C" "1 <= j['gpus'][0]['temperature_c'] <= 110"
check "GPU 0 power above 0 W" "j['gpus'][0]['power_watts'] > 0"
check "GPU 0 energy counter above 0 J" "j['gpus'][0]['energy_joules'] > 0"
mkdir -p "$work/code"
cat >"$work/code/load.py" <<'PY'
import os, sys, time, torch
assert torch.cuda.is_available(), "PyTorch sees no CUDA device"
print("CUDA_VISIBLE_DEVICES =", os.environ.get("CUDA_VISIBLE_DEVICES"), "device:", torch.cuda.get_device_name(0), flush=True)
seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 20
a = torch.randn(8192, 8192, device="cuda"); b = torch.randn(8192, 8192, device="cuda")
end = time.time() + seconds; n = 0
while time.time() < end:
    c = a @ b; n += 1
    if n % 50 == 0: torch.cuda.synchronize()
torch.cuda.synchronize(); print(f"{n} matmuls of 8192x8192 in {seconds} s", flush=True)
PY
job=$("$shoal" -o json job submit --cluster gpu --gpus-per-instance 1 --code "$work/code" -- python3 load.py | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo "== job $job submitted (1 GPU)"
peak=0
for _ in $(seq 40); do
  sleep 1
  now=$("$shoal" -o json job show "$job" | python3 -c 'import json,sys; j=json.load(sys.stdin); u=(j["instances"] or [{}])[0].get("usage") or {}; print(u.get("gpu_utilization_percent", 0), j["status"])')
  util=${now%% *}; status=${now##* }
  echo "   $status, GPU utilization now ${util}%"
  [ "$util" -gt "$peak" ] && peak=$util
  case "$status" in completed|failed|canceled|timed_out) break ;; esac
done
"$shoal" job logs "$job"
echo "== shoal job show $job"
"$shoal" job show "$job"
"$shoal" -o json job show "$job" >"$work/j.json"
check "the job completed" "j['status'] == 'completed'"
check "live utilization peaked above 50% (${peak}%)" "$peak > 50"
check "it held GPU 0" "j['instances'][0]['gpus'] == [0]"
check "its summary: peak utilization above 50%" "j['instances'][0]['usage']['gpu_utilization_peak_percent'] > 50"
check "its summary: average utilization above 20%" "j['instances'][0]['usage']['gpu_utilization_avg_percent'] > 20"
check "its summary: peak GPU memory at least the two 256 MiB matrices" "j['instances'][0]['usage']['gpu_memory_peak_bytes'] >= 512 * 2**20"
check "its summary: GPU energy above 0 J" "j['instances'][0]['usage']['gpu_energy_joules'] > 0"
echo "== shoal /metrics (GPU series)"
curl -s -H "Authorization: Bearer $(cat "$work/data/admin.token")" "http://$SHOAL_ENDPOINT/metrics" >"$work/metrics.txt"
grep '^shoal_gpu_' "$work/metrics.txt"
for series in shoal_gpu_utilization_ratio shoal_gpu_memory_used_bytes shoal_gpu_power_watts shoal_gpu_temperature_celsius; do
  if grep -q "^$series{" "$work/metrics.txt"; then echo "   ok: /metrics has $series"; else echo "   FAILED: /metrics has no $series"; failed=1; fi
done

echo "== packing: two 1-cpu jobs wanting the one GPU take turns; a 1-cpu job with no GPU runs beside"
first=$("$shoal" -o json job submit --cluster gpu --cpus 1 --gpus 1 --code "$work/code" -- python3 load.py 6 | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
second=$("$shoal" -o json job submit --cluster gpu --cpus 1 --gpus 1 --code "$work/code" -- python3 load.py 2 | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
beside=$("$shoal" -o json job submit --cluster gpu --cpus 1 -- sleep 3 | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
for _ in $(seq 30); do
  s1=$("$shoal" -o json job show "$first" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
  [ "$s1" = running ] && break; sleep 0.5
done
s2=$("$shoal" -o json job show "$second" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
s3=$("$shoal" -o json job show "$beside" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
echo "   while $first runs: $second is $s2, $beside is $s3"
"$shoal" job why "$second" | sed 's/^/   why: /'
"$shoal" node show "$node" | grep '^running:' | sed 's/^/   /'
[ "$s1" = running ] && echo "   ok: the first GPU job runs" || { echo "   FAILED: the first GPU job is $s1"; failed=1; }
[ "$s2" = queued ] && echo "   ok: the second waits for the GPU" || { echo "   FAILED: the second GPU job is $s2, not queued"; failed=1; }
case "$s3" in running|completed) echo "   ok: the job with no GPU runs beside it";; *) echo "   FAILED: the job with no GPU is $s3"; failed=1;; esac
for id in "$first" "$second" "$beside"; do
  for _ in $(seq 60); do
    s=$("$shoal" -o json job show "$id" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
    case "$s" in completed|failed|canceled|timed_out) break ;; esac; sleep 0.5
  done
done
"$shoal" -o json job show "$first" >"$work/j.json"; check "the first GPU job completed on GPU 0" "j['status'] == 'completed' and j['instances'][0]['gpus'] == [0]"
first_end=$(python3 -c "import json; print(json.load(open('$work/j.json'))['ended_at'])")
"$shoal" -o json job show "$second" >"$work/j.json"; check "the second completed on GPU 0, after the first ended" "j['status'] == 'completed' and j['instances'][0]['gpus'] == [0] and j['started_at'] >= '$first_end'"
"$shoal" -o json job show "$beside" >"$work/j.json"; check "the job with no GPU completed" "j['status'] == 'completed' and j['instances'][0]['gpus'] == []"
if [ "$failed" = 0 ]; then echo "RESULT: ok (peak live utilization ${peak}%)"; else echo "RESULT: FAILED (see FAILED lines)"; exit 1; fi
