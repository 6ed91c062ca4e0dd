#!/usr/bin/env bash
# One bounded call on ONE GPU (ranks share it, gloo groups): build, then the intranode GPU tests of
# the push-based dispatch/combine and the low-latency GPU tests. Logs: $OUT/intranode.log.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
{
  stage build
  bash scripts/build_if_stale.sh
  grep -E "error|FAILED|build took" "$OUT/build.log" | head -20
  stage "all intranode GPU tests but slow"
  MOE_EP_TIMEOUT_S=20 timeout -k 10 ${ALL_S:-300} python3 -m pytest -q -m "gpu and not slow" tests/test_cuda_intranode.py \
    tests/test_gpu_buffer_streams.py 2>&1 | tail -25
  stage "low-latency GPU tests (ranks sharing the GPU)"
  MOE_EP_TIMEOUT_S=20 timeout -k 10 ${LL_S:-300} python3 -m pytest -q -m "gpu and not slow" tests/test_cuda_low_latency.py \
    2>&1 | tail -25
  stage done
} 2>&1 | tee "$OUT/intranode.log"
