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
# loops): the intranode transfer at the default unroll (plain and with the receive pool's direct
# protocol), the BF16 combine with staged loads (16 and 24
# vectors per lane), the one-block notify (1024 threads: at most 64 registers for its routing
# pass), and every low-latency kernel. A spill here once came from unrolled narrow-copy
# paths that only odd row sizes take (csrc/device_copy.cuh).
SPILL_FREE = {"intranode.cu": ("transfer_kernel<8, ", "combine_kernel<__nv_bfloat16, 8, 8, 4>",
                               "combine_kernel<__nv_bfloat16, 8, 8, 6>", "notify_kernel"),
              "low_latency.cu": ("dispatch_send_kernel", "dispatch_recv_kernel", "dispatch_kernel<", "combine_send_kernel",
                                 "combine_recv_kernel", "combine_kernel<false, float>(", "combine_kernel<false, __nv_bfloat16>(")}
# (moe_ep._C's build: stores only. The put build of moe_ep._nvshmem, with relocatable device code,
# is allowed spills: it serves peers behind RDMA, whose latency dwarfs them.)


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


def _nvshmem_tools():
    """(nvcc, NVSHMEM home) or a skip naming what is missing."""
    from moe_ep._build_paths import nvshmem_home

    nvcc, home = _find_nvcc(), nvshmem_home()
    if nvcc is None or home is None or shutil.which("nm") is None:
        pytest.skip(f"needs nvcc, nm and NVSHMEM (NVSHMEM_DIR or nvidia-nvshmem-cu13): nvcc={nvcc}, nvshmem={home}")
    if not os.path.exists(os.path.join(home, "lib", "libnvshmem_device.a")):
        pytest.skip(f"no libnvshmem_device.a in {home}/lib")
    return nvcc, home


def test_nvshmem_runtime_symbols_come_from_the_libraries_it_links(tmp_path):
    """moe_ep._nvshmem links libnvshmem_host.so and libnvshmem_device.a (setup.py): every NVSHMEM
    symbol runtime.cpp needs must be exported by the one or defined in the other (a module that
    misses one fails to import on the GPU machine, as nvshmemx_init_attr once did with the host
    library alone)."""
    nvcc, home = _nvshmem_tools()
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
    static = subprocess.run(["nm", "--defined-only", os.path.join(home, "lib", "libnvshmem_device.a")],
                            capture_output=True, text=True).stdout
    names |= {line.split()[-1] for line in static.splitlines() if len(line.split()) >= 3}
    missing = [s for s in used if "nvshmem" in s and s not in names]
    assert used and not missing, f"NVSHMEM symbols runtime.cpp needs that neither library provides: {missing}"


def test_low_latency_put_path_compiles_and_device_links_with_nvshmem(tmp_path):
    """The low-latency kernels as moe_ep._nvshmem builds them (relocatable device code, the put path
    compiled in) compile and device-link against libnvshmem_device.a, and the put kernels exist."""
    nvcc, home = _nvshmem_tools()
    obj = os.path.join(str(tmp_path), "low_latency.cu.o")  # where _compile puts it
    _, rc, log = _compile(nvcc, os.path.join(CSRC, "low_latency.cu"), str(tmp_path),
                          ["-arch=sm_90", "-rdc=true", "-DMOE_EP_NVSHMEM_DEVICE", "-I", os.path.join(home, "include")])
    assert rc == 0, log
    cmd = [nvcc, "-dlink", "-arch=sm_90", obj, "-L", os.path.join(home, "lib"), "-lnvshmem_device",
           "-o", os.path.join(str(tmp_path), "dlink.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    assert proc.returncode == 0, f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
    symbols = subprocess.run(["nm", "-C", obj], capture_output=True, text=True, check=True).stdout
    for kernel in ("dispatch_kernel<0, true>", "dispatch_send_kernel<1, true>", "combine_kernel<true, float>",
                   "combine_send_kernel<true, float>", "combine_kernel<true, __nv_bfloat16>",
                   "combine_send_kernel<true, __nv_bfloat16>"):
        assert kernel in symbols, f"{kernel} missing from the put build of low_latency.cu"


def test_an_optional_module_that_fails_to_build_only_warns(capsys):
    """setup.py's build_ext: moe_ep._nvshmem failing (a ninja RuntimeError) must not stop moe_ep._C;
    a required module's failure still raises."""
    from types import SimpleNamespace

    from moe_ep._build_paths import keep_going_build_ext

    class FailingBase:
        def build_extension(self, ext):
            raise RuntimeError(f"Error compiling objects for extension {ext.name}")

    command = keep_going_build_ext(FailingBase)()
    command.build_extension(SimpleNamespace(name="moe_ep._nvshmem", optional=True))
    assert "moe_ep._nvshmem failed to build" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="moe_ep._C"):
        command.build_extension(SimpleNamespace(name="moe_ep._C", optional=False))


def test_skip_nvshmem_builds_moe_ep_C_alone(tmp_path):
    """MOE_EP_SKIP_NVSHMEM=1 (scripts/device_next.sh, for stages that never use NVSHMEM) leaves the
    optional moe_ep._nvshmem out of the build and says so; moe_ep._C is still built."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MOE_EP_SKIP_NVSHMEM="1")
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if "building pure Python" in proc.stderr:
        pytest.skip(f"no CUDA extension can be built here: {proc.stderr.strip().splitlines()[-1]}")
    assert "MOE_EP_SKIP_NVSHMEM=1: building without moe_ep._nvshmem" in proc.stderr
