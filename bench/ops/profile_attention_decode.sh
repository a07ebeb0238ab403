#!/usr/bin/env bash
# Build, then profile batch-1 decode attention on the GPU machine in one go (writes <= 7 files to $OUT):
#   timings.log        ceilings, launch variants, split counts, kernel timeline (profile_attention_decode.py timings)
#   ncu_sections.txt   both kernels, B=1, ctx 1k and 8k, three shapes: SOL, launch, occupancy, warp state, scheduler, memory
#   ncu_combine.txt    the two combine kernels at 8k with warm L2 (--cache-control none), as in a decode step
# The kernels profiled are the shipped launch (variant 0); pass VARIANT=11 for the session-2 launch.
#   ncu_full_26B.txt   --set full, 26B full layer, B=1, 8k
#   ncu_read.txt       the Triton read-only kernel at 33.6 MB
# Usage (device, repo root): bash bench/ops/profile_attention_decode.sh [skip-build]
set -uo pipefail
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/run.log"
P="python3 bench/ops/profile_attention_decode.py"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  if [ "${1:-}" != "skip-build" ]; then
    start=$(date +%s)
    GEMMA4X_CUDA_ARCHS=90a GEMMA4X_NVCC_THREADS=4 CMAKE_BUILD_PARALLEL_LEVEL=16 \
      python3 -m pip install --no-build-isolation --no-deps -q . > /tmp/build.log 2>&1 || { tail -50 /tmp/build.log; exit 1; }
    echo "build: $(( $(date +%s) - start )) s"
  fi
  NCU="ncu --clock-control none"
  SECS="--section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis"
  t=$(date +%s)
  timeout 70 $NCU $SECS -k regex:decode_ --log-file "$OUT/ncu_sections.txt" $P ncu-driver --ctx 1024 8192 --variants ${VARIANT:-0}
  echo "ncu sections: rc $? $(( $(date +%s) - t )) s"; t=$(date +%s)
  timeout 100 $P timings > "$OUT/timings.log" 2>&1
  echo "timings: rc $? $(( $(date +%s) - t )) s"; t=$(date +%s)
  timeout 35 $NCU $SECS --cache-control none -k regex:combine --log-file "$OUT/ncu_combine.txt" $P ncu-driver --variants 16 2
  echo "ncu combine: rc $? $(( $(date +%s) - t )) s"; t=$(date +%s)
  timeout 20 $NCU --section SpeedOfLight --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
    -k regex:_read_kernel --log-file "$OUT/ncu_read.txt" $P ncu-read --mb 33.6
  echo "ncu read: rc $? $(( $(date +%s) - t )) s"; t=$(date +%s)
  timeout 45 $NCU --set full -k regex:decode_ --log-file "$OUT/ncu_full_26B.txt" $P ncu-driver --shapes "26B full" --variants ${VARIANT:-0}
  echo "ncu full: rc $? $(( $(date +%s) - t )) s"
} 2>&1 | tee "$LOG"
