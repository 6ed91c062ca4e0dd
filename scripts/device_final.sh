#!/usr/bin/env bash
# The 2-GPU closing call: every stage bounded, the most needed first (the NCCL suite and the layer
# benchmark close issues 2 and 3; then kernel tests; then the comm benchmarks). Logs in $OUT.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
log="$OUT/final.log"
bash scripts/build_if_stale.sh
{
  stage "whole suite but the gpu-marked tests, reference backend over NCCL"
  MOE_EP_TEST_BACKEND=nccl timeout -k 10 ${NCCL_S:-130} python3 -m pytest -q -m "not gpu" tests 2>&1 | tail -6
  stage "bench layer on 2 GPUs"
  timeout -k 10 ${LAYER_S:-130} python3 -m moe_ep.bench layer --gpu-counts 2 --iters 5 --out "$OUT" 2>&1 | grep -v "^moe_ep: using\|Warning"
  stage "LL + NVSHMEM GPU tests"
  MOE_EP_TIMEOUT_S=30 timeout -k 10 ${LL_TESTS_S:-80} python3 -m pytest -q -m "gpu and not slow" \
    tests/test_cuda_low_latency.py tests/test_nvshmem.py 2>&1 | tail -6
  stage "intranode GPU tests"
  MOE_EP_TIMEOUT_S=30 timeout -k 10 ${INTRANODE_S:-110} python3 -m pytest -q -m "gpu and not slow" \
    tests/test_cuda_intranode.py 2>&1 | tail -6
  stage "bench normal"
  timeout -k 10 ${NORMAL_S:-60} python3 -m moe_ep.bench normal --sms 12,24 --unroll 4 --out "$OUT" 2>&1 | grep -v "^moe_ep: using"
  stage "comm demo"
  timeout -k 10 60 python3 -m moe_ep demo --nproc 2 --tokens 4096 --hidden 7168 --top-k 8 --experts-per-rank 128 \
    --ll-tokens 128 --json "$OUT/demo.json" 2>&1 | grep -v "Warning\|^moe_ep: using"
  stage "bench ll"
  timeout -k 10 ${LL_S:-70} python3 -m moe_ep.bench ll --sweep 1,32,128 --iters 30 --out "$OUT" 2>&1 | grep -v "^moe_ep: using"
  stage "done"
} 2>&1 | tee "$log"
