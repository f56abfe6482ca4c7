#!/usr/bin/env bash
# Studio pages' server time with 10,000 jobs stored: a coordinator with one
# cluster (max 2 nodes) runs 10,000 `true` jobs sent one by one over HTTP (one
# keep-alive connection, from Python's httpx: scripts/test-python.sh's venv); then
# each page is fetched 30 times by curl on loopback (signed in), and the median,
# 95th percentile and maximum of curl's total time are printed per page.
# Usage: bench/studio.sh   (after cargo build --release; the SDK venv made)
set -euo pipefail
cd "$(dirname "$0")/.."
python="$PWD/target/sdk-venv/bin/python"
jobs=${JOBS:-10000}
source bench/lib.sh   # $shoal, $work, $ep: a coordinator of our own
"$shoal" cluster create --endpoint "$ep" --name bench --vm-size Standard_D2_v2 --min-nodes 2 --max-nodes 2 --wait >/dev/null
token=$(cat "$work/data/admin.token")
"$python" - "$ep" "$token" "$jobs" <<'PY'
import sys, time, httpx
ep, token, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with httpx.Client(base_url=f"http://{ep}", headers={"authorization": f"Bearer {token}"}, timeout=60) as c:
    started = time.monotonic()
    for i in range(n):
        r = c.post("/api/v1/jobs", content=f'{{"command": "true", "compute": "bench", "experiment_name": "e{i % 10}"}}')
        r.raise_for_status()
    print(f"submitted {n} jobs in {time.monotonic() - started:.1f} s", file=sys.stderr)
    while True:
        page = c.get("/api/v1/jobs", params={"limit": 1}).json()
        if page and page[0]["status"] in ("completed", "failed"):
            break
        time.sleep(0.5)
    print(f"all ended after {time.monotonic() - started:.1f} s", file=sys.stderr)
PY
# Sign in as a browser does: the form's CSRF pair first (a cookie and the page's field).
form=$(curl -s -D "$work/login.h" "http://$ep/studio/login")
login_cookie=$(sed -n 's/^set-cookie: \(shoal_login=[^;]*\);.*/\1/ip' "$work/login.h")
csrf=$(printf '%s' "$form" | sed -n 's/.*name="csrf" value="\([0-9a-f]*\)".*/\1/p')
cookie=$(curl -s -o /dev/null -D - -b "$login_cookie" -d "token=$token&csrf=$csrf" "http://$ep/studio/login" | sed -n 's/^set-cookie: \(shoal_studio=[^;]*\);.*/\1/ip')
[ -n "$cookie" ] || { echo "cannot sign in to the studio" >&2; exit 1; }
node=$("$shoal" node list --endpoint "$ep" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
middle="job-$((jobs / 2))"
printf '%-42s %8s %8s %8s\n' page median p95 max
for page in /studio/clusters /studio/clusters/bench "/studio/nodes/$node" /studio/jobs "/studio/jobs?after=$middle" \
  "/studio/jobs?state=completed&experiment=e3" "/studio/jobs/$middle" "/studio/jobs/job-$jobs"; do
  for _ in $(seq 30); do
    code_time=$(curl -s -o /dev/null -w '%{http_code} %{time_total}' -b "$cookie" "http://$ep$page")
    [ "${code_time%% *}" = 200 ] || { echo "$page answered ${code_time%% *}" >&2; exit 1; }
    echo "${code_time#* }"
  done | sort -n | awk -v page="$page" '{t[NR]=$1*1000} END {printf "%-42s %6.1fms %6.1fms %6.1fms\n", page, t[int((NR+1)/2)], t[int(NR*0.95)], t[NR]}'
done
