"""Environment variables set for the duration of a block, in a test rank (the kernels' launchers read
some of them at every launch)."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """Set ``values``; afterwards restore each variable's previous value (or unset it)."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
