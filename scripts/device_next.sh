#!/usr/bin/env bash
# The checks left open by the 2026-11-29 session, in one bounded 2-GPU call (see the closing note):
# the tests written after its last GPU run (out-of-range ids, copy variants, staged send), the suite over NCCL with the low-latency kernels on
# (the last step before they become default), and both comm benchmarks with the new variants.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/moe_ep_out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
stage() { echo; echo "=== $1 ($(date +%T)) ==="; }
ls moe_ep/_C*.so >/dev/null 2>&1 || STAGES=build bash scripts/gpu_check.sh
{
  stage "tests written after the last GPU run: LL out-of-range ids, intranode copy variants"
  MOE_EP_TIMEOUT_S=30 timeout -k 10 ${NEW_TESTS_S:-150} python3 -m pytest -q -m gpu \
    tests/test_cuda_low_latency.py tests/test_cuda_intranode.py -k "out_of_range or copy_variants or staged" 2>&1 | tail -8
  stage "whole suite but the gpu-marked tests, NCCL, MOE_EP_EXPERIMENTAL_KERNELS=low_latency"
  MOE_EP_EXPERIMENTAL_KERNELS=low_latency MOE_EP_TEST_BACKEND=nccl timeout -k 10 ${NCCL_S:-180} \
    python3 -m pytest -q -m "not gpu" tests 2>&1 | tail -8
  stage "bench normal (unroll 4 and chunk-rows 8 variants at 12 and 24 SMs)"
  timeout -k 10 ${NORMAL_S:-90} python3 -m moe_ep.bench normal --sms 12,24,32 --unroll 4 --chunk-rows 8,16 \
    --out "$OUT" 2>&1 | grep -v "^moe_ep: using"
  stage "bench ll"
  timeout -k 10 ${LL_S:-80} python3 -m moe_ep.bench ll --sweep 1,32,128 --iters 30 --out "$OUT" 2>&1 \
    | grep -v "^moe_ep: using"
  stage "bench ll, staged FP8 send"
  MOE_EP_LL_SEND=staged timeout -k 10 ${LL_S:-80} python3 -m moe_ep.bench ll --sweep 1,32,128 --iters 30 \
    --out "$OUT/staged" 2>&1 | grep -v "^moe_ep: using"
  stage "done"
} 2>&1 | tee "$OUT/next.log"
