#!/usr/bin/env bash
# Builds Shoal's images with no registry: every image starts FROM scratch or FROM one
# built here. Usage: images/build.sh [NAME...]   (default: all; NAME is a folder here)
#   base   shoal/base:  a shell and coreutils (Debian's static busybox)
#   train  shoal/train: an example training workload that reports progress
#   node   shoal/node:  what docker-provider nodes run `shoal agent` in (needs a built
#          shoal: $SHOAL_BIN, else target/release/shoal or target/debug/shoal)
#   batch-score  shoal/batch-score: a fixed linear model scoring CSV rows (parallel jobs)
#   mpi-train  shoal/mpi-train: data-parallel training over Open MPI (rsmpi); needs
#          apt-get install openmpi-bin libopenmpi-dev libclang-dev, and a built shoal
#          (MPI jobs run the shoal helper inside it). Also builds the program itself
#          into target/release/shoal-mpi-train for MPI jobs run as processes.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
busybox="${BUSYBOX:-/bin/busybox}"

# Copies FILE and the shared libraries it links into the image's rootfs, at the
# same paths as here.
with_libraries() {
  local rootfs="$1" file="$2"
  mkdir -p "$rootfs$(dirname "$file")"
  cp -a "$file" "$rootfs$file"
  [ -f "$file" ] && [ ! -L "$file" ] || return 0
  libraries "$rootfs" "$file"
}

# Copies the shared libraries FILE links into the rootfs.
libraries() {
  local rootfs="$1" file="$2"
  { ldd "$file" 2>/dev/null || true; } | awk '/=> \// { print $3 } /^\t\// { print $1 }' | while read -r lib; do
    [ -e "$rootfs$lib" ] && continue
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
  done
}

shoal_binary() {
  local bin="${SHOAL_BIN:-}"
  for candidate in "$here/../target/release/shoal" "$here/../target/debug/shoal"; do
    [ -n "$bin" ] || { [ -x "$candidate" ] && bin="$candidate"; }
  done
  if [ -z "$bin" ]; then
    echo "images/build.sh: no shoal binary to take libraries from; run cargo build first (or set SHOAL_BIN)" >&2
    exit 1
  fi
  echo "$bin"
}

build() {
  local name="$1" context
  context="$(mktemp -d)"
  trap 'rm -rf "$context"' RETURN
  cp "$here/$name/Dockerfile" "$context/"
  find "$here/$name" -maxdepth 1 -type f ! -name Dockerfile ! -name 'Cargo.*' -exec cp {} "$context/" \;
  case "$name" in
    base)
      if [ ! -x "$busybox" ] || ! "$busybox" --list >/dev/null 2>&1; then
        echo "images/build.sh: $busybox is missing; install it with: apt-get install busybox-static" >&2
        exit 1
      fi
      cp "$busybox" "$context/busybox" ;;
    node)
      docker image inspect shoal/base >/dev/null 2>&1 || build base
      local bin
      bin="$(shoal_binary)"
      # The shared libraries shoal links, at the same paths as here.
      libraries "$context/rootfs" "$bin" ;;
    mpi-train)
      docker image inspect shoal/base >/dev/null 2>&1 || build base
      if ! command -v mpirun >/dev/null || ! command -v mpicc >/dev/null; then
        echo "images/build.sh: Open MPI is missing; install it with: apt-get install openmpi-bin libopenmpi-dev libclang-dev" >&2
        exit 1
      fi
      cargo build --quiet --release --locked --manifest-path "$here/mpi-train/Cargo.toml" \
        --target-dir "$here/../target"
      local rootfs="$context/rootfs" bin
      bin="$(shoal_binary)"
      mkdir -p "$rootfs/usr/local/bin"
      libraries "$rootfs" "$bin" # the helper, mounted in by the agents
      cp "$here/../target/release/shoal-mpi-train" "$rootfs/usr/local/bin/"
      with_libraries "$rootfs" "$here/../target/release/shoal-mpi-train"
      # Open MPI's runtime: its packages' files (no docs) and what they link.
      dpkg -L openmpi-bin openmpi-common libopenmpi3 libpmix2 libhwloc15 \
        | grep -v -E '^/usr/share/(doc|man|lintian)' | while read -r file; do
        if [ -f "$file" ] || [ -L "$file" ]; then with_libraries "$rootfs" "$file"; fi
      done
      ln -sf orterun "$rootfs/usr/bin/mpirun"
      ln -sf orterun "$rootfs/usr/bin/mpiexec" ;;
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

if [ "$#" -eq 0 ]; then set -- base train node mpi-train batch-score; fi
for name in "$@"; do
  if [ ! -f "$here/$name/Dockerfile" ]; then
    echo "images/build.sh: no image \`$name\` (the images are: $(cd "$here" && ls -d */ | tr -d / | tr '\n' ' '))" >&2
    exit 1
  fi
  build "$name"
done
