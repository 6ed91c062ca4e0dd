"""Every CUDA source in csrc/ compiles with plain nvcc (no torch, no GPU, no driver needed).

Kernels are kept torch-free so that this runs in CI, which has nvcc but no GPU: a compile error
in any ``csrc/*.cu`` fails here with the compiler's output. Skipped only when nvcc is not found.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(REPO_ROOT, "csrc")
COMPILE_TIMEOUT_S = 300

# (name, extra flags): the default Hopper build and the DISABLE_SM90_FEATURES build of setup.py.
CONFIGS = [
    ("sm90", ["-arch=sm_90"]),
    ("sm80_no_sm90_features", ["-arch=sm_80", "-DMOE_EP_DISABLE_SM90_FEATURES"]),
]


def _cuda_home_candidates(nvcc: str) -> list[str]:
    found = [os.environ.get(var) for var in ("CUDA_HOME", "CUDA_PATH")]
    found.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    found.append("/usr/local/cuda")
    return [path for path in found if path]


def _find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    fallback = "/usr/local/cuda/bin/nvcc"
    return fallback if os.access(fallback, os.X_OK) else None


def _include_flags(nvcc: str) -> list[str]:
    flags = ["-I", CSRC]
    for home in _cuda_home_candidates(nvcc):
        cccl = os.path.join(home, "include", "cccl")
        if os.path.isdir(cccl):  # CUDA 13 keeps CCCL (cuda/std, cub) here, as setup.py adds
            flags += ["-I", cccl]
            break
    return flags


def _compile(nvcc: str, source: str, out_dir: str, flags: list[str]) -> tuple[str, int, str]:
    obj = os.path.join(out_dir, os.path.basename(source) + ".o")
    cmd = [nvcc, "-std=c++17", "-O3", "--expt-relaxed-constexpr", *flags, *_include_flags(nvcc),
           "-c", source, "-o", obj]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return source, -1, f"timed out after {COMPILE_TIMEOUT_S} s: {' '.join(cmd)}"
    return source, proc.returncode, f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"


def test_csrc_has_cuda_sources():
    assert glob.glob(os.path.join(CSRC, "*.cu")), f"no .cu files in {CSRC}"


@pytest.mark.parametrize("name,flags", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_every_cu_file_compiles_with_nvcc(tmp_path, name, flags):
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (not on PATH, not in $CUDA_HOME/bin or /usr/local/cuda/bin): "
                    "cannot compile csrc/*.cu")
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cu")))
    workers = max(1, min(len(sources), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda src: _compile(nvcc, src, str(tmp_path), flags), sources))
    failures = [(src, rc, log) for src, rc, log in results if rc != 0]
    report = "\n\n".join(f"--- {os.path.relpath(src, REPO_ROOT)} ({name}): exit {rc}\n{log}" for src, rc, log in failures)
    assert not failures, f"{len(failures)} of {len(sources)} csrc/*.cu files failed to compile:\n{report}"


# Kernels that must compile without register spills for sm_90 (local-memory traffic in their copy
# loops): the intranode transfer at the default unroll, the BF16 combine with staged loads (16 and 24
# vectors per lane), and every low-latency kernel. A spill here once came from unrolled narrow-copy
# paths that only odd row sizes take (csrc/device_copy.cuh).
SPILL_FREE = {"intranode.cu": ("transfer_kernel<8>", "combine_kernel<__nv_bfloat16, 8, 8, 4>",
                               "combine_kernel<__nv_bfloat16, 8, 8, 6>"),
              "low_latency.cu": ("dispatch_send_kernel", "dispatch_recv_kernel", "dispatch_kernel<", "combine_send_kernel",
                                 "combine_recv_kernel", "combine_kernel(")}


def _spills(nvcc: str, source: str, out_dir: str) -> dict[str, tuple[int, int]]:
    """{demangled kernel name: (spill store bytes, spill load bytes)} from ptxas -v."""
    _, rc, log = _compile(nvcc, source, out_dir, ["-arch=sm_90", "-Xptxas", "-v"])
    assert rc == 0, log
    found, current = {}, None
    for line in log.splitlines():
        entry = re.search(r"Compiling entry function '(\S+)'", line)
        if entry:
            current = entry.group(1)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spill and current:
            found[current] = (int(spill.group(1)), int(spill.group(2)))
            current = None
    names = subprocess.run(["c++filt"], input="\n".join(found), capture_output=True, text=True).stdout.split("\n")
    return {name: value for name, value in zip(names, found.values())}


@pytest.mark.parametrize("source", sorted(SPILL_FREE))
def test_hot_kernels_do_not_spill_registers(tmp_path, source):
    nvcc = _find_nvcc()
    if nvcc is None or shutil.which("c++filt") is None:
        pytest.skip(f"needs nvcc and c++filt (kernel names): nvcc={nvcc}, c++filt={shutil.which('c++filt')}")
    spills = _spills(nvcc, os.path.join(CSRC, source), str(tmp_path))
    for kernel in SPILL_FREE[source]:
        matches = {name: value for name, value in spills.items() if kernel in name}
        assert matches, f"{kernel} not found among the kernels ptxas compiled from {source}: {sorted(spills)}"
        for name, (stores, loads) in matches.items():
            assert (stores, loads) == (0, 0), f"{name} spills {stores} bytes (stores) / {loads} (loads) for sm_90"


def test_nvshmem_runtime_links_against_the_host_library_alone(tmp_path):
    """moe_ep._nvshmem links only libnvshmem_host.so: every NVSHMEM symbol it uses must be exported
    there (nvshmemx_init_attr is not: it calls nvshmemi_init_thread of the static device library,
    which made the module fail to import on the GPU machine)."""
    from moe_ep._build_paths import nvshmem_home

    nvcc, home = _find_nvcc(), nvshmem_home()
    if nvcc is None or home is None or shutil.which("nm") is None:
        pytest.skip(f"needs nvcc, nm and NVSHMEM (NVSHMEM_DIR or nvidia-nvshmem-cu13): nvcc={nvcc}, nvshmem={home}")
    host_libs = sorted(glob.glob(os.path.join(home, "lib", "libnvshmem_host.so*")))
    if not host_libs:
        pytest.skip(f"no libnvshmem_host.so in {home}/lib")
    try:
        import pybind11  # noqa: F401
        pybind_include = pybind11.get_include()
    except ImportError:
        import torch.utils.cpp_extension as ext

        pybind_include = next((p for p in ext.include_paths() if os.path.isfile(os.path.join(p, "pybind11", "pybind11.h"))), None)
    import sysconfig

    if pybind_include is None:
        pytest.skip("pybind11 headers not found")
    source = os.path.join(CSRC, "nvshmem", "runtime.cpp")
    obj = os.path.join(str(tmp_path), "runtime.o")
    cmd = [nvcc, "-std=c++17", "-x", "cu", "-c", source, "-o", obj, "-I", os.path.join(home, "include"),
           "-I", pybind_include, "-I", sysconfig.get_paths()["include"], *_include_flags(nvcc)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    assert proc.returncode == 0, f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
    used = subprocess.run(["nm", "-u", obj], capture_output=True, text=True, check=True).stdout.split()
    exported = subprocess.run(["nm", "-D", "--defined-only", host_libs[0]], capture_output=True, text=True,
                              check=True).stdout
    names = {line.split()[-1].split("@")[0] for line in exported.splitlines() if line.strip()}
    missing = [s for s in used if "nvshmem" in s and s not in names]
    assert used and not missing, f"NVSHMEM symbols runtime.cpp needs that {host_libs[0]} does not export: {missing}"
