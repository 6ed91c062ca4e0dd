"""``python -m moe_ep info``: what this install can do, before any rank is launched.

Why: which backend a call runs depends on the build (is ``moe_ep._C`` there, with which kernel
families), on the GPUs (peer access), on NVSHMEM, and on environment settings read in several
places. One report, with the reason wherever something is off, saves reading logs of a failed job;
it also names ``MOE_EP_*`` variables that moe_ep does not read (a typo is otherwise silent).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Any, Optional

from . import __version__, env


def _import(module: str) -> tuple[Optional[Any], str]:
    """(module or None, why not)."""
    import importlib

    try:
        return importlib.import_module(module), ""
    except ImportError as exc:  # not built, or built against another torch: say which
        return None, f"{type(exc).__name__}: {exc}"


def _gpus(torch) -> dict:
    if not torch.cuda.is_available():
        return {"count": 0, "devices": [], "peer_access": [], "why_none": "torch.cuda.is_available() is False"}
    count = torch.cuda.device_count()
    devices = []
    for i in range(count):
        p = torch.cuda.get_device_properties(i)
        devices.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                        "memory_gib": round(p.total_memory / 2**30, 1)})
    peer = [[i == j or bool(torch.cuda.can_device_access_peer(i, j)) for j in range(count)] for i in range(count)]
    return {"count": count, "devices": devices, "peer_access": peer}


def _extension() -> dict:
    from .comm.backends.cuda import CALL_FAMILIES, EXPERIMENTAL_ENV, VERIFIED_FAMILIES, enabled_families

    ext, why = _import("moe_ep._C")
    built = tuple(getattr(ext, "kernel_families", ())) if ext is not None else ()
    enabled = enabled_families(built)
    calls = {call: ("kernels" if family in enabled else
                    f"reference ({family}: " + ("not built" if family not in built else
                                                f"not verified on 2 GPUs yet; {EXPERIMENTAL_ENV}={family} uses it")
                    + ")")
             for call, family in CALL_FAMILIES.items()}
    report = {"built": ext is not None, "why_not": why, "families_built": list(built),
              "families_verified": list(VERIFIED_FAMILIES), "families_enabled": list(enabled),
              "gpu_calls": calls}
    if ext is not None:
        report["sm90_compiled"] = bool(ext.is_sm90_compiled())
    nvshmem_module, why_nvshmem = _import("moe_ep._nvshmem")
    from ._build_paths import nvshmem_home

    report["nvshmem"] = {"home_at_build_time_lookup": nvshmem_home(), "module_built": nvshmem_module is not None,
                         "why_not": why_nvshmem,
                         "puts_compiled": bool(getattr(nvshmem_module, "ll_puts_compiled", False))}
    return report


def collect() -> dict:
    import torch

    return {"moe_ep": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "gpus": _gpus(torch), "extension": _extension(),
            "settings": env.rows(), "unknown_settings": env.unknown_settings()}


def _print(report: dict) -> None:
    print(f"moe_ep {report['moe_ep']}  python {report['python']}  torch {report['torch']} (CUDA {report['torch_cuda']})")
    gpus = report["gpus"]
    if not gpus["count"]:
        print(f"GPUs: none ({gpus['why_none']}): every Buffer runs the reference backend (torch.distributed)")
    else:
        for d in gpus["devices"]:
            print(f"GPU {d['index']}: {d['name']} (sm_{d['capability'].replace('.', '')}, {d['sms']} SMs, "
                  f"{d['memory_gib']} GiB)")
        missing = [(i, j) for i, row in enumerate(gpus["peer_access"]) for j, ok in enumerate(row) if not ok]
        if gpus["count"] > 1:
            print("peer access: " + ("every pair" if not missing else
                                     "MISSING for " + ", ".join(f"{i}->{j}" for i, j in missing)
                                     + " (the intranode kernels need it between a group's GPUs)"))
    ext = report["extension"]
    if not ext["built"]:
        print(f"extension moe_ep._C: not importable ({ext['why_not']}); build it: python3 setup.py build_ext --inplace")
    else:
        print(f"extension moe_ep._C: families built {ext['families_built']}, in use {ext['families_enabled']}, "
              f"sm90 code {'yes' if ext.get('sm90_compiled') else 'no'}")
    for call, how in ext["gpu_calls"].items():
        print(f"  {call:<22} on GPU groups: {how}")
    nv = ext["nvshmem"]
    print(f"NVSHMEM: {nv['home_at_build_time_lookup'] or 'not found (set NVSHMEM_DIR or pip install nvidia-nvshmem-cu13)'}; "
          f"moe_ep._nvshmem " + ("built" + (", puts compiled" if nv["puts_compiled"] else "") if nv["module_built"]
                                  else f"not importable ({nv['why_not']})"))
    print("settings (* = set here):")
    for row in report["settings"]:
        value = row["value"]
        shown = f"* {value!r}" if value is not None else f"  default {row['default']!r}"
        print(f"  {row['name']:<40} {shown:<28} [{row['read']}] {row['meaning']}")
    if report["unknown_settings"]:
        print("WARNING: set but not read by moe_ep (a typo?): " + ", ".join(report["unknown_settings"]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moe_ep info", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = collect()
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        _print(report)


if __name__ == "__main__":
    main()
