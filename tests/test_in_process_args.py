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



@pytest.mark.parametrize("value,fused", [("0", False), ("1", True), (None, True)])
def test_ll_fused_setting_is_read_from_the_environment(monkeypatch, value, fused):
    from moe_ep.comm.backends.low_latency import FUSED_ENV, _fused_from_env

    if value is None:
        monkeypatch.delenv(FUSED_ENV, raising=False)
    else:
        monkeypatch.setenv(FUSED_ENV, value)
    assert _fused_from_env() is fused


@pytest.mark.parametrize("value", ["yes", "2", ""])
def test_ll_fused_setting_rejects_other_values(monkeypatch, value):
    from moe_ep.comm.backends.low_latency import FUSED_ENV, _fused_from_env

    monkeypatch.setenv(FUSED_ENV, value)
    with pytest.raises(ValueError, match="MOE_EP_LL_FUSED must be '0' or '1'"):
        _fused_from_env()
