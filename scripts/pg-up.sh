#!/usr/bin/env bash
# A throwaway PostgreSQL for the PostgreSQL store's tests (and to try it by hand):
# a cluster in DIR (default /tmp/shoal-pg) on 127.0.0.1:55432, trust auth on
# loopback, run as the `postgres` user. Prints `export SHOAL_TEST_POSTGRES=…`;
# idempotent (a running one is kept). Needs Debian's postgresql (.ci/run installs it).
# SHOAL_PG_TLS_DIR=DIR (holding server.pem and server.key): the cluster serves TLS
# with that certificate (tests of `sslmode` and `sslrootcert`).
set -euo pipefail
dir=${1:-/tmp/shoal-pg}
port=${SHOAL_PG_PORT:-55432}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$bin/initdb" ] || { echo "no PostgreSQL server here (apt-get install postgresql)" >&2; exit 1; }
url="postgres://postgres@127.0.0.1:$port/postgres"
as_pg() { if [ "$(id -un)" = postgres ]; then "$@"; else runuser -u postgres -- "$@"; fi; }
mkdir -p "$dir"
# Test binaries and parallel tests call this side by side: one at a time, or two
# would start the same cluster at once and all but one fail.
exec 9>"$dir/.lock"
flock 9
# A cluster left by another machine's postgres user (or a copied /tmp) is taken over.
chown -R postgres "$dir"
init() {
  if [ ! -s "$dir/data/PG_VERSION" ]; then
    as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >/dev/null
  fi
  if [ -n "${SHOAL_PG_TLS_DIR:-}" ]; then
    install -o postgres -m 0600 "$SHOAL_PG_TLS_DIR/server.pem" "$dir/data/server.crt"
    install -o postgres -m 0600 "$SHOAL_PG_TLS_DIR/server.key" "$dir/data/server.key"
  fi
}
start() {
  as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=on $tls" start >/dev/null 9>&-
}
tls=""
if [ -n "${SHOAL_PG_TLS_DIR:-}" ]; then
  tls="-c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key"
fi
init
if ! as_pg "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
  if ! start; then
    # Whatever was left (a stale lock, another machine's files): this cluster
    # is a throwaway, made again once.
    echo "PostgreSQL in $dir did not start; made afresh. The end of $dir/server.log:" >&2
    tail -n 20 "$dir/server.log" >&2
    as_pg "$bin/pg_ctl" -D "$dir/data" stop -m immediate >/dev/null 2>&1 || true
    rm -rf "$dir/data"
    init
    if ! start; then
      echo "PostgreSQL in $dir did not start; the end of $dir/server.log:" >&2
      tail -n 20 "$dir/server.log" >&2
      exit 1
    fi
  fi
fi
echo "export SHOAL_TEST_POSTGRES=$url"
