#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu with `nvcc -c` against the installed torch's headers: a check that
# the CUDA kernels build, runnable where torch is a CPU build and there is no GPU (objects are
# thrown away; linking and running happen on a CUDA machine through setup.py).
#
#   csrc/cuda/compile_check.sh            # all files, one line per file, exit 1 on any failure
#   JOBS=2 ARCH=sm_80 csrc/cuda/compile_check.sh csrc/cuda/epilogue.cu
#
# Env: NVCC (default nvcc), PYTHON (python3), ARCH (sm_90), CXX_STD (c++17), JOBS (1),
# VERBOSE=1 prints full compiler output of passing files too. Warnings raised in csrc/ count as
# failures; warnings from torch's own headers do not.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
NVCC="${NVCC:-nvcc}"
PYTHON="${PYTHON:-python3}"
ARCH="${ARCH:-sm_90}"
CXX_STD="${CXX_STD:-c++17}"
JOBS="${JOBS:-1}"

command -v "$NVCC" >/dev/null || { echo "compile_check: $NVCC not found (set NVCC=/path/to/nvcc)"; exit 2; }
INCLUDES=$("$PYTHON" -c "from torch.utils.cpp_extension import include_paths
print(' '.join('-I' + p for p in include_paths()))") || { echo "compile_check: torch does not import"; exit 2; }

# Flags torch's CUDAExtension passes, plus C10_CUDA_NO_CMAKE_CONFIGURE_FILE: CPU builds of torch
# ship c10/cuda headers without the generated c10/cuda/impl/cuda_cmake_macros.h (it only
# defines a Windows export macro).
FLAGS=(-std="$CXX_STD" -O3 --expt-relaxed-constexpr -Xcompiler -fPIC
       -gencode "arch=compute_${ARCH#sm_},code=$ARCH"
       -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
       -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

if [ $# -gt 0 ]; then FILES=("$@"); else FILES=(csrc/cuda/*.cu); fi
[ -e "${FILES[0]}" ] || { echo "compile_check: no .cu files"; exit 2; }

compile_one() {  # prints one summary line; writes the full log next to the object
  local src="$1" name log start rc warnings
  name="$(basename "$src" .cu)"
  log="$TMP/$name.log"
  start=$(date +%s)
  # shellcheck disable=SC2086
  "$NVCC" "${FLAGS[@]}" $INCLUDES -c "$src" -o "$TMP/$name.o" >"$log" 2>&1
  rc=$?
  warnings=$(grep -E "(^|/)csrc/.*warning" "$log" | wc -l)
  if [ "$rc" -eq 0 ] && [ "$warnings" -eq 0 ]; then
    echo "OK    $src ($(( $(date +%s) - start ))s)"
    [ "${VERBOSE:-0}" = 1 ] && cat "$log"
    return 0
  fi
  echo "FAIL  $src ($(( $(date +%s) - start ))s, exit $rc, $warnings warnings in csrc/)"
  grep -E "error|csrc/.*warning" -A3 "$log" | head -n 60
  return 1
}
export -f compile_one
export NVCC INCLUDES TMP
export FLAGS_STR="${FLAGS[*]}"

# xargs runs each file in a fresh bash, where arrays are not inherited: rebuild FLAGS there.
printf '%s\n' "${FILES[@]}" |
  xargs -P "$JOBS" -I{} bash -c 'read -ra FLAGS <<<"$FLAGS_STR"; compile_one "$1"' _ {} >"$TMP/summary" 
status=$?
cat "$TMP/summary"
failed=$(grep -c '^FAIL' "$TMP/summary")
echo "compile_check: ${#FILES[@]} files, $failed failed (nvcc $("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), $ARCH, -std=$CXX_STD, torch headers $("$PYTHON" -c 'import torch; print(torch.__version__)'))"
[ "$status" -eq 0 ] && [ "$failed" -eq 0 ]
