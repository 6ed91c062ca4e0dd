"""Readable errors for device-side waits that time out.

moe_ep kernels that wait for flags or counters written by peers (other streams, kernels, GPUs)
never spin forever (``csrc/bounded_wait.cuh``): past a timeout the waiting thread prints one line
and executes ``trap``::

    moe_ep: device wait timed out after 100.000 s: kernel=wait_test rank=3 channel=7 counter=flag
    last=0 expected==1 block=0 thread=0 (timeout: MOE_EP_TIMEOUT_S)

The line goes to the process's **stdout** (CUDA device ``printf`` writes there). The host only
learns of the trap at its next synchronisation, as a generic CUDA error ("unspecified launch
failure" or "an illegal instruction was encountered"), after which the CUDA context is unusable
and the process must restart. :func:`translate_device_errors` / :func:`raise_readable` turn that
error into :class:`MoeEpTimeoutError`, which says so.

The timeout is ``MOE_EP_TIMEOUT_S`` seconds (a positive number; default 100), read on the host
each time a kernel is launched; :func:`timeout_seconds` applies the same rules as the launchers.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
from typing import Iterator, NoReturn

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
    "MoeEpTimeoutError",
    "is_device_wait_failure",
    "raise_readable",
    "timeout_seconds",
    "translate_device_errors",
]

TIMEOUT_ENV = "MOE_EP_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 100.0

# Same accepted forms as timeout_seconds_from_env() in csrc/bounded_wait.cuh: a decimal number
# with an optional exponent; no hex, inf, nan or digit separators.
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")

# How a trap in a kernel reaches the host (CUDA runtime messages, and the driver's names).
_TRAP_PATTERNS = (
    "unspecified launch failure",
    "an illegal instruction was encountered",
    "cudaerrorlaunchfailure",
    "cudaerrorillegalinstruction",
    "cuda_error_launch_failed",
    "cuda_error_illegal_instruction",
)


class MoeEpTimeoutError(RuntimeError):
    """A moe_ep kernel stopped at a device-side wait that timed out (or otherwise trapped)."""


def timeout_seconds() -> float:
    """The device-wait timeout in force, in seconds: ``MOE_EP_TIMEOUT_S``, else 100.

    Raises ``ValueError`` naming the variable unless it is unset, empty, or a finite positive
    decimal number (``"5"``, ``"0.5"``, ``"1e3"``).
    """
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_TIMEOUT_S
    text = raw.strip()
    value = float(text) if _NUMBER.fullmatch(text) else math.nan
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"environment variable {TIMEOUT_ENV} must be a positive number of seconds "
                         f"(e.g. 100 or 0.5), got {raw!r}")
    return value


def is_device_wait_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is how a trapped kernel (a timed-out device wait) shows up on the host."""
    if isinstance(exc, MoeEpTimeoutError) or not isinstance(exc, RuntimeError):
        return False  # torch.AcceleratorError is a RuntimeError
    message = str(exc).lower()
    return any(pattern in message for pattern in _TRAP_PATTERNS)


def _timeout_description() -> str:
    try:
        return f"{timeout_seconds():g} s ({TIMEOUT_ENV}; default {DEFAULT_TIMEOUT_S:g})"
    except ValueError:
        return f"{TIMEOUT_ENV}={os.environ.get(TIMEOUT_ENV)!r} (invalid; the launchers reject it)"


def _readable(exc: BaseException, what: str) -> MoeEpTimeoutError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return MoeEpTimeoutError(
        f"moe_ep: {what} failed on the GPU: a device-side wait timed out (a kernel trapped; the CUDA "
        f"error was: {first_line}). The kernel printed one line on this process's stdout starting "
        f"'moe_ep: device wait timed out' that names the kernel, rank, channel/peer, the counter, "
        f"its last value and the expected value: usually a peer rank that never reached the matching "
        f"call, or crashed. (The low-latency kernels also trap, after a line 'moe_ep: low_latency_... "
        f"topk_idx[t][k] = v is outside [-1, E-1]', on an out-of-range expert id: no host sync checks it.) "
        f"Timeout in force: {_timeout_description()}. The CUDA context is now "
        f"unusable: every later CUDA call in this process fails, so the process must restart.")


def raise_readable(exc: BaseException, what: str = "a moe_ep call") -> NoReturn:
    """Raise :class:`MoeEpTimeoutError` (chained to ``exc``) if ``exc`` is a trapped kernel's CUDA
    error, else re-raise ``exc`` unchanged. ``what`` names the call, e.g. ``"Buffer.dispatch"``."""
    if is_device_wait_failure(exc):
        raise _readable(exc, what) from exc
    raise exc


@contextlib.contextmanager
def translate_device_errors(what: str) -> Iterator[None]:
    """Around a moe_ep call and the synchronisation after it: a trapped kernel's CUDA error becomes
    :class:`MoeEpTimeoutError` naming ``what``; every other exception passes through unchanged."""
    try:
        yield
    except RuntimeError as exc:
        if not is_device_wait_failure(exc):
            raise
        raise _readable(exc, what) from exc
