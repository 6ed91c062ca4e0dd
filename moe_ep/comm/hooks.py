"""Bookkeeping of the low-latency receive hooks, so misuse raises instead of corrupting results.

Low-latency dispatches alternate between two buffers, and so do combines (double buffering, as in
DeepEP): a call reuses the buffer of the call of its kind two calls back. If that call's receive
hook has not run, its arrival flags are still set and its rows unread, so the new call would read
stale flags or overwrite rows still owed; DeepEP leaves that to the caller. Here the third call
raises before anything is launched, a hook that already ran raises when called again (its flags
are gone: it would wait until the bounded wait's timeout), and a combine whose dispatch has not
received yet raises. ``clean_low_latency_buffer`` forgets every pending hook, as it clears their flags.
Only this rank's calls are seen: the rule holds per rank, which is where the buffers are reused.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Optional

KINDS = ("low_latency_dispatch", "low_latency_combine")


class _Call:
    """One low-latency call: whether its receive has completed (a call without a hook at once), and
    for a dispatch, its handle's first tensor (what a combine's handle is matched by)."""

    __slots__ = ("received", "key")

    def __init__(self, received: bool, key: Optional[int]) -> None:
        self.received, self.key = received, key


class HookLedger:
    """The last two low-latency calls of each kind (a combine's handle can only come from one of
    the last two dispatches: older results have been overwritten)."""

    def __init__(self) -> None:
        self._recent = {kind: deque(maxlen=2) for kind in KINDS}

    def check_issue(self, kind: str) -> None:
        """Raises if a new ``kind`` call would reuse the buffer of a call whose hook has not run."""
        recent = self._recent[kind]
        if len(recent) == 2 and not recent[0].received:
            raise RuntimeError(
                f"{kind}: the receive hook of the {kind} two calls back was never called, and this call "
                "would reuse its buffer (at most two calls of a kind may be outstanding). Call that hook "
                "first, or clean_low_latency_buffer() to drop it")

    def check_handle(self, handle: tuple) -> None:
        """Raises if the dispatch behind ``handle`` has not received its rows yet."""
        calls = [c for c in self._recent["low_latency_dispatch"] if c.key == id(handle[0])]
        if calls and not calls[-1].received:
            raise RuntimeError("low_latency_combine: the dispatch behind this handle has not received its rows: "
                               "call the hook low_latency_dispatch returned before combining")

    def issued(self, kind: str, hook: Optional[Callable[[], None]], handle: Optional[tuple] = None
               ) -> Optional[Callable[[], None]]:
        """Records a call just issued and returns its hook, wrapped to record that it ran (once)."""
        call = _Call(received=hook is None, key=None if handle is None else id(handle[0]))
        self._recent[kind].append(call)
        if hook is None:
            return None

        def receive() -> None:
            if call.received:
                raise RuntimeError(f"{kind}: this receive hook already ran; each hook completes its call once")
            hook()
            call.received = True

        return receive

    def clear(self) -> None:
        """Forget every pending hook (their flags were cleared)."""
        for recent in self._recent.values():
            recent.clear()
