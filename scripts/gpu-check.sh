#!/usr/bin/env bash
# Checks NVML telemetry and GPU job placement on a real NVIDIA GPU.
# Usage: scripts/gpu-check.sh [path/to/shoal]     (default: target/release/shoal)
# Needs: an NVIDIA driver (nvidia-smi), python3 with PyTorch (CUDA) for the load.
# Prints what shoal's NVML reports next to nvidia-smi, runs a ~20 s matrix-product
# job through the process runtime, shows its live utilization and its summary.
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
echo "== date: $(date -u +%FT%TZ)   host: $(hostname)"
echo "== nvidia-smi"
nvidia-smi --query-gpu=index,name,uuid,utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw --format=csv
gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
size=Standard_NC6; [ "$gpus" -ge 8 ] && size=Standard_ND96isr_H100_v5
"$shoal" cluster create --name gpu --vm-size "$size" --min-nodes 1 --max-nodes 1 --wait >/dev/null || exit 1
node=$("$shoal" node list -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
sleep 2
echo "== shoal node show $node (NVML through the agent)"
"$shoal" node show "$node"
cat >"$work/load.py" <<'PY'
import os, time, torch
assert torch.cuda.is_available(), "PyTorch sees no CUDA device"
print("CUDA_VISIBLE_DEVICES =", os.environ.get("CUDA_VISIBLE_DEVICES"), "device:", torch.cuda.get_device_name(0), flush=True)
a = torch.randn(8192, 8192, device="cuda"); b = torch.randn(8192, 8192, device="cuda")
end = time.time() + 20; n = 0
while time.time() < end:
    c = a @ b; n += 1
    if n % 50 == 0: torch.cuda.synchronize()
torch.cuda.synchronize(); print(f"{n} matmuls of 8192x8192 in 20 s", flush=True)
PY
job=$("$shoal" -o json job submit --cluster gpu --gpus-per-instance 1 --code "$work" -- python3 load.py | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo "== job $job submitted (1 GPU)"
peak=0
for _ in $(seq 30); do
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
echo "== shoal /metrics (GPU series)"
curl -s -H "Authorization: Bearer $(cat "$work/data/admin.token")" "http://$SHOAL_ENDPOINT/metrics" | grep '^shoal_gpu_' || true
if [ "$peak" -gt 50 ]; then echo "RESULT: ok (peak live utilization ${peak}%)"; else echo "RESULT: FAILED (peak live utilization ${peak}%, expected > 50%)"; exit 1; fi
