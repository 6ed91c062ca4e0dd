# Sourced by the device scripts (scripts/device_*.sh, gpu_check.sh): the repository root as working
# directory, $OUT (the device tool's folder, else ./moe_ep_out), the environment every GPU run here
# keeps (no NVLink multicast), and the stage helpers over $STAGES (comma-separated).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$PWD/moe_ep_out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
has() { [[ ",${STAGES:-}," == *",$1,"* ]]; }
stage() { echo; echo "=== $1 ($(date +%T)) ==="; }
