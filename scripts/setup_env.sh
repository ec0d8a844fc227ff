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
echo "== building and installing mnet_ext (editable): one line per compiled file, minutes for the CUDA kernels"
# pip shows a build's output only with -v: keep setup.py's own lines and ninja's progress ("[3/13 files, 41.2 s]
# csrc/.../fwd.cu"), drop the compiler command lines. The full log stays in .venv/mnet_ext_build.log.
MNET_EXT_REQUIRE_EXT=${MNET_EXT_REQUIRE_EXT:-1} .venv/bin/pip install -v --no-build-isolation -e . 2>&1 \
  | tee .venv/mnet_ext_build.log \
  | sed -un -e 's/^ *\(\[[0-9]*\/[0-9]* files, [0-9.]* s\]\) .* -c \([^ ]*\) .*/  \1 \2/p' \
      -e '/^ *mnet_ext setup:/p' -e '/^ *error\|^ *ERROR\|Error compiling/p' \
  || { echo "== building mnet_ext failed: the full log is .venv/mnet_ext_build.log" >&2; exit 1; }
