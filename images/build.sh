#!/usr/bin/env bash
# Builds Shoal's images with no registry: every image starts FROM scratch or FROM one
# built here. Usage: images/build.sh [NAME...]   (default: all; NAME is a folder here)
#   base   shoal/base:  a shell and coreutils (Debian's static busybox)
#   train  shoal/train: an example training workload that reports progress
#   node   shoal/node:  what docker-provider nodes run `shoal agent` in (needs a built
#          shoal: $SHOAL_BIN, else target/release/shoal or target/debug/shoal)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
busybox="${BUSYBOX:-/bin/busybox}"

build() {
  local name="$1" context
  context="$(mktemp -d)"
  trap 'rm -rf "$context"' RETURN
  cp -r "$here/$name/." "$context/"
  case "$name" in
    base)
      if [ ! -x "$busybox" ] || ! "$busybox" --list >/dev/null 2>&1; then
        echo "images/build.sh: $busybox is missing; install it with: apt-get install busybox-static" >&2
        exit 1
      fi
      cp "$busybox" "$context/busybox" ;;
    node)
      docker image inspect shoal/base >/dev/null 2>&1 || build base
      local bin="${SHOAL_BIN:-}"
      for candidate in "$here/../target/release/shoal" "$here/../target/debug/shoal"; do
        [ -n "$bin" ] || { [ -x "$candidate" ] && bin="$candidate"; }
      done
      if [ -z "$bin" ]; then
        echo "images/build.sh: no shoal binary to take libraries from; run cargo build first (or set SHOAL_BIN)" >&2
        exit 1
      fi
      # The shared libraries shoal links, at the same paths as here.
      ldd "$bin" | awk '/=> \// { print $3 } /^\t\// { print $1 }' | while read -r lib; do
        mkdir -p "$context/rootfs$(dirname "$lib")"
        cp -L "$lib" "$context/rootfs$lib"
      done ;;
    *)
      docker image inspect shoal/base >/dev/null 2>&1 || build base ;;
  esac
  echo "building shoal/$name"
  local log
  log="$(mktemp)"
  if ! DOCKER_BUILDKIT=0 docker build --tag "shoal/$name" "$context" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "images/build.sh: building shoal/$name failed" >&2
    exit 1
  fi
  rm -f "$log"
}

if [ "$#" -eq 0 ]; then set -- base train node; fi
for name in "$@"; do
  if [ ! -f "$here/$name/Dockerfile" ]; then
    echo "images/build.sh: no image \`$name\` (the images are: $(cd "$here" && ls -d */ | tr -d / | tr '\n' ' '))" >&2
    exit 1
  fi
  build "$name"
done
