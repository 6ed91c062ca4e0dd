"""CPU: the in-process ranks' entry points reject bad arguments with a clear exception before they
touch a GPU, and say how this process loads CUDA modules (they need eager loading)."""
from __future__ import annotations

import pytest
import torch

from moe_ep.comm.ipc import IntranodeBufferError, adopt_in_process, module_loading_mode


@pytest.mark.parametrize("num_bytes", [-1, 1.5, True, "64"])
def test_adopt_in_process_rejects_a_bad_size(num_bytes):
    with pytest.raises(ValueError, match="num_bytes must be a non-negative int"):
        adopt_in_process(2, torch.device("cpu"), num_bytes)


def test_adopt_in_process_without_the_extension_says_how_to_build_it():
    try:
        from moe_ep import _C  # noqa: F401
    except ImportError:
        with pytest.raises(IntranodeBufferError, match="setup.py build_ext"):
            adopt_in_process(2, torch.device("cpu"), 1024)
    else:
        pytest.skip("the extension is built here: the GPU tests (tests/test_gpu_loopback.py) cover adopt_in_process")


def test_module_loading_mode_is_one_of_three():
    assert module_loading_mode() in ("eager", "lazy", "unknown")


def test_engines_in_process_reject_a_cpu_device():
    from moe_ep.comm.backends.intranode import IntranodeEngine
    from moe_ep.comm.backends.low_latency import LowLatencyEngine

    with pytest.raises(ValueError, match="needs a CUDA device"):
        IntranodeEngine.in_process(2, torch.device("cpu"), 1 << 20)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        LowLatencyEngine.in_process(2, torch.device("cpu"), 1 << 20)
