#!/usr/bin/env bash
# GPU benchmark for one lease (issue 7): ceilings, protect(), training img/s and FLOP fraction for
# the paper preset, then LFW fold-0 accuracy (gpu-small: unprotected / MinusFace centralized /
# MinusFace federated).  Fits 8 minutes on one H100 or H200 (--budget, seconds).
#   bash bench/gpu.sh [--budget 420] [--data DIR] [--skip PHASES] [--lfw-epochs N]
# Two calls for one 15-minute lease: see the docstring of bench/gpu.py.
# LFW: $MINUSFED_DATA, else .lfw/lfw.zip (a stored zip of the LFW folder, unpacked to /tmp),
# else ../shared/data/lfw_112_centercrop.  Results: $OUT (device tool) or runs/gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-runs/gpu}
mkdir -p "$OUT_DIR"
DATA=${MINUSFED_DATA:-}
if [[ -z "$DATA" && -f .lfw/lfw.zip ]]; then
  "$PY" -m zipfile -e .lfw/lfw.zip /tmp/lfw && DATA=/tmp/lfw/lfw_112_centercrop
fi
if [[ -z "$DATA" && -d ../shared/data/lfw_112_centercrop ]]; then DATA=../shared/data/lfw_112_centercrop; fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv || true
export PYTHONUNBUFFERED=1
"$PY" -m bench.gpu --out "$OUT_DIR" --work /tmp/minusfed-gpu ${DATA:+--data "$DATA"} "$@" 2>&1 \
  | tee "$OUT_DIR/gpu.log"
