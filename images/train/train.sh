#!/bin/sh
# Usage: train.sh [EPOCHS]   (env EPOCHS, SHOAL_NODE_RANK, SHOAL_OUTPUT_DIR)
epochs="${1:-${EPOCHS:-20}}"
rank="${SHOAL_NODE_RANK:-0}"
out="${SHOAL_OUTPUT_DIR:-./outputs}"
mkdir -p "$out"
echo "training on shard $rank for $epochs epochs"
awk -v epochs="$epochs" -v seed="$((rank + 1))" -v out="$out/model.txt" 'BEGIN {
  srand(seed); n = 256
  for (i = 0; i < n; i++) { x[i] = rand() * 4 - 2; y[i] = 3 * x[i] + 2 + (rand() - 0.5) * 0.1 }
  w = 0; b = 0; lr = 0.1
  for (e = 1; e <= epochs; e++) {
    gw = 0; gb = 0; loss = 0
    for (i = 0; i < n; i++) { d = w * x[i] + b - y[i]; gw += d * x[i]; gb += d; loss += d * d }
    w -= lr * 2 * gw / n; b -= lr * 2 * gb / n
    printf "epoch %d/%d loss=%.6f progress=%d%%\n", e, epochs, loss / n, 100 * e / epochs
    fflush()
    system("sleep 0.05")
  }
  printf "w=%.4f b=%.4f loss=%.6f\n", w, b, loss / n > out
}'
echo "saved $out/model.txt"
