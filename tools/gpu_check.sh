#!/usr/bin/env bash
# Build, test and benchmark on the GPU machine in one go (see ../shared/device/README.md).
# Usage (on the device, from the repo root): tools/gpu_check.sh [pytest args...]
#   BENCH="bench/ops/bench_norm.py ..."  benchmarks to run after the tests (space separated)
#   BENCH_ARGS="..."                      arguments for every benchmark
#   SKIP_TESTS=1                          build and benchmark only
# Logs and JSON land in $OUT (or bench/out).
set -uo pipefail
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .device/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/wheels/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/device.txt"
start=$(date +%s)
GEMMA4X_CUDA_ARCHS=${GEMMA4X_CUDA_ARCHS:-90a} GEMMA4X_NVCC_THREADS=${GEMMA4X_NVCC_THREADS:-4} CMAKE_BUILD_PARALLEL_LEVEL=16 \
  python3 -m pip install --no-build-isolation --no-deps -q . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
# From the repo root `import gemma4x` finds the installed package (the source lives under python/).
if [ -z "${SKIP_TESTS:-}" ]; then
  python3 -m pytest -m cuda -q -p no:cacheprovider "${@:-tests}" 2>&1 | tee "$OUT/pytest_cuda.log" | tail -15
fi
for b in ${BENCH:-}; do
  python3 "$b" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/$(basename "$b" .py).log"
done
