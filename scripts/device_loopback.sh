#!/usr/bin/env bash
# One bounded call on ONE GPU: build (scripts/build_if_stale.sh: kept if current), the in-process
# engine tests, optionally the low-latency GPU tests, then `python -m moe_ep.bench loopback` (ranks
# as threads on the one GPU: the kernels' speed with the link taken out).
#   STAGES=build,trap_tests,host_profile,intranode_tests,sanitizer,tests,bench,ll_one_rank,ll_tests,nvshmem_puts,ll_sanitizer
#   (in this order; default build,tests,bench)
#   trap_tests: the child-process tests of kernels that trap on a bad expert id (layout, worst-token dispatch, low latency).
#   host_profile: scripts/profile_host_dispatch.py (one rank; PROFILE_ARGS adds options, e.g. --recv-pool BYTES).
#   nvshmem_puts: the put path's tests (one rank; then 2 ranks sharing the GPU, an experiment) and bench ll stores vs puts (PUTS_BENCH=0: no bench).
#   ll_one_rank: `bench ll --trace` with the one GPU as one rank (all 132 SMs, every expert local): a
#   2-GPU rank's kernel work at the same tokens/rank, without the link (LL_ONE_ENVS: one run per ';'-separated env).
#   INTRANODE_K: a pytest -k filter for the intranode tests; BENCH_ARGS: the benchmark's options; BENCH_ENVS: one run per ';'-separated environment setting.
set -uo pipefail
STAGES=${STAGES:-build,tests,bench}
source "$(dirname "$0")/device_env.sh"
{
  if has build; then
    stage build
    # moe_ep._nvshmem (a second compile of the low-latency kernels) only for the nvshmem_puts stage.
    skip=1; has nvshmem_puts && skip=0
    MOE_EP_SKIP_NVSHMEM=$skip bash scripts/build_if_stale.sh
    grep -E "error|FAILED|build took" "$OUT/build.log" 2>/dev/null | head -20
  fi
  if has trap_tests; then
    stage "bad expert ids trap with a message (child processes)"
    MOE_EP_TIMEOUT_S=20 timeout -k 10 ${TRAP_S:-240} python3 -m pytest -q -m gpu tests/test_cuda_layout.py \
      tests/test_cuda_intranode.py tests/test_cuda_low_latency.py -k "traps_with_a_message" 2>&1 | tail -12
  fi
  if has host_profile; then
    stage "host time of dispatch and combine (one rank)"
    PYTHONPATH=$PWD timeout -k 10 ${PROFILE_S:-180} python3 scripts/profile_host_dispatch.py --calls 100 \
      ${PROFILE_ARGS:-} 2>&1 | grep -v "^moe_ep: using" | head -${PROFILE_LINES:-200}
  fi
  if has intranode_tests; then
    stage "intranode GPU tests (ranks sharing the GPU)"
    MOE_EP_TIMEOUT_S=20 timeout -k 10 ${INTRANODE_S:-240} python3 -m pytest -q -m "gpu and not slow" \
      tests/test_cuda_intranode.py tests/test_gpu_buffer_streams.py ${INTRANODE_K:+-k "$INTRANODE_K"} 2>&1 | tail -12
  fi
  if has sanitizer; then
    stage "intranode compute-sanitizer runs (memcheck, racecheck; ranks sharing the GPU)"
    MOE_EP_TIMEOUT_S=60 timeout -k 10 ${SANITIZER_S:-200} python3 -m pytest -q -m "gpu and slow" \
      tests/test_cuda_intranode.py -k sanitizer 2>&1 | tail -12
  fi
  if has tests; then
    stage "in-process engine tests"
    MOE_EP_TIMEOUT_S=20 timeout -k 10 ${TESTS_S:-120} python3 -m pytest -q -m gpu tests/test_gpu_loopback.py 2>&1 | tail -12
  fi
  if has bench; then
    # BENCH_ENVS: ';'-separated environment settings, one benchmark run each (e.g. knobs to sweep
    # around: "MOE_EP_INTRANODE_COMBINE_STAGED_VECTORS=0;MOE_EP_INTRANODE_SEND_WARPS=8"); JSON per run.
    IFS=';' read -ra envs <<< "${BENCH_ENVS:-}"
    [ ${#envs[@]} -eq 0 ] && envs=("")
    for i in "${!envs[@]}"; do
      stage "bench loopback ${envs[$i]:-(environment as is)}"
      mkdir -p "$OUT/bench$i"
      env ${envs[$i]} MOE_EP_TIMEOUT_S=30 timeout -k 10 ${BENCH_S:-240} python3 -m moe_ep.bench loopback \
        --out "$OUT/bench$i" ${BENCH_ARGS:-} 2>&1
    done
  fi
  if has ll_one_rank; then
    # LL_ONE_ENVS: ';'-separated environment settings, one run each (e.g. "MOE_EP_LL_COMBINE_PARTIALS=bfloat16").
    IFS=';' read -ra envs <<< "${LL_ONE_ENVS:-}"
    [ ${#envs[@]} -eq 0 ] && envs=("")
    for i in "${!envs[@]}"; do
      stage "bench ll, one rank on the one GPU ${envs[$i]:-(environment as is)}"
      env ${envs[$i]} timeout -k 10 ${LL_ONE_S:-120} python3 -m moe_ep.bench ll --trace --sweep ${LL_ONE_SWEEP:-1,32,128} \
        --iters 30 --out "$OUT/ll_one_rank$i" 2>&1 | grep -v "^moe_ep: using"
    done
  fi
  if has ll_tests; then
    stage "low-latency GPU tests (ranks sharing the GPU)"
    MOE_EP_TIMEOUT_S=20 timeout -k 10 ${LL_S:-300} python3 -m pytest -q -m "gpu and not slow" \
      tests/test_cuda_low_latency.py 2>&1 | tail -12
  fi
  if has nvshmem_puts; then
    stage "NVSHMEM put path: moe_ep._nvshmem built?"
    python3 -c "import torch; from moe_ep import _nvshmem as n; print('ll_puts_compiled =', n.ll_puts_compiled)" 2>&1 | tail -3
    grep -E "optional module|nvshmem" "$OUT/build.log" | head -5
    stage "NVSHMEM tests (one rank on the GPU: every low-latency case by puts)"
    MOE_EP_TIMEOUT_S=30 timeout -k 10 ${PUTS_S:-300} python3 -m pytest -q -m gpu tests/test_nvshmem.py -x \
      -k "not two_ranks" 2>&1 | tee "$OUT/puts_tests.log" | tail -15
    stage "NVSHMEM put path, 2 ranks sharing the GPU (NVSHMEM multiple PEs per GPU: an experiment)"
    MOE_EP_TEST_NVSHMEM_SHARED_GPU=1 MOE_EP_TIMEOUT_S=30 timeout -k 10 ${PUTS_SHARED_S:-150} python3 -m pytest -q \
      -m gpu tests/test_nvshmem.py -k "two_ranks or nvshmem_memory" 2>&1 | tee "$OUT/puts_shared.log" | tail -15
  fi
  if has nvshmem_puts && [ "${PUTS_BENCH:-1}" = 1 ]; then
    stage "bench ll, one rank: stores vs NVSHMEM puts (to itself)"
    timeout -k 10 ${PUTS_BENCH_S:-100} python3 -m moe_ep.bench ll --sweep 1,128 --iters 30 --out "$OUT/ll_stores" 2>&1 \
      | grep -v "^moe_ep: using" | tail -12
    MOE_EP_LL_TRANSPORT=nvshmem MOE_EP_NVSHMEM_PUTS=all timeout -k 10 ${PUTS_BENCH_S:-100} python3 -m moe_ep.bench ll \
      --sweep 1,128 --iters 30 --out "$OUT/ll_puts" 2>&1 | grep -v "^moe_ep: using" | tail -12
  fi
  if has ll_sanitizer; then
    stage "low-latency compute-sanitizer runs (memcheck, racecheck; ranks sharing the GPU)"
    MOE_EP_TIMEOUT_S=60 timeout -k 10 ${LL_SANITIZER_S:-200} python3 -m pytest -q -m "gpu and slow" \
      tests/test_cuda_low_latency.py -k sanitizer 2>&1 | tail -12
  fi
  stage done
} 2>&1 | tee -a "$OUT/loopback.log"
