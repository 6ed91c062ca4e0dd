#!/usr/bin/env bash
# One call on a GPU machine verifies a whole change: build the extension in place, run the GPU
# tests, run the whole suite with the reference backend over NCCL (GPU tensors), run the demo and
# the benchmarks that exist. Every stage is bounded; a device call allows 10 minutes, so on the
# 2-GPU kind split it: STAGES=build,gpu_tests,nccl_tests then STAGES=demo,bench (the build stays). Logs and JSON go to $OUT (the device tool's folder) or ./moe_ep_out.
# At most 8 files come back from $OUT: keep to build.log, tests.log, bench.log and a few JSON/PNG.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/moe_ep_out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
STAGES=${STAGES:-build,gpu_tests,nccl_tests,demo,bench}
status=0
# Every stage is bounded, so a wedged stage costs its limit, not the whole device call.
bounded() { local limit=$1; shift; timeout -k 15 "$limit" "$@"; local rc=$?; [ $rc -eq 124 ] && echo "TIMED OUT after ${limit}s: $*"; return $rc; }
has() { [[ ",$STAGES," == *",$1,"* ]]; }
step() { echo; echo "=== $* ==="; }

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())'
} > "$OUT/build.log" 2>&1

if has build; then
  step "build" >> "$OUT/build.log"
  start=$(date +%s)
  if ! python3 setup.py build_ext --inplace >> "$OUT/build.log" 2>&1; then
    echo "BUILD FAILED (see build.log)"; status=1
  fi
  echo "build took $(( $(date +%s) - start )) s" >> "$OUT/build.log"
  tail -3 "$OUT/build.log"
  # What the build can do on this machine (GPUs, peer access, families, settings), for the record.
  python3 -m moe_ep info >> "$OUT/build.log" 2>&1
fi

: >> "$OUT/tests.log"
# A wedged device wait traps after 30 s here instead of 100 s (bounded_wait.cuh), so one hang
# cannot eat the stage.
if has gpu_tests; then
  step "pytest -m 'gpu and not slow'" | tee -a "$OUT/tests.log"
  MOE_EP_TIMEOUT_S=30 bounded "${GPU_TESTS_S:-420}" python3 -m pytest -q -m "gpu and not slow" tests 2>&1 \
    | tee -a "$OUT/tests.log" | tail -5 || status=1
fi
if has gpu_slow; then  # opt-in (STAGES=...,gpu_slow): compute-sanitizer runs and other long tests
  step "pytest -m 'gpu and slow'" | tee -a "$OUT/tests.log"
  MOE_EP_TIMEOUT_S=60 bounded "${GPU_SLOW_S:-500}" python3 -m pytest -q -m "gpu and slow" tests 2>&1 \
    | tee -a "$OUT/tests.log" | tail -5 || status=1
fi
if has nccl_tests && [ "$NGPU" -lt 2 ]; then
  echo "whole suite over NCCL: skipped, needs 2 GPUs ($NGPU visible)" | tee -a "$OUT/tests.log"
fi
if has nccl_tests && [ "$NGPU" -ge 2 ]; then
  # The gpu-marked tests pick their own pools (gloo ranks sharing a GPU, or NCCL) and ran above.
  step "whole suite but the gpu-marked tests, reference backend over NCCL" | tee -a "$OUT/tests.log"
  MOE_EP_TEST_BACKEND=nccl bounded "${NCCL_TESTS_S:-360}" python3 -m pytest -q -m "not gpu" tests 2>&1 | tee -a "$OUT/tests.log" | tail -5 || status=1
fi

# Before promoting an experimental kernel family: the same suite with it switched on
# (STAGES=...,nccl_experimental; e.g. MOE_EP_EXPERIMENTAL_KERNELS=low_latency, the default here).
if has nccl_experimental && [ "$NGPU" -ge 2 ]; then
  step "whole suite but the gpu-marked tests, NCCL, MOE_EP_EXPERIMENTAL_KERNELS=${EXPERIMENTAL:-low_latency}" | tee -a "$OUT/tests.log"
  MOE_EP_EXPERIMENTAL_KERNELS=${EXPERIMENTAL:-low_latency} MOE_EP_TEST_BACKEND=nccl bounded "${NCCL_TESTS_S:-360}" \
    python3 -m pytest -q -m "not gpu" tests 2>&1 | tee -a "$OUT/tests.log" | tail -5 || status=1
fi

: >> "$OUT/bench.log"
if has demo && [ "$NGPU" -ge 1 ]; then
  # With one GPU the group has one rank: the whole Buffer path still runs on the device over NCCL.
  step "main job over $NGPU GPU(s)" | tee -a "$OUT/bench.log"
  bounded "${DEMO_S:-180}" python3 -m moe_ep run --config configs/demo.yaml --nproc "$NGPU" --json "$OUT/run.json" 2>&1 \
    | grep -v Warning | tee -a "$OUT/bench.log" || status=1
  step "comm demo over $NGPU GPU(s)" | tee -a "$OUT/bench.log"
  bounded "${DEMO_S:-180}" python3 -m moe_ep demo --nproc "$NGPU" --tokens 4096 --hidden 7168 --top-k 8 --experts-per-rank $((256 / NGPU)) \
    --ll-tokens 128 --json "$OUT/demo.json" 2>&1 | grep -v Warning | tee -a "$OUT/bench.log" || status=1
fi
if has bench; then
  for target in ${BENCH_TARGETS:-$(python3 -m moe_ep.bench --list 2>/dev/null)}; do
    step "bench $target" | tee -a "$OUT/bench.log"
    bounded "${BENCH_S:-420}" python3 -m moe_ep.bench "$target" --out "$OUT" 2>&1 | tee -a "$OUT/bench.log" || status=1
  done
fi
exit $status
