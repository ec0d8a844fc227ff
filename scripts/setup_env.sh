#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv and (re)install mnet_ext into it, editable.
# Idempotent: a second run only rebuilds what changed. Used by `make demo` and `make test` (and so by CI).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
fi
# Pinned torch/torchvision: a CUDA 13.0 build of torch (with Triton) that also runs on CPU-only machines.
REQS=(torch==2.14.1 torchvision==0.29.1 ninja pybind11 pytest pytest-benchmark matplotlib tqdm numpy setuptools wheel ruff timm)
if ! .venv/bin/python -c "import torch, torchvision, ninja, pytest, matplotlib, tqdm, ruff, timm" 2>/dev/null; then
  echo "== installing ${REQS[*]} (about a minute from the local mirror)"
  .venv/bin/pip install -q "${REQS[@]}"
fi
echo "== building and installing mnet_ext (editable)"
MNET_EXT_REQUIRE_EXT=${MNET_EXT_REQUIRE_EXT:-1} .venv/bin/pip install -q --no-build-isolation -e .
