"""CPU: the intranode size check's two halves agree, and the host wait's answers become the right
errors. The notify kernel compares kCallSizes numbers per rank (csrc/intranode.h) and its trap line
names them in a fixed order; the engine sends them in DISPATCH_SIZE_NAMES's order and names them
from it when it raises. A field added on one side only would shift every name after it."""
from __future__ import annotations

import os
import re

from moe_ep.comm.backends.intranode import DISPATCH_SIZE_NAMES
from moe_ep.comm.backends.reference import disagreement_error

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


def _read(name: str) -> str:
    with open(os.path.join(CSRC, name), encoding="utf-8") as f:
        return f.read()


def test_names_match_the_kernels_count_and_trap_line():
    count = int(re.search(r"constexpr int kCallSizes = (\d+);", _read("intranode.h")).group(1))
    assert len(DISPATCH_SIZE_NAMES) == count
    source = re.sub(r'"\s*\n\s*"', "", _read("intranode.cu"))  # adjacent string literals joined
    start = source.index('"moe_ep: intranode dispatch on rank %d')
    line = source[start:source.index("\\n", start)]
    there, here = line.split(" there; ")
    for side in (there, here):
        assert len(re.findall(r"=%lld", side)) == count, side
    # Each of the kernel's names begins the engine's name at the same place.
    kernel_names = re.findall(r"([\w][\w -]*)=%lld", there)
    assert [engine.lower().startswith(kernel) for kernel, engine in zip(kernel_names, DISPATCH_SIZE_NAMES)] == \
        [True] * count, (kernel_names, DISPATCH_SIZE_NAMES)


def test_disagreement_names_each_size_that_differs_with_every_rank():
    rows = [[256, 0, 2, 0, 8, 64, 0, 0], [128, 0, 2, 0, 8, 64, 0, 0], [256, 1, 1, 2, 8, 64, 0, 0]]
    error = disagreement_error("dispatch", list(DISPATCH_SIZE_NAMES), rows)
    message = str(error)
    assert isinstance(error, ValueError)
    assert "hidden by rank: [256, 128, 256]" in message
    assert "FP8 (x as a tuple) by rank: [0, 0, 1]" in message
    assert "x element bytes by rank: [2, 2, 1]" in message
    assert "scale columns by rank: [0, 0, 2]" in message
    assert "top-k columns" not in message.split("; ", 1)[1]  # named in the list of what must agree only
    assert disagreement_error("dispatch", list(DISPATCH_SIZE_NAMES), [rows[0], list(rows[0])]) is None


class _Record:
    """What IntranodeHostRecord.wait returns, without a GPU."""

    def __init__(self, answer):
        self.answer = answer

    def wait(self, epoch, timeout_s, num_local_experts, num_ranks):
        return self.answer


def _engine_with(answer):
    from moe_ep.comm.backends.intranode import IntranodeEngine

    engine = object.__new__(IntranodeEngine)  # only the host-wait step: no buffers, no group
    engine.record, engine._epoch, engine.num_ranks, engine.rank = _Record(answer), 1, 2, 0
    return engine


def test_host_wait_turns_the_records_sizes_into_the_error():
    import pytest

    rows = [[256, 0, 2, 0, 8, 64, 0, 0], [256, 0, 2, 0, 8, 64, 0, 32]]
    with pytest.raises(ValueError, match=re.escape("num_worst_tokens by rank: [0, 32]")):
        _engine_with(("sizes differ", rows))._wait_sizes(32)
    sizes = (10, 7, [3, 4], 5, 1, 0, 63)
    assert _engine_with(sizes)._wait_sizes(2) == sizes


def test_host_wait_that_times_out_raises_a_named_timeout():
    import pytest

    from moe_ep.comm.errors import MoeEpTimeoutError

    with pytest.raises(MoeEpTimeoutError, match="rank 0: dispatch waited"):
        _engine_with(None)._wait_sizes(2)
