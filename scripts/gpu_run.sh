#!/usr/bin/env bash
# The one command for a CUDA machine with no network (e.g. the lent H100/H200):
#   scripts/gpu_run.sh OUTDIR
# Builds mnet_ext in place with the machine's own torch/Triton, runs the CUDA-marked tests then the rest of the
# suite, compute-sanitizer memcheck + racecheck over every CUDA kernel, and the profile/benchmarks; writes logs,
# junit XML, CSVs, plots and summary.md into OUTDIR. Designed to finish inside 10 minutes.
set -uo pipefail
OUT=${1:?usage: scripts/gpu_run.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
t0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/progress.log"; }

stamp "build (arch of this GPU only, to save time)"
arch=$($PY -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null || echo "9.0")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
MNET_EXT_REQUIRE_EXT=1 timeout 420 $PY -m pip install --no-build-isolation --no-deps --no-index -e . \
  > "$OUT/build.log" 2>&1
echo "build_status=$?" > "$OUT/status.env"
$PY -m mnet_ext.info > "$OUT/info.txt" 2>&1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
git rev-parse HEAD > "$OUT/commit.txt" 2>/dev/null
git status --porcelain > "$OUT/git-status.txt" 2>/dev/null

stamp "CUDA-marked tests"
timeout 240 $PY -m pytest -m "cuda and not exhaustive" -q -rs --junitxml="$OUT/junit_cuda.xml" > "$OUT/pytest_cuda.log" 2>&1
echo "pytest_cuda_status=$?" >> "$OUT/status.env"

stamp "compute-sanitizer memcheck and racecheck over every CUDA kernel"
for tool in memcheck racecheck; do
  timeout 120 compute-sanitizer --tool "$tool" --error-exitcode 1 $PY scripts/sanitize_kernels.py \
    > "$OUT/sanitizer_$tool.log" 2>&1
  echo "sanitizer_${tool}_status=$?" >> "$OUT/status.env"
done

stamp "profile: MobileNetV3-Large eval and train, bf16, channels_last, batch 256"
for mode in eval train; do
  timeout 150 $PY -m mnet_ext.profile --model mobilenet_v3_large --batch 256 --mode "$mode" \
    --plot "$OUT/profile_v3_large_$mode.png" > "$OUT/profile_v3_large_$mode.txt" 2>&1
  echo "profile_${mode}_status=$?" >> "$OUT/status.env"
done

stamp "benchmarks: per-op (MobileNetV3-Large layers) and end-to-end, bf16, channels_last, batch 256 -> bench/"
# About 3 minutes in all. CSV rows are flushed as measured, so a timeout keeps what was done. torch.compile costs
# seconds per layer: per op it runs in eval only, per model in inference only (skipped rows say so); train first.
BENCH="$OUT/bench"
mkdir -p "$BENCH"
timeout 80 $PY -m bench.bench_dwconv_bn_act --models mobilenet_v3_large --batch 256 --dtype bf16 \
  --layout channels_last --compile-modes eval --warmup-ms 5 --rep-ms 25 --out "$BENCH" --no-progress \
  > "$BENCH/dwconv_bn_act.log" 2>&1
echo "bench_dwconv_status=$?" >> "$OUT/status.env"
timeout 35 $PY -m bench.bench_squeeze_excite --models mobilenet_v3_large --batch 256 --dtype bf16 \
  --layout channels_last --modes eval,fwd_bwd --compile-modes eval --warmup-ms 5 --rep-ms 25 --out "$BENCH" \
  --no-progress > "$BENCH/squeeze_excite.log" 2>&1
echo "bench_se_status=$?" >> "$OUT/status.env"
timeout 70 $PY -m bench.bench_models --models mobilenet_v3_large --batch 256 --tasks train,infer \
  --compile-tasks infer --autocast bf16 --min-time 0.5 --out "$BENCH" --no-progress > "$BENCH/models.log" 2>&1
echo "bench_models_status=$?" >> "$OUT/status.env"
timeout 20 $PY -m bench.plot "$BENCH" > "$BENCH/plot.log" 2>&1
echo "bench_plot_status=$?" >> "$OUT/status.env"

stamp "rest of the test suite (CPU tests; time-boxed: CI runs them in full)"
timeout 180 $PY -m pytest -m "not cuda and not exhaustive" -q -rs -x --junitxml="$OUT/junit_rest.xml" > "$OUT/pytest_rest.log" 2>&1
echo "pytest_rest_status=$?" >> "$OUT/status.env"

stamp "summary"
$PY scripts/gpu_summary.py "$OUT" > "$OUT/summary.md" 2>&1
cat "$OUT/summary.md"
stamp "done"
