# Sourced by the bench scripts: a coordinator of their own from the release build.
# Sets shoal (the binary), work (a scratch folder, removed on exit), ep (its
# endpoint); the CLI signs in with the admin token `shoal up` saves in $work/config.
# Returns once the coordinator answers.
shoal="$PWD/target/release/shoal"
work=$(mktemp -d); port=$((20000 + RANDOM % 20000)); ep="127.0.0.1:$port"
export SHOAL_CONFIG_DIR="$work/config"
"$shoal" up --data-dir "$work/data" --listen "$ep" >"$work/up.log" 2>&1 &
up=$!
trap 'kill $up 2>/dev/null; wait $up 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 50); do "$shoal" cluster list --endpoint "$ep" >/dev/null 2>&1 && break; sleep 0.2; done
