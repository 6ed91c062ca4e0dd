"""CPU: moe_ep.comm.errors — MOE_EP_TIMEOUT_S parsing and the translation of a trapped kernel's
CUDA error into MoeEpTimeoutError (csrc/bounded_wait.cuh is the device side)."""
from __future__ import annotations

import pytest

from moe_ep.comm import errors
from moe_ep.comm.errors import MoeEpTimeoutError, raise_readable, timeout_seconds, translate_device_errors

TRAP_MESSAGES = [
    "CUDA error: unspecified launch failure\nCUDA kernel errors might be asynchronously reported at some "
    "other API call, so the stacktrace below might be incorrect.",
    "CUDA error: an illegal instruction was encountered\nCompile with `TORCH_USE_CUDA_DSA` to enable "
    "device-side assertions.",
    "moe_ep CUDA error in cudaStreamSynchronize: unspecified launch failure",
    "cudaErrorLaunchFailure",
]


@pytest.mark.parametrize("raw,want", [(None, 100.0), ("", 100.0), ("   ", 100.0), ("5", 5.0), ("0.5", 0.5),
                                      (" 2.5 ", 2.5), ("1e3", 1000.0), ("+7", 7.0), (".25", 0.25)])
def test_timeout_seconds_accepts(monkeypatch, raw, want):
    if raw is None:
        monkeypatch.delenv(errors.TIMEOUT_ENV, raising=False)
    else:
        monkeypatch.setenv(errors.TIMEOUT_ENV, raw)
    assert timeout_seconds() == want


@pytest.mark.parametrize("raw", ["0", "-1", "abc", "inf", "nan", "1e400", "1e-400", "0x10", "1_000", "5s", "1 2"])
def test_timeout_seconds_rejects(monkeypatch, raw):
    monkeypatch.setenv(errors.TIMEOUT_ENV, raw)
    with pytest.raises(ValueError, match="MOE_EP_TIMEOUT_S"):
        timeout_seconds()


@pytest.mark.parametrize("message", TRAP_MESSAGES)
def test_trap_error_becomes_timeout_error(monkeypatch, message):
    monkeypatch.setenv(errors.TIMEOUT_ENV, "0.5")
    original = RuntimeError(message)
    with pytest.raises(MoeEpTimeoutError) as info:
        with translate_device_errors("Buffer.dispatch"):
            raise original
    text = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert info.value.__cause__ is original
    assert "Buffer.dispatch" in text
    assert "device-side wait timed out" in text
    assert "MOE_EP_TIMEOUT_S" in text and "0.5 s" in text
    assert "rank" in text and "channel" in text and "counter" in text
    assert "unusable" in text and "restart" in text
    assert message.splitlines()[0] in text


def test_accelerator_error_is_translated():
    accelerator_error = getattr(__import__("torch"), "AcceleratorError", None)
    if accelerator_error is None:
        pytest.skip("this torch has no torch.AcceleratorError")
    try:
        exc = accelerator_error("CUDA error: unspecified launch failure")
    except TypeError:
        pytest.skip("torch.AcceleratorError cannot be built from Python in this torch")
    with pytest.raises(MoeEpTimeoutError, match="combine"):
        with translate_device_errors("combine"):
            raise exc


def test_timeout_error_mentions_invalid_env(monkeypatch):
    monkeypatch.setenv(errors.TIMEOUT_ENV, "soon")
    with pytest.raises(MoeEpTimeoutError, match="invalid"):
        with translate_device_errors("x"):
            raise RuntimeError("CUDA error: unspecified launch failure")


@pytest.mark.parametrize("exc", [RuntimeError("CUDA error: an illegal memory access was encountered"),
                                 RuntimeError("CUDA out of memory"), ValueError("unspecified launch failure"),
                                 KeyError("k"), MoeEpTimeoutError("already readable")])
def test_other_errors_pass_through_unchanged(exc):
    with pytest.raises(type(exc)) as info:
        with translate_device_errors("dispatch"):
            raise exc
    assert info.value is exc
    with pytest.raises(type(exc)) as info:
        raise_readable(exc, "dispatch")
    assert info.value is exc


def test_raise_readable_translates():
    original = RuntimeError("CUDA error: unspecified launch failure")
    with pytest.raises(MoeEpTimeoutError, match="low_latency_dispatch") as info:
        raise_readable(original, "low_latency_dispatch")
    assert info.value.__cause__ is original


def test_no_exception_passes():
    with translate_device_errors("dispatch"):
        pass
