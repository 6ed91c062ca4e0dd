#!/usr/bin/env bash
# One device call after a kernel change: build, the low-latency and NVSHMEM GPU tests, the tests that
# failed on the last 2-GPU run, the NCCL-suite files that failed, then the ll benchmark. Bounded.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/moe_ep_out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
STAGES=build bash scripts/gpu_check.sh
{
  echo "=== LL + NVSHMEM GPU tests, and last round's failures ==="
  MOE_EP_TIMEOUT_S=30 timeout -k 10 ${LL_TESTS_S:-200} python3 -m pytest -q -x -m "gpu and not slow" \
    tests/test_cuda_low_latency.py tests/test_nvshmem.py \
    "tests/test_cuda_intranode.py::test_buffer_over_nccl_equals_reference" 2>&1 | tail -15
  echo "=== NCCL suite: the files that failed ==="
  MOE_EP_TEST_BACKEND=nccl timeout -k 10 ${NCCL_S:-120} python3 -m pytest -q -m "not gpu" \
    ${NCCL_FILES:-tests/test_buffer_low_latency.py tests/test_buffer_api.py tests/test_hf.py} 2>&1 | tail -30
} 2>&1 | tee "$OUT/round.log"
[ "${PROFILE:-0}" = 1 ] && timeout -k 10 120 python3 scripts/profile_ll.py --out "$OUT" > "$OUT/profile_ll.log" 2>&1
timeout -k 10 ${BENCH_S:-150} python3 -m moe_ep.bench ll --out "$OUT" 2>&1 | grep -v "^moe_ep: using" | tee "$OUT/bench_ll.log"
