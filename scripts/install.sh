#!/usr/bin/env bash
# Create the virtual environment and install minusfed with its dev extras.
# uv when it is on PATH (about 6x faster), else pip. uv ignores pip's configuration, so the
# local wheel folder that pip knows about is passed to it explicitly. When that folder holds a
# CPU build of torch it is installed first: otherwise a resolver picks the newest torch, a CUDA
# build of several GB that the CPU machines cannot use.
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"
WHEELS="$(pip config list 2>/dev/null | sed -n "s/^global.find-links='\(.*\)'$/\1/p" | head -n1 || true)"
[ -n "$WHEELS" ] && [ -d "$WHEELS" ] || WHEELS=""
CPU_TORCH=""
[ -n "$WHEELS" ] && CPU_TORCH="$(ls "$WHEELS"/torch-*+cpu-*.whl 2>/dev/null | sort -V | tail -n1 || true)"
if command -v uv >/dev/null 2>&1; then
    echo "[install] uv $(uv --version | cut -d' ' -f2) -> $VENV ${WHEELS:+(wheels: $WHEELS)}"
    [ -x "$VENV/bin/python" ] || uv venv --python "$PYTHON" "$VENV"
    uv pip install --python "$VENV/bin/python" ${WHEELS:+--find-links "$WHEELS"} ${CPU_TORCH:+"$CPU_TORCH"} -e ".[dev]"
else
    echo "[install] pip -> $VENV ${CPU_TORCH:+(torch: $CPU_TORCH)}"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
    [ -z "$CPU_TORCH" ] || "$VENV/bin/python" -m pip install -q "$CPU_TORCH" 2>&1 | grep -v "is ignored" || true
    "$VENV/bin/python" -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
fi
"$VENV/bin/python" -c "import torch, flwr, minusface; print('[install] torch', torch.__version__, 'flwr', flwr.__version__)"
