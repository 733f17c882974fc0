#!/usr/bin/env bash
# The GPU check on a borrowed GPU machine, from the repository root (prepared by `make device-check`):
# installs the carried wheels into .device/site (no network, no dependency resolution), puts the
# project on PYTHONPATH and runs benchmarks/device_check.py within CHECK_TIMEOUT seconds, writing
# $OUT/device_check.json after every section. MODE=cpu runs it tiny on any machine.
set -euo pipefail
PY=${PYTHON:-python3}
SITE=.device/site
if compgen -G ".device/wheels/*.whl" >/dev/null; then
  "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --target "$SITE" .device/wheels/*.whl
fi
export PYTHONPATH="$PWD:$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/nvidia-smi.csv" 2>&1 || true
exec timeout "${CHECK_TIMEOUT:-290}" "$PY" -m benchmarks.device_check --mode "${MODE:-cuda}" \
  --output "$OUT/device_check.json" --images .device/jpegs.tar "$@"
