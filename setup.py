"""Build moe_ep: pure Python everywhere, plus the CUDA extension `moe_ep._C` where it can be built.

The extension is built when torch (a CUDA build) and nvcc are both present. Otherwise the package
installs as pure Python and `moe_ep.comm.Buffer` uses its reference backend.

Environment:
  TORCH_CUDA_ARCH_LIST            architectures to build (default "9.0")
  DISABLE_SM90_FEATURES=1         build an sm_80 path without Hopper-only instructions
  DISABLE_AGGRESSIVE_PTX_INSTRS=1 no non-portable load/store forms
  MOE_EP_SKIP_CUDA=1              never build the extension
  MOE_EP_SKIP_NVSHMEM=1           build moe_ep._C only, not the optional moe_ep._nvshmem (a faster
                                  build where only one host's GPUs, reached by CUDA IPC, are used)
  NVSHMEM_DIR                     NVSHMEM install (else the nvidia-nvshmem-cu13 wheel, if found)
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup


def _cuda_build_possible() -> tuple[bool, str]:
    if os.environ.get("MOE_EP_SKIP_CUDA") == "1":
        return False, "MOE_EP_SKIP_CUDA=1"
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception as exc:  # isolated build env or no torch yet
        return False, f"torch not importable at build time ({exc.__class__.__name__})"
    if torch.version.cuda is None:
        return False, "torch is a CPU build"
    if CUDA_HOME is None or shutil.which("nvcc") is None and not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return False, "nvcc not found"
    return True, ""


def _extension_kwargs():
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    include_dirs = [os.path.abspath("csrc")]
    cccl = os.path.join(CUDA_HOME, "include", "cccl")
    if os.path.isdir(cccl):
        include_dirs.append(cccl)  # CUDA 13 keeps CCCL (cuda/std, cub) here
    # The C++ standard of files that include torch is torch's own choice (BuildExtension adds
    # it): forcing an older one made TORCH_CHECK message formatting crash with torch 2.11.
    # Kernels (.cu) include no torch headers, so they pin C++17 for every nvcc.
    cxx_flags = ["-O3"]
    nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-lineinfo"]
    if os.environ.get("DISABLE_SM90_FEATURES") == "1":
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("TORCH_CUDA_ARCH_LIST_SM80", "8.0")
        cxx_flags.append("-DMOE_EP_DISABLE_SM90_FEATURES")
        nvcc_flags.append("-DMOE_EP_DISABLE_SM90_FEATURES")
    if os.environ.get("DISABLE_AGGRESSIVE_PTX_INSTRS") == "1":
        cxx_flags.append("-DMOE_EP_DISABLE_AGGRESSIVE_PTX_INSTRS")
        nvcc_flags.append("-DMOE_EP_DISABLE_AGGRESSIVE_PTX_INSTRS")
    ext = CUDAExtension(
        name="moe_ep._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        # The driver API is reached through cudaGetDriverEntryPoint, so libcuda is not linked:
        # the extension links and imports on machines without a driver (CI).
        libraries=[],
    )
    modules = [ext]
    nvshmem = _nvshmem_extension(include_dirs, cxx_flags, nvcc_flags)
    if nvshmem is not None:
        modules.append(nvshmem)
    return {"ext_modules": modules, "cmdclass": {"build_ext": _build_ext_class(BuildExtension)}}


def _build_ext_class(base):
    """torch's BuildExtension, except that an optional module (moe_ep._nvshmem) that fails to build
    only warns (moe_ep/_build_paths.py keep_going_build_ext)."""
    return _load_build_paths().keep_going_build_ext(base)


def _load_build_paths():
    """moe_ep/_build_paths.py by path: the package itself may not be importable yet."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "moe_ep", "_build_paths.py")
    spec = importlib.util.spec_from_file_location("moe_ep_build_paths", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nvshmem_extension(include_dirs: list[str], cxx_flags: list[str], nvcc_flags: list[str]):
    """moe_ep._nvshmem: NVSHMEM's runtime for the low-latency buffers, and the low-latency kernels
    built again with NVSHMEM's device library (relocatable device code, device-linked with
    libnvshmem_device.a) so they can reach peers by puts. Built only where NVSHMEM is found, as a
    separate optional module (a failure to build it warns and leaves moe_ep._C alone; moe_ep._C
    never links NVSHMEM, so it imports where NVSHMEM is absent)."""
    from torch.utils.cpp_extension import CUDAExtension

    if os.environ.get("MOE_EP_SKIP_NVSHMEM") == "1":
        print("moe_ep: MOE_EP_SKIP_NVSHMEM=1: building without moe_ep._nvshmem", file=sys.stderr)
        return None
    home = _load_build_paths().nvshmem_home()
    if home is None or not os.path.isdir(os.path.join(home, "include")):
        print("moe_ep: NVSHMEM not found (set NVSHMEM_DIR or install nvidia-nvshmem-cu13): "
              "building without moe_ep._nvshmem", file=sys.stderr)
        return None
    lib = os.path.join(home, "lib")
    host_libs = sorted(glob.glob(os.path.join(lib, "libnvshmem_host.so*")))
    if not host_libs:
        print(f"moe_ep: no libnvshmem_host.so in {lib}: building without moe_ep._nvshmem", file=sys.stderr)
        return None
    if not os.path.exists(os.path.join(lib, "libnvshmem_device.a")):
        print(f"moe_ep: no libnvshmem_device.a in {lib}: building without moe_ep._nvshmem", file=sys.stderr)
        return None
    # The kernels of moe_ep._C's low-latency family, with the put path compiled in; the bindings
    # and the error helper they need come along (each module is self-contained).
    sources = ["csrc/nvshmem/runtime.cpp", "csrc/ll_bindings.cpp", "csrc/low_latency.cu", "csrc/runtime.cu"]
    return CUDAExtension(
        name="moe_ep._nvshmem",
        sources=sources,
        include_dirs=[os.path.join(home, "include"), *include_dirs],
        # NVSHMEM's device headers use half / bfloat16 operators that torch's default flags switch off.
        extra_compile_args={"cxx": cxx_flags, "nvcc": [*nvcc_flags, "-rdc=true", "-DMOE_EP_NVSHMEM_DEVICE",
                                                       "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                                                       "-U__CUDA_NO_HALF2_OPERATORS__",
                                                       "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"],
                            # The device link step, by hand: CUDAExtension(dlink=True) adds -dlto, and
                            # nvlink then fails to load libnvshmem_device.a ("library load error").
                            "nvcc_dlink": ["-dlink", f"-L{lib}", "-lnvshmem_device"]},
        library_dirs=[lib],
        extra_link_args=[f"-L{lib}", f"-l:{os.path.basename(host_libs[0])}", "-l:libnvshmem_device.a",
                         f"-Wl,-rpath,{lib}"],
        optional=True,
    )


ok, why_not = _cuda_build_possible()
kwargs = {}
if ok:
    kwargs = _extension_kwargs()
else:
    print(f"moe_ep: building pure Python (no CUDA extension): {why_not}", file=sys.stderr)

setup(**kwargs)
