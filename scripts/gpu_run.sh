#!/usr/bin/env bash
# The one command for a CUDA machine with no network (e.g. the lent H100/H200):
#   scripts/gpu_run.sh OUTDIR [all|tests|bench]
# Builds mnet_ext in place with the machine's own torch/Triton (skipped when the extension is already built there
# with CUDA kernels: a second call on the same warm machine), then by phase:
#   tests: the CUDA-marked tests, compute-sanitizer memcheck + racecheck over every CUDA kernel, the V3-L profile;
#   bench: the per-op and end-to-end benchmarks (eval, train forward, forward+backward; SE; V3-L) and their plots;
#   all (default): both, then the rest of the suite (CPU tests) with whatever time is left.
# Writes logs, junit XML, CSVs, plots and summary.md into OUTDIR. Finishes inside GPU_RUN_BUDGET_S (default 540 s):
# every step runs under `timeout` of its own cap or the time left, whichever is less, in order of priority; a step
# with no time left is recorded as <step>_status=no_time_left in status.env instead of running.
# The first H200 run (2026-11-30): build 142 s, the CUDA tests ~330 s (Triton's torch.compile tests are slow),
# sanitizer 46 s, profile ~60 s, the per-op benchmark of eval + train forward ~85 s: one call of 540 s holds the
# tests phase, not both; a 15-minute lease holds `tests` (~500 s) then `bench` on the warm machine (~300 s).
set -uo pipefail
OUT=${1:?usage: scripts/gpu_run.sh OUTDIR [all|tests|bench]}
PHASE=${2:-all}
case $PHASE in all|tests|bench) ;; *) echo "phase must be all, tests or bench, not $PHASE" >&2; exit 2;; esac
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
t0=$(date +%s)
# the summary (a few seconds) runs after the deadline's steps
deadline=$(( t0 + ${GPU_RUN_BUDGET_S:-540} - 15 ))
stamp() { echo "== [$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/progress.log"; }
: > "$OUT/status.env"
# step NAME CAP_S LOG COMMAND...: run COMMAND under timeout min(CAP_S, time left), output to LOG; NAME_status=exit code
# (124: timed out) appended to status.env.
step() {
  local name=$1 cap=$2 log=$3 left
  shift 3
  left=$(( deadline - $(date +%s) ))
  if [ "$left" -lt 10 ]; then
    echo "${name}_status=no_time_left" >> "$OUT/status.env"
    return
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  timeout "$cap" "$@" > "$log" 2>&1
  echo "${name}_status=$?" >> "$OUT/status.env"
}

stamp "build (arch of this GPU only, to save time)"
arch=$($PY -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null || echo "9.0")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# The sources' hash: a build left by an earlier call on this machine is reused only if it was built from them.
src_hash=$(find csrc setup.py -type f | LC_ALL=C sort | xargs cat | sha1sum | cut -d' ' -f1)
build_stamp=build/gpu_run_build.stamp
if [ "$(cat "$build_stamp" 2>/dev/null)" = "$src_hash" ] &&
   $PY -c "import sys; from mnet_ext import _C; sys.exit(0 if _C.WITH_CUDA else 1)" > /dev/null 2>&1; then
  echo "build_status=already_built" >> "$OUT/status.env"
else
  step build 300 "$OUT/build.log" env MNET_EXT_REQUIRE_EXT=1 \
    $PY -m pip install --no-build-isolation --no-deps --no-index -e .
  grep -q "^build_status=0$" "$OUT/status.env" && mkdir -p build && echo "$src_hash" > "$build_stamp"
fi
$PY -m mnet_ext.info > "$OUT/info.txt" 2>&1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
# the device copy of the tree may have no .git: MNET_COMMIT names the commit then
git rev-parse HEAD > "$OUT/commit.txt" 2>/dev/null || echo "${MNET_COMMIT:-unknown}" > "$OUT/commit.txt"
git status --porcelain > "$OUT/git-status.txt" 2>/dev/null

if [ "$PHASE" != bench ]; then
  stamp "CUDA-marked tests in three groups, each its own pytest call and junit file (a timeout loses one group)"
  # Groups by value: every real MobileNet layer (tests/test_gpu.py, batch 256, both backends, train and eval), the
  # CUDA backend's primitives against the reference (tests/test_cuda_backend.py), then every other CUDA-marked test
  # (tests/test_gpu.py: odd shapes, SE, torch.compile, CUDA graphs, whole models, convergence). Exhaustive ones are
  # deselected. The last group prints each test's name (-v): a timeout still shows which failed.
  step pytest_cuda_layers 150 "$OUT/pytest_cuda_layers.log" \
    $PY -m pytest -m "cuda and not exhaustive" -q -rs --durations=15 --junitxml="$OUT/junit_cuda_layers.xml" \
    tests/test_gpu.py -k test_every_mobilenet_layer
  step pytest_cuda_backend 90 "$OUT/pytest_cuda_backend.log" \
    $PY -m pytest -m "cuda and not exhaustive" -q -rs --durations=15 --junitxml="$OUT/junit_cuda_backend.xml" \
    tests/test_cuda_backend.py
  step pytest_cuda_rest 240 "$OUT/pytest_cuda_rest.log" \
    $PY -m pytest -m "cuda and not exhaustive" -v -rs --durations=15 --junitxml="$OUT/junit_cuda_rest.xml" \
    --ignore=tests/test_cuda_backend.py -k "not test_every_mobilenet_layer"

  stamp "compute-sanitizer memcheck and racecheck over every CUDA kernel"
  for tool in memcheck racecheck; do
    step "sanitizer_${tool}" 120 "$OUT/sanitizer_$tool.log" \
      compute-sanitizer --tool "$tool" --error-exitcode 1 $PY scripts/sanitize_kernels.py
  done

  stamp "profile: MobileNetV3-Large eval and train, bf16, channels_last, batch 256"
  for mode in eval train; do
    step "profile_${mode}" 150 "$OUT/profile_v3_large_$mode.txt" \
      $PY -m mnet_ext.profile --model mobilenet_v3_large --batch 256 --mode "$mode" \
      --plot "$OUT/profile_v3_large_$mode.png"
  done
fi

if [ "$PHASE" != tests ]; then
  stamp "benchmarks: per-op (MobileNetV3-Large layers) and end-to-end, bf16, channels_last, batch 256 -> bench/"
  # About 5 minutes in all. CSV rows are flushed as measured, so a timeout keeps what was done. torch.compile costs
  # seconds per layer: per op it runs in eval only, per model in inference only (skipped rows say so); train first.
  BENCH="$OUT/bench"
  mkdir -p "$BENCH"
  step bench_dwconv 150 "$BENCH/dwconv_bn_act.log" \
    $PY -m bench.bench_dwconv_bn_act --models mobilenet_v3_large --batch 256 --dtype bf16 \
    --layout channels_last --modes eval,train_fwd,fwd_bwd --compile-modes eval --warmup-ms 5 --rep-ms 25 --out "$BENCH" --no-progress
  step bench_se 35 "$BENCH/squeeze_excite.log" \
    $PY -m bench.bench_squeeze_excite --models mobilenet_v3_large --batch 256 --dtype bf16 \
    --layout channels_last --modes eval,fwd_bwd --compile-modes eval --warmup-ms 5 --rep-ms 25 --out "$BENCH" \
    --no-progress
  step bench_models 70 "$BENCH/models.log" \
    $PY -m bench.bench_models --models mobilenet_v3_large --batch 256 --tasks train,infer \
    --compile-tasks infer --autocast bf16 --min-time 0.5 --out "$BENCH" --no-progress
  step bench_plot 20 "$BENCH/plot.log" $PY -m bench.plot "$BENCH"
fi

if [ "$PHASE" = all ]; then
  stamp "rest of the test suite (CPU tests; whatever time is left: CI runs them in full)"
  step pytest_rest 180 "$OUT/pytest_rest.log" \
    $PY -m pytest -m "not cuda and not exhaustive" -q -rs -x --junitxml="$OUT/junit_rest.xml"
fi

stamp "summary"
$PY scripts/gpu_summary.py "$OUT" > "$OUT/summary.md" 2>&1
cat "$OUT/summary.md"
stamp "done"
