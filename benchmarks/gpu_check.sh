#!/usr/bin/env bash
# One command for a CUDA machine (torch with CUDA and triton installed, no network needed):
# builds cadk's extension in place, prints the environment, runs the kernel tests of the CUDA and
# Triton backends, the kernel benchmarks on CUDA (float32 and bf16; default and large shapes), a
# training-step benchmark, then profiles.
#
#   benchmarks/gpu_check.sh                 # logs and JSON under ${OUT:-/tmp/cadk_gpu}
#
# Everything runs in about 8 minutes on an H100 (build 1 min, tests 4.5 min, benchmarks 2 min); with
# TESTS=cuda in about 4 minutes on an H200 (build 1 min, tests 25 s, no Triton step).
#
# Every step runs even if an earlier one failed; the exit status is non-zero if any step failed.
# The steps share a time budget (BUDGET_S, default 560 s) so the whole run stays under 10 minutes;
# a step that would exceed it is cut off and counted as failed. Env: PYTHON (python3),
# MAX_JOBS (parallel compile jobs, default: all cores), TORCH_CUDA_ARCH_LIST (default: this GPU's),
# TESTS=cuda runs only the CUDA backend's tests and benchmarks (about 5 minutes less, when GPU time is too
# short for the Triton ones, whose first calls compile every kernel), BASELINE=DIR also builds the cadk sources in DIR
# (an earlier checkout; in parallel with this build and the tests) and times its CUDA backend after
# this one's, so a change is measured before and after on the same GPU.
set -uo pipefail

if [ -n "${BASELINE:-}" ]; then  # resolved before the cd below: relative to the caller's directory
  given="$BASELINE"
  BASELINE="$(cd "$given" 2>/dev/null && pwd)" || { echo "gpu_check: BASELINE=$given is not a directory"; exit 2; }
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/cadk_gpu}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-560}"
START=$(date +%s)
FAILED=()
SUMMARY=()

# step NAME CAP_SECONDS COMMAND...: runs COMMAND with its output in $OUT/NAME.log (tail echoed).
step() {
  local name="$1" cap="$2" left t0 rc
  shift 2
  left=$(( BUDGET_S - ($(date +%s) - START) ))
  (( cap > left )) && cap=$left
  if (( cap <= 0 )); then
    echo "=== $name: skipped, time budget spent"
    FAILED+=("$name"); SUMMARY+=("SKIP  $name (budget spent)")
    return
  fi
  echo "=== $name (limit ${cap}s): $*"
  t0=$(date +%s)
  timeout --signal=INT --kill-after=15 "$cap" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/$name.log"
  if (( rc == 0 )); then
    SUMMARY+=("OK    $name ($(( $(date +%s) - t0 ))s)")
  else
    (( rc == 124 )) && echo "--- $name: cut off after ${cap}s"
    FAILED+=("$name"); SUMMARY+=("FAIL  $name (exit $rc, $(( $(date +%s) - t0 ))s, log $OUT/$name.log)")
  fi
}

export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # compile for this GPU only: a much shorter build
  TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null) &&
    export TORCH_CUDA_ARCH_LIST
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build imports from here too

if [ -n "${BASELINE:-}" ]; then
  ( cd "$BASELINE" && MAX_JOBS=$(( (MAX_JOBS + 1) / 2 )) "$PYTHON" setup.py build_ext --inplace ) \
    >"$OUT/baseline_build.log" 2>&1 &
  BASELINE_BUILD=$!
fi

step env 30 bash -c 'nvidia-smi; "$0" -c "import torch, triton
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__)
print(\"gpu\", torch.cuda.get_device_name())"' "$PYTHON"
# Editable install without network; an in-place build_ext if pip cannot do it.
step build 300 bash -c '"$0" -m pip install --no-deps --no-build-isolation --no-index -e . ||
  { echo "pip install -e . failed; trying setup.py build_ext --inplace"; "$0" setup.py build_ext --inplace; }' "$PYTHON"
step info 60 "$PYTHON" -m cadk info
# The GPU kernel tests, in three processes at once (the CPU ones run in CI): the CUDA backend's and
# the Triton backend's cases of test_kernels.py, and test_triton.py (TESTS=cuda: the first only).
step tests 300 bash -c '
  logs=("$1/tests_cuda.log"); pids=()
  "$0" -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "cuda-cuda" >"$1/tests_cuda.log" 2>&1 & pids+=($!)
  logs+=("$1/tests_train_cuda.log")  # cadk train --device cuda, end to end
  "$0" -m pytest -q -p no:cacheprovider tests/test_cli.py -k cuda >"$1/tests_train_cuda.log" 2>&1 & pids+=($!)
  if [ "$2" != cuda ]; then
    logs+=("$1/tests_triton.log" "$1/tests_triton_ops.log")
    "$0" -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "triton-cuda" >"$1/tests_triton.log" 2>&1 & pids+=($!)
    "$0" -m pytest -q -p no:cacheprovider tests/test_triton.py >"$1/tests_triton_ops.log" 2>&1 & pids+=($!)
  fi
  rc=0; for p in "${pids[@]}"; do wait $p || rc=1; done
  tail -n 3 "${logs[@]}"; exit $rc' "$PYTHON" "$OUT" "${TESTS:-all}"
if [ -n "${BASELINE:-}" ]; then  # before any timing: a compiler on the host would slow host-bound steps
  wait "$BASELINE_BUILD" && SUMMARY+=("OK    baseline_build") ||
    { FAILED+=(baseline_build); SUMMARY+=("FAIL  baseline_build (log $OUT/baseline_build.log)"); }
fi
BENCH=("$PYTHON" benchmarks/bench_kernels.py --device cuda)
SPECS=("fp32:" "bf16:--dtype bfloat16" "large_fp32:--size large" "large_bf16:--size large --dtype bfloat16")
# The CUDA backend alone against the floor: other backends' steps in between disturb the host-bound
# default sizes (their floors took up to 2.5x longer in tables with every backend). CUDA against
# Triton, the measurement the dispatcher's choice rests on, follows the baseline.
for spec in "${SPECS[@]}"; do
  # shellcheck disable=SC2086
  step "bench_${spec%%:*}" 90 "${BENCH[@]}" --backends cuda ${spec#*:} --json "$OUT/bench_kernels_cuda_${spec%%:*}.json"
done
if [ -n "${BASELINE:-}" ]; then
  # Run from BASELINE: Python puts the working directory (-c) or the script's first on sys.path.
  cd "$BASELINE" || exit 1
  step baseline_which 30 env PYTHONPATH="$BASELINE" "$PYTHON" -c "import cadk; print('baseline cadk:', cadk.__file__)"
  for spec in "${SPECS[@]}"; do
    # shellcheck disable=SC2086
    step "baseline_bench_${spec%%:*}" 90 env PYTHONPATH="$BASELINE" "$PYTHON" benchmarks/bench_kernels.py \
      --device cuda --backends cuda ${spec#*:} --json "$OUT/baseline_bench_kernels_cuda_${spec%%:*}.json"
  done
  cd "$ROOT" || exit 1
fi
GPU_BACKENDS=cuda,triton
[ "${TESTS:-all}" = cuda ] && GPU_BACKENDS=cuda
if [ "$GPU_BACKENDS" != cuda ]; then
  for spec in "${SPECS[@]}"; do
    # shellcheck disable=SC2086
    # triton:torch / triton:fused: both ways the Triton linear layer multiplies, for its LINEAR_MATMUL rule.
    step "backends_${spec%%:*}" 120 "${BENCH[@]}" --backends cuda,triton,triton:torch,triton:fused ${spec#*:} \
      --json "$OUT/bench_kernels_cuda_${spec%%:*}_backends.json"
  done
fi
for spec in "fp32:" "large_bf16:--size large --dtype bfloat16"; do
  # shellcheck disable=SC2086
  step "residual_${spec%%:*}" 90 "${BENCH[@]}" --layers residual --backends "$GPU_BACKENDS" ${spec#*:} \
    --json "$OUT/bench_kernels_cuda_residual_${spec%%:*}.json"
  # shellcheck disable=SC2086
  step "conv_bn_${spec%%:*}" 90 "${BENCH[@]}" --layers conv-bn --backends "$GPU_BACKENDS" ${spec#*:} \
    --json "$OUT/bench_kernels_cuda_conv_bn_${spec%%:*}.json"
done
# A gated ResNet-20 training step (half of every layer's units pruned at random) against plain models.
TRAIN_STEP=(benchmarks/bench_train_step.py --random-keep 0.5 --device cuda --rounds 5 --repeats 10)
step train_step 90 "$PYTHON" "${TRAIN_STEP[@]}"
[ "$GPU_BACKENDS" != cuda ] && step train_step_triton 90 env CADK_BACKEND=triton "$PYTHON" "${TRAIN_STEP[@]}"
if [ -n "${BASELINE:-}" ]; then  # right after this build's: ratios to the plain models in each run compare
  cd "$BASELINE" || exit 1
  step baseline_train_step 90 env PYTHONPATH="$BASELINE" "$PYTHON" "${TRAIN_STEP[@]}"
  cd "$ROOT" || exit 1
fi
step profile 60 "${BENCH[@]}" --keeps 0.5 --repeats 3 --backends "$GPU_BACKENDS" --profile
# Where the time goes at GPU-bound sizes, bf16, half the channels kept.
for layer in linear conv3x3; do
  step "profile_large_bf16_$layer" 60 "${BENCH[@]}" --size large --dtype bfloat16 --layers "$layer" --keeps 0.5 \
    --repeats 3 --backends cuda --profile
done

echo "=== summary ($(( $(date +%s) - START ))s, logs in $OUT)"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
if (( ${#FAILED[@]} > 0 )); then
  echo "failed: ${FAILED[*]}"
  exit 1
fi
