"""GPU: the bounded device-side wait (csrc/bounded_wait.cuh) through its test hook
``moe_ep._C._wait_test``: it returns once another stream sets the flag, and without a writer it
prints its timeout line and traps, which the host reports as ``MoeEpTimeoutError``.

The producer/consumer case and the timeout case run in child processes: a wait that never ends
traps, and a trap leaves the CUDA context unusable, which would fail every later GPU test of the
pytest process."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from moe_ep.comm.errors import MoeEpTimeoutError, translate_device_errors
from tests.conftest import require_kernels

pytestmark = pytest.mark.gpu

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _extension():
    return require_kernels("bounded_wait_test", "_wait_test")


@pytest.fixture(scope="module")
def ext():
    return _extension()


def test_wait_returns_at_once_when_the_flag_is_already_set(ext):
    flag = torch.full((1,), -7, dtype=torch.int32, device="cuda")
    with translate_device_errors("_wait_test"):
        ext._wait_test(flag, -7, 5.0, 1, 2)
        torch.cuda.synchronize()


def test_wait_test_validates_its_arguments(ext, monkeypatch):
    with pytest.raises(TypeError, match="int32"):
        ext._wait_test(torch.zeros(1, dtype=torch.int64, device="cuda"), 1, 1.0, 0, 0)
    with pytest.raises(ValueError, match="CUDA"):
        ext._wait_test(torch.zeros(1, dtype=torch.int32), 1, 1.0, 0, 0)
    with pytest.raises(ValueError, match="at least one element"):
        ext._wait_test(torch.zeros(0, dtype=torch.int32, device="cuda"), 1, 1.0, 0, 0)
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="timeout_s"):
        ext._wait_test(flag, 1, float("nan"), 0, 0)
    # timeout_s <= 0 reads MOE_EP_TIMEOUT_S on the host, which is validated before any launch.
    monkeypatch.setenv("MOE_EP_TIMEOUT_S", "-3")
    with pytest.raises(ValueError, match="MOE_EP_TIMEOUT_S"):
        ext._wait_test(flag, 1, 0.0, 0, 0)
    torch.cuda.synchronize()  # nothing was launched, the context is intact


_PREAMBLE = textwrap.dedent("""
    import ctypes, os, sys, time
    import torch
    from moe_ep import _C
    from moe_ep.comm.errors import translate_device_errors

    def finish(code):
        sys.stdout.flush()
        sys.stderr.flush()
        ctypes.CDLL(None).fflush(None)  # the device printf line may sit in C stdio's buffer
        os._exit(code)  # skip interpreter teardown: after a trap the CUDA context is unusable

    def report(exc, began):
        print("RAISED " + type(exc).__name__ + " AFTER %.3f S: " % (time.monotonic() - began)
              + " ".join(str(exc).split()))
        finish(3)
""")

_CHILD_SET_BY_ANOTHER_STREAM = _PREAMBLE + textwrap.dedent("""
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    scratch = torch.zeros(1, dtype=torch.int32, device="cuda")
    waiter, writer = torch.cuda.Stream(), torch.cuda.Stream()
    # Warm-up: with lazy module loading (CUDA_MODULE_LOADING=LAZY, the default) the first launch
    # of a kernel may wait for the kernels already running, so a writer kernel launched for the
    # first time while the waiter spins would never start. Launch every kernel involved once first.
    with torch.cuda.stream(writer):
        torch.cuda._sleep(1000)
        scratch.fill_(1)
    _C._wait_test(scratch, 1, 5.0, 0, 0)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    began = time.monotonic()
    try:
        with translate_device_errors("_wait_test"):
            with torch.cuda.stream(waiter):
                start.record()
                _C._wait_test(flag, 1, 10.0, 0, 0)
                end.record()
            with torch.cuda.stream(writer):
                torch.cuda._sleep(50_000_000)  # ~25-50 ms of GPU clock cycles before the write
                flag.fill_(1)
            torch.cuda.synchronize()
    except BaseException as exc:
        report(exc, began)
    print("WAITED %.3f MS FLAG %d" % (start.elapsed_time(end), flag.item()))
    finish(0)
""")

_CHILD_NO_WRITER = _PREAMBLE + textwrap.dedent("""
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    began = time.monotonic()
    try:
        with translate_device_errors("_wait_test"):
            _C._wait_test(flag, 1, 0.0, 3, 7)  # 0.0: the timeout comes from MOE_EP_TIMEOUT_S
            torch.cuda.synchronize()
    except BaseException as exc:
        report(exc, began)
    print("NO ERROR")
    finish(0)
""")


def _run_child(code: str, timeout_env: str) -> tuple[subprocess.CompletedProcess, str, float]:
    env = dict(os.environ, MOE_EP_TIMEOUT_S=timeout_env, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p))
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=28)
    took = time.monotonic() - began
    return proc, f"--- exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}", took


def test_wait_returns_when_another_stream_sets_the_flag(ext):
    proc, output, _ = _run_child(_CHILD_SET_BY_ANOTHER_STREAM, "100")
    assert proc.returncode == 0, output
    assert "device wait timed out" not in proc.stdout + proc.stderr, output
    waited = re.search(r"WAITED ([0-9.]+) MS FLAG (-?\d+)", proc.stdout)
    assert waited, output
    # The wait kernel started before the writer's sleep ended, so it really waited for the flag.
    assert float(waited.group(1)) > 5.0, f"the wait kernel returned before the flag was set:\n{output}"
    assert int(waited.group(2)) == 1, output


def test_wait_times_out_with_a_readable_line_and_error(ext):
    proc, output, took = _run_child(_CHILD_NO_WRITER, "0.5")
    assert proc.returncode != 0, output
    # CUDA device printf writes to stdout; look in both streams in case a driver sends it elsewhere.
    line = re.search(r"moe_ep: device wait timed out after 0\.500 s: kernel=wait_test rank=3 channel=7 "
                     r"counter=flag last=0 expected==1 block=0 thread=0 \(timeout: MOE_EP_TIMEOUT_S\)",
                     proc.stdout + proc.stderr)
    assert line, f"the kernel's timeout line is missing:\n{output}"
    # One line, however many threads time out (the error message quotes the line's start, not this).
    assert len(re.findall(r"kernel=wait_test rank=", proc.stdout + proc.stderr)) == 1, output
    raised = re.search(r"RAISED (\w+) AFTER ([0-9.]+) S: (.*)", proc.stdout)
    assert raised, f"the child did not report an exception:\n{output}"
    assert raised.group(1) == MoeEpTimeoutError.__name__, output
    assert float(raised.group(2)) >= 0.45, f"trapped before the 0.5 s timeout:\n{output}"
    message = raised.group(3)
    for needle in ("_wait_test", "device-side wait timed out", "MOE_EP_TIMEOUT_S", "0.5 s", "unusable",
                   "restart"):
        assert needle in message, f"{needle!r} missing from the error message:\n{output}"
    assert took < 30, f"the timeout test took {took:.1f} s"
