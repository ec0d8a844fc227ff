#!/usr/bin/env bash
# GPU diagnosis of the depthwise kernels' gap to the copy bandwidth (hypotheses H1-H4: bench/diag_gpu.py's docstring):
#   scripts/gpu_diag.sh OUTDIR
# Meant as the SECOND device call, right after scripts/gpu_run.sh on the same warm machine: the extension is then
# built in place and is not rebuilt (it is built as gpu_run.sh builds it only when `import mnet_ext._C` fails or
# has no CUDA kernels). Steps, in order of value, each under `timeout` of its own cap or the time left:
#   1. sweep   channel sweep of the eval forward (CUDA, Triton, eager, copy; do_bench and CUDA graphs) -> sweep.csv
#   2. ncu     Nsight Compute on single launches, one ncu process per case (~25 s cap each) -> ncu_<case>.csv/.log
#   3. host    per-call CPU enqueue / wall / GPU time (torch.profiler) -> host.csv, host_profile.txt
#   4. summary diag_summary.md (tables; also written when every GPU step was skipped)
# Whole run <= GPU_DIAG_BUDGET_S (default 240 s). Without a GPU (or without ncu) the GPU steps are skipped with a line
# saying why, and diag_summary.md is still written.
#
# The device `run` command (at most 8 files come back, so the folder travels as one tarball, < 10 MB; MNET_COMMIT
# names the commit where the device copy has no .git):
#   export PYTHON=python3 MNET_COMMIT=<sha>; bash scripts/gpu_diag.sh /tmp/d; tar czf $OUT/diag.tgz -C /tmp d; cp /tmp/d/diag_summary.md $OUT/
# with timeout_s 300 (the script's 240 s, the tarball, and slack).
set -uo pipefail
OUT=${1:?usage: scripts/gpu_diag.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
t0=$(date +%s)
deadline=$(( t0 + ${GPU_DIAG_BUDGET_S:-240} - 10 ))  # the summary (about a second) runs after the deadline's steps
stamp() { echo "== [$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/diag.log"; }
skip() { echo "$1_status=skipped" >> "$OUT/status.env"; echo "$1: skipped: $2" | tee -a "$OUT/skipped.txt"; }
left() { echo $(( deadline - $(date +%s) )); }
: > "$OUT/status.env"
: > "$OUT/skipped.txt"
# step NAME CAP_S LOG COMMAND...: COMMAND under timeout min(CAP_S, time left), output to LOG; NAME_status=exit code
# (124: timed out) appended to status.env.
step() {
  local name=$1 cap=$2 log=$3 l
  shift 3
  l=$(left)
  if [ "$l" -lt 10 ]; then
    echo "${name}_status=no_time_left" >> "$OUT/status.env"
    return
  fi
  [ "$cap" -gt "$l" ] && cap=$l
  timeout -k 5 "$cap" "$@" > "$log" 2>&1
  echo "${name}_status=$?" >> "$OUT/status.env"
}

stamp "environment"
gpu=0
why=$(timeout 60 $PY -c "import torch; print('ok' if torch.cuda.is_available() else 'no CUDA device (torch.cuda.is_available() is False)')" 2>&1 | tail -1)
[ "$why" = ok ] && gpu=1
if [ "$gpu" = 1 ]; then
  if ! timeout 60 $PY -c "import sys, mnet_ext._C as c; sys.exit(0 if c.WITH_CUDA else 1)" > /dev/null 2>&1; then
    stamp "build (mnet_ext._C missing or without CUDA kernels; as scripts/gpu_run.sh builds it)"
    arch=$($PY -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null || echo 9.0)
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    step build 200 "$OUT/build.log" env MNET_EXT_REQUIRE_EXT=1 \
      $PY -m pip install --no-build-isolation --no-deps --no-index -e .
  fi
else
  echo "every GPU step is skipped: ${why:-python failed}" | tee -a "$OUT/skipped.txt"
fi
timeout 60 $PY -m mnet_ext.info > "$OUT/info.txt" 2>&1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw --format=csv \
  >> "$OUT/info.txt" 2>&1 || echo "nvidia-smi: not available" >> "$OUT/info.txt"
git rev-parse HEAD >> "$OUT/info.txt" 2>/dev/null || echo "commit: ${MNET_COMMIT:-unknown}" >> "$OUT/info.txt"

stamp "1. channel sweep (eval forward, bf16 channels_last, K3 s1/s2, C 8..672, N*H*W*C fixed)"
if [ "$gpu" = 1 ]; then
  # the sweep stops starting cases 15 s before its cap (a case takes a few seconds): its rows are all complete
  l=$(left); cap=80; [ "$cap" -gt "$l" ] && cap=$l
  step sweep "$cap" "$OUT/sweep.log" $PY -m bench.diag_gpu sweep --out "$OUT" --budget-s $(( cap > 20 ? cap - 15 : 5 ))
else
  skip sweep "no GPU"
fi

stamp "2. ncu on single launches"
if [ "$gpu" != 1 ]; then
  skip ncu "no GPU"
elif ! command -v ncu > /dev/null; then
  skip ncu "ncu is not on PATH"
else
  # ncu gets up to 115 s, leaving the host step 30 s; it starts no ncu call in its last 8 s, each call capped at 25 s
  l=$(( $(left) - 30 )); cap=115; [ "$cap" -gt "$l" ] && cap=$l
  if [ "$cap" -lt 20 ]; then
    echo "ncu_status=no_time_left" >> "$OUT/status.env"
  else
    step ncu "$cap" "$OUT/ncu.log" $PY -m bench.diag_gpu ncu --out "$OUT" --budget-s $(( cap - 5 )) --case-cap-s 25
  fi
fi

stamp "3. host overhead per call (torch.profiler)"
if [ "$gpu" = 1 ]; then
  l=$(left); b=20; [ "$b" -gt $(( l - 10 )) ] && b=$(( l - 10 ))
  step host 30 "$OUT/host.log" $PY -m bench.diag_gpu host --out "$OUT" --budget-s "$b"
else
  skip host "no GPU"
fi

stamp "4. summary"
$PY -m bench.diag_gpu summary "$OUT" > "$OUT/diag_summary.md" 2> "$OUT/summary.log" \
  || echo "summary failed: see summary.log" >> "$OUT/diag_summary.md"
du -sh "$OUT" | tee -a "$OUT/diag.log"
stamp "done"
