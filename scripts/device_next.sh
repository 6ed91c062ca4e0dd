#!/usr/bin/env bash
# The 2-GPU checks, in bounded stages; each call fits the device's 10-minute limit (each starts with
# build, 40-90 s: a machine released between calls keeps nothing). The fourteenth session ran A, B,
# C and D, the fifteenth E (in two calls, NCCL_FILES splitting the suite), C and ab_order
# (benchmarks/RESULTS.md). Nothing is owed; the stages, for a change that needs them again:
#   E  STAGES=build,gpu_layers,nccl_suite      (the layers' GPU tests with the defaults, and the whole suite
#                                               over NCCL; the suite ran in 113 + 61 s)
#   A  STAGES=build,bench_normal,bench_ll      (issue 4's table with the NCCL, P2P and --recv-pool rows;
#                                               issue 5's table, kernel rows and trace included, and the
#                                               float32-partials run the default rule reads; ~150 s)
#   B  STAGES=build,intranode_tests            (every intranode GPU test; ~340 s)
#   C  STAGES=build,ll_tests,ll_sweep          (every low-latency GPU test, the NVSHMEM ones included, and
#                                               issue 5's sweep 1...256 tokens; ~230 s)
#   Q  STAGES=build,quick                      (a short budget, ~5 device minutes: issue 4's table at 12 and 24
#                                               SMs with the NCCL and P2P rows, issue 5's at 128 tokens)
# LL_F32=0 leaves out bench_ll's float32-partials run (~60 s).
# LL_VARIANTS=1 adds to bench_ll the staged FP8 send and the NVSHMEM stores/puts runs (~240 s more).
# (scripts/device_loopback.sh is the one-GPU counterpart: tests with ranks sharing the GPU, the loopback.)
#   intranode_tests    every intranode GPU test (ranks on both GPUs) but the sanitizer runs
#   bench_normal       the push-based intranode kernels over the SM sweep, every knob's variants, --isolate and
#                      the receive pool's direct rows (--recv-pool)
#   ab_order           the fused dispatch's two block orders (MOE_EP_LL_FUSED_ORDER), interleaved in one process
#   ll_new             the low-latency tests written after their last GPU run (out-of-range ids, staged send)
#   bench_ll           the ll benchmark (with the kernels' phase trace), direct and staged FP8 send, and on
#                      NVSHMEM memory with stores and with puts
#   ll_sweep           the ll benchmark over its default sweep, 1...256 tokens per rank (issue 5's plot)
#   profile_ll         per-kernel device time of the low-latency calls (scripts/profile_ll.py)
#   ll_tests           every low-latency GPU test
#   gpu_layers         the layers' GPU tests: decode step in a CUDA graph, prefill (both with the defaults)
#   nccl_suite         the suite but the gpu-marked tests, over NCCL (the low-latency kernels are on by default);
#                      failures are listed in $OUT/nccl_suite.log even when the stage limit cuts the run
set -uo pipefail
STAGES=${STAGES:-build,bench_normal,bench_ll}
source "$(dirname "$0")/device_env.sh"
{
  if has build; then
    stage build
    # moe_ep._nvshmem (a second compile of the low-latency kernels) only where a stage uses it:
    # the NVSHMEM tests of ll_tests, LL_VARIANTS' NVSHMEM runs.
    skip=1; { has ll_tests || [ "${LL_VARIANTS:-0}" = 1 ]; } && skip=0
    MOE_EP_SKIP_NVSHMEM=$skip bash scripts/build_if_stale.sh
    grep -E "build took|error" "$OUT/build.log" 2>/dev/null | head -5
  fi
  if has intranode_tests; then
    stage "intranode GPU tests"
    MOE_EP_TIMEOUT_S=30 timeout -k 10 ${INTRANODE_S:-420} python3 -m pytest -q -m "gpu and not slow" \
      tests/test_cuda_intranode.py tests/test_gpu_buffer_streams.py tests/test_gpu_loopback.py \
      tests/test_gpu_layer_prefill.py tests/test_cuda_layout.py ${INTRANODE_K:+-k "$INTRANODE_K"} 2>&1 | tail -12
  fi
  if has bench_normal; then
    stage "bench normal (push-based intranode kernels)"
    # --recv-pool: the receive pool's direct dispatch and pulled combine rows (2 GiB per rank) beside the plain ones.
    timeout -k 10 ${NORMAL_S:-240} python3 -m moe_ep.bench normal --isolate --recv-pool 2147483648 --out "$OUT" 2>&1 \
      | grep -v "^moe_ep: using"
  fi
  if has quick; then
    stage "quick: bench normal at 12 and 24 SMs, bench ll at 128 tokens"
    timeout -k 10 ${QUICK_NORMAL_S:-100} python3 -m moe_ep.bench normal --sms 12,24 --out "$OUT" 2>&1 \
      | grep -v "^moe_ep: using"
    timeout -k 10 ${QUICK_LL_S:-70} python3 -m moe_ep.bench ll --sweep 128 --iters 30 --out "$OUT" 2>&1 \
      | grep -v "^moe_ep: using"
  fi
  if has ll_new; then
    stage "LL tests written after the last GPU run: out-of-range ids, staged send"
    MOE_EP_TIMEOUT_S=30 timeout -k 10 ${NEW_TESTS_S:-120} python3 -m pytest -q -m gpu tests/test_cuda_low_latency.py \
      -k "out_of_range or staged" 2>&1 | tail -8
  fi
  if has ab_order; then
    stage "A/B: the fused dispatch's block orders, interleaved in one process (scripts/ab_ll_order.py)"
    timeout -k 10 ${AB_S:-120} python3 scripts/ab_ll_order.py --out "$OUT" 2>&1 | grep -v "^moe_ep: using"
  fi
  if has bench_ll; then
    stage "bench ll"
    timeout -k 10 ${LL_S:-120} python3 -m moe_ep.bench ll --sweep 1,32,128 --iters 30 --trace --out "$OUT" 2>&1 \
      | grep -v "^moe_ep: using"
  fi
  if has bench_ll && [ "${LL_F32:-1}" = 1 ]; then
    # The combine's partial sums as float32 (bf16, the default since the fourteenth session, halves
    # the bytes over NVLink: 3.7 MB -> 1.8 MB per rank at 128 tokens); the rule that chose bf16 reads both.
    stage "bench ll, float32 partial sums in the combine"
    MOE_EP_LL_COMBINE_PARTIALS=float32 timeout -k 10 ${LL_S:-120} python3 -m moe_ep.bench ll --sweep 1,32,128 \
      --iters 30 --out "$OUT/f32_partials" 2>&1 | grep -v "^moe_ep: using" | tail -30
  fi
  if has bench_normal && has bench_ll; then
    stage "the pre-registered default rules (README), applied to this run's JSON"
    PYTHONPATH=$PWD python3 scripts/decide_defaults.py --normal "$OUT/normal.json" --ll "$OUT/f32_partials/ll.json" \
      --ll-bf16 "$OUT/ll.json" 2>&1 | tail -40
  fi
  if has bench_ll && [ "${LL_VARIANTS:-0}" = 1 ]; then
    stage "bench ll, staged FP8 send"
    MOE_EP_LL_SEND=staged timeout -k 10 ${LL_S:-80} python3 -m moe_ep.bench ll --sweep 1,32,128 --iters 30 \
      --out "$OUT/staged" 2>&1 | grep -v "^moe_ep: using"
    stage "bench ll, NVSHMEM memory: stores through nvshmem_ptr, then puts to every rank (the RDMA path over NVLink)"
    MOE_EP_LL_TRANSPORT=nvshmem timeout -k 10 ${LL_S:-80} python3 -m moe_ep.bench ll --sweep 1,128 --iters 30 \
      --out "$OUT/nvshmem" 2>&1 | grep -v "^moe_ep: using" | tail -8
    MOE_EP_LL_TRANSPORT=nvshmem MOE_EP_NVSHMEM_PUTS=all timeout -k 10 ${LL_S:-80} python3 -m moe_ep.bench ll \
      --sweep 1,128 --iters 30 --out "$OUT/puts" 2>&1 | grep -v "^moe_ep: using" | tail -8
  fi
  if has ll_sweep; then
    # Issue 5's plot, latency vs tokens per rank 1...256 (the default sweep). num_max_dispatch_tokens_per_rank
    # is the sweep's largest (256) here, so the peer comparison stays with bench_ll's run (M = 128).
    stage "bench ll, tokens per rank 1...256"
    timeout -k 10 ${LL_SWEEP_S:-150} python3 -m moe_ep.bench ll --iters 20 --out "$OUT/sweep" 2>&1 \
      | grep -v "^moe_ep: using" | tail -30
  fi
  if has profile_ll; then
    stage "profile ll"
    timeout -k 10 ${PROFILE_S:-90} python3 scripts/profile_ll.py --tokens 1,128 --out "$OUT" 2>&1 \
      | grep -E "^---|Self CUDA|dispatch|combine|Memset|Memcpy|elementwise|fill" | head -40
  fi
  if has ll_tests; then
    stage "every low-latency GPU test"
    MOE_EP_TIMEOUT_S=30 timeout -k 10 ${LL_TESTS_S:-300} python3 -m pytest -q -m gpu tests/test_cuda_low_latency.py \
      tests/test_nvshmem.py 2>&1 | tail -8
  fi
  if has gpu_layers; then
    stage "the layers' GPU tests (decode graph, prefill), defaults"
    MOE_EP_TIMEOUT_S=30 timeout -k 10 ${LAYERS_S:-150} python3 -m pytest -q -rfE --tb=short -m gpu \
      tests/test_gpu_decode_graph.py tests/test_gpu_layer_prefill.py 2>&1 | tail -15
  fi
  if has nccl_suite; then
    # 240 s reached 47% in the fourteenth session: the CPU-only build checks are left out (no NCCL in them).
    # NCCL_FILES (default: tests) runs a share of the files, so the suite can span two calls.
    stage "whole suite but the gpu-marked tests, NCCL"
    MOE_EP_TEST_BACKEND=nccl MOE_EP_TIMEOUT_S=30 timeout -k 10 ${NCCL_S:-330} python3 -m pytest -q -m "not gpu" \
      -rfE --tb=line --ignore=tests/test_csrc_builds.py ${NCCL_FILES:-tests} 2>&1 | tee -a "$OUT/nccl_suite.log" | tail -12
  fi
  stage "done"
} 2>&1 | tee -a "$OUT/next.log"
