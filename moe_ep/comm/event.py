"""EventOverlap: the handle async calls return, as in DeepEP."""
from __future__ import annotations

from typing import Any, Optional

import torch


class EventOverlap:
    """Wraps a CUDA event recorded after a communication step (``None`` on CPU, where work is
    synchronous and waiting is a no-op).

    ``extra_tensors`` keeps tensors alive until the event is waited on, so the caching allocator
    cannot hand their memory to another stream while the communication still reads them.
    """

    def __init__(self, event: Optional[torch.cuda.Event] = None, extra_tensors: Optional[tuple[Any, ...]] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """Make the current CUDA stream wait for the event (no host synchronization)."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        self.current_stream_wait()

    def __repr__(self) -> str:
        return f"EventOverlap(event={'set' if self.event is not None else None})"
