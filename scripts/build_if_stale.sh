#!/usr/bin/env bash
# Build the extension in place (scripts/gpu_check.sh's build stage) unless moe_ep/_C*.so was built
# from this very csrc/ and setup.py with the same MOE_EP_SKIP_NVSHMEM: a warm device machine keeps
# the last call's .so, which after a csrc/ change is stale. moe_ep/.build_stamp holds the hash.
set -uo pipefail
cd "$(dirname "$0")/.."
stamp=moe_ep/.build_stamp
want="$(find csrc setup.py -type f | LC_ALL=C sort | xargs cat | sha1sum | cut -d' ' -f1) skip_nvshmem=${MOE_EP_SKIP_NVSHMEM:-0}"
if ls moe_ep/_C*.so >/dev/null 2>&1 && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "build: moe_ep/_C*.so is current (built from this csrc/), kept"
  exit 0
fi
rm -f "$stamp"
STAGES=build bash scripts/gpu_check.sh && ls moe_ep/_C*.so >/dev/null 2>&1 && echo "$want" > "$stamp"
