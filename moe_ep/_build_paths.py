"""Where the build finds optional native dependencies. Standard library only: setup.py loads this
file by path before moe_ep (and torch) can be imported, and the tests import it normally."""
from __future__ import annotations

import os
from typing import Optional


def nvshmem_home() -> Optional[str]:
    """NVSHMEM_DIR, else the nvidia-nvshmem-cu13 wheel's folder (include/ and lib/), else None."""
    home = os.environ.get("NVSHMEM_DIR")
    if home:
        return home
    try:
        import nvidia.nvshmem as wheel
    except ImportError:
        return None
    return list(wheel.__path__)[0]


def keep_going_build_ext(base):
    """A subclass of the build_ext command ``base`` (torch's BuildExtension) under which an extension
    marked ``optional`` that fails to build only warns: ninja's RuntimeError is not among the errors
    setuptools' own ``optional`` forgives, so moe_ep._nvshmem failing would otherwise take moe_ep._C
    down with it."""
    import sys

    class BuildExtensionKeepGoing(base):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any compiler or ninja failure
                if not getattr(ext, "optional", False):
                    raise
                print(f"moe_ep: the optional module {ext.name} failed to build ({exc}); building without it",
                      file=sys.stderr)

    return BuildExtensionKeepGoing
