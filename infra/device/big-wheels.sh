#!/usr/bin/env bash
# Wheels too large for one command's 64 MiB (ray 2.60: 79 MB; faiss-gpu: ~135 MB), sent to ONE warm
# borrowed GPU machine in pieces over consecutive commands, then installed, then `make gpu-check`'s
# script run as it is. Only once infra/device/run-check.sh has produced its figures: this spends
# several commands of the loan, and the machine stays warm only ~30 s after each command.
#
#   here:  bash infra/device/big-wheels.sh split WHEEL... [pydantic and pydantic-core wheels too]
#          -> .device/pieces/NN/ (each under 60 MiB, with SHA256SUMS); prints one device call per piece
#   there: bash infra/device/big-wheels.sh receive      (one call per piece, carry [".device/pieces/NN"])
#   there: bash infra/device/big-wheels.sh install-and-check   (the last call; nothing carried)
#
# Pieces gather in $STORE on the machine (outside the repository copy, which each call replaces).
set -euo pipefail
STORE=${STORE:-/var/tmp/zsl-wheels}
PIECE=$((60 * 1024 * 1024))
case "${1:-}" in
  split)
    shift
    rm -rf .device/pieces && mkdir -p .device/pieces/all
    for w in "$@"; do split -b "$PIECE" -d -a 2 "$w" ".device/pieces/all/$(basename "$w").part-"; done
    for w in "$@"; do (cd "$(dirname "$w")" && sha256sum "$(basename "$w")"); done >.device/pieces/all/SHA256SUMS
    n=0
    for p in .device/pieces/all/*.part-*; do
      n=$((n + 1)); d=$(printf ".device/pieces/%02d" "$n"); mkdir -p "$d"
      mv "$p" "$d/" && cp .device/pieces/all/SHA256SUMS "$d/"
      echo "device call $n: command \"bash infra/device/big-wheels.sh receive\", carry [\"$d\"]  ($(du -h "$d" | cut -f1))"
    done
    mv .device/pieces/all/SHA256SUMS .device/pieces/ && rmdir .device/pieces/all
    echo "device call $((n + 1)): command \"bash infra/device/big-wheels.sh install-and-check\", timeout_s 590"
    ;;
  receive)
    mkdir -p "$STORE"
    for d in .device/pieces/*/; do cp -n "$d"/* "$STORE"/; done
    ls -la "$STORE"
    ;;
  install-and-check)
    cd "$STORE"
    for w in $(cut -d' ' -f3 SHA256SUMS); do cat "$w".part-* >"$w"; done
    sha256sum -c SHA256SUMS
    python3 -m pip install --quiet --no-index --no-deps --target "$STORE/site" ./*.whl
    cd - >/dev/null
    OUT=${OUT:-benchmarks/results}
    PYTHONPATH="$PWD:$STORE/site:$PWD/.device/site" HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 \
      timeout 560 python3 -m benchmarks.gpu_check --output "$OUT/gpu.json"
    ;;
  *) sed -n 2,13p "$0"; exit 2 ;;
esac
