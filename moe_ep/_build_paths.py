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
