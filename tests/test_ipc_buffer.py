"""GPU: the intranode buffer runtime (csrc/ipc_buffer.cu, moe_ep.comm.ipc): buffers shared by CUDA
IPC handles exchanged over gloo, peer_copy into peers' buffers and the cross-rank barrier kernel.

Ranks are separate processes; rank r uses cuda:(r % device_count), so one GPU suffices (CUDA IPC
between processes on one device is allowed; their kernels time-slice). The timeout case runs in a
child process, since a trapped kernel leaves that process's CUDA context unusable.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from moe_ep.comm.errors import MoeEpTimeoutError
from tests.conftest import require_kernels

pytestmark = pytest.mark.gpu

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK_BYTES = 4096 + 12  # not a multiple of 16 for every offset: exercises the byte tail of peer_copy
EPOCHS = 20


def _require_extension():
    return require_kernels("ipc_buffer", "IpcBuffer")


def _pattern(seed: int, src: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1009 + src)
    return torch.randint(0, 256, (CHUNK_BYTES,), dtype=torch.uint8, generator=gen)


def _exchange_rank(rank: int, world: int, seed: int) -> None:
    import torch.distributed as dist

    from moe_ep.comm.ipc import open_intranode_buffer

    torch.cuda.set_device(rank % torch.cuda.device_count())
    buf = open_intranode_buffer(None, CHUNK_BYTES * world)
    assert buf.rank == rank and buf.num_ranks == world and buf.epoch == 1
    view = buf.local_view()
    assert view.dtype == torch.uint8 and view.numel() == CHUNK_BYTES * world and view.is_cuda
    assert buf.data_ptr() == view.data_ptr()
    for epoch in range(EPOCHS):
        mine = _pattern(seed, rank, epoch).cuda()
        for dst in range(world):
            buf.peer_copy(dst, rank * CHUNK_BYTES, mine)
        buf.barrier()  # every rank's writes into every buffer are done
        got = view.cpu()
        for src in range(world):
            expected = _pattern(seed, src, epoch)
            chunk = got[src * CHUNK_BYTES:(src + 1) * CHUNK_BYTES]
            if not torch.equal(chunk, expected):
                bad = int((chunk != expected).sum())
                raise AssertionError(f"rank {rank} epoch {epoch}: chunk from rank {src} differs in {bad} bytes")
        buf.barrier()  # every rank has read its buffer before anyone overwrites it
    torch.cuda.synchronize()
    assert buf.epoch == 1 + 2 * EPOCHS
    # Argument checks (no launch): plain errors, the context stays usable.
    with pytest.raises(ValueError, match="dst_rank"):
        buf.peer_copy(world, 0, mine)
    with pytest.raises(ValueError, match="offset"):
        buf.peer_copy(0, CHUNK_BYTES * world - 1, mine)
    with pytest.raises(ValueError, match="CUDA"):
        buf.peer_copy(0, 0, mine.cpu())
    with pytest.raises(RuntimeError, match="once"):
        buf.open_peers([buf.ipc_handle()] * world)
    torch.cuda.synchronize()
    dist.barrier()  # nobody frees its buffer while a peer may still use it
    del view, buf


@pytest.mark.parametrize("world", [2, 4])
def test_peer_copy_and_barrier_over_epochs(world, monkeypatch):
    _require_extension()
    from moe_ep.launch import launch

    monkeypatch.setenv("MOE_EP_TIMEOUT_S", "20")  # a broken barrier fails in 20 s, not 100
    launch(_exchange_rank, world, "gloo", args=(1234 + world,))


def test_ipc_buffer_argument_checks():
    ext = _require_extension()
    with pytest.raises(ValueError, match="num_ranks"):
        ext.IpcBuffer(16, 0, 0)
    with pytest.raises(ValueError, match="rank"):
        ext.IpcBuffer(16, 2, 2)
    with pytest.raises(ValueError, match="num_bytes"):
        ext.IpcBuffer(-1, 0, 1)


def _timeout_rank(rank: int, world: int) -> None:
    """Rank 0 enters a second barrier that rank 1 never enters."""
    import ctypes

    import torch.distributed as dist

    from moe_ep.comm.errors import translate_device_errors
    from moe_ep.comm.ipc import open_intranode_buffer

    torch.cuda.set_device(rank % torch.cuda.device_count())
    buf = open_intranode_buffer(None, 1024)
    dist.barrier()
    if rank == 1:
        time.sleep(25)  # stays alive (its buffer mapped) until the parent ends it
        os._exit(0)
    began = time.monotonic()
    try:
        with translate_device_errors("IpcBuffer.barrier"):
            buf.barrier()
            torch.cuda.synchronize()
        print("NO ERROR", flush=True)
        code = 0
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        print("RAISED " + type(exc).__name__ + " AFTER %.3f S: " % (time.monotonic() - began)
              + " ".join(str(exc).split()), flush=True)
        code = 3
    sys.stdout.flush()
    ctypes.CDLL(None).fflush(None)  # the device printf line may sit in C stdio's buffer
    os._exit(code)  # skip teardown: the CUDA context is unusable after a trap


_TIMEOUT_CHILD = textwrap.dedent("""
    from moe_ep.launch import launch
    from tests.test_ipc_buffer import _timeout_rank
    try:
        launch(_timeout_rank, 2, "gloo")
    except Exception as exc:
        print("LAUNCH ENDED: " + type(exc).__name__, flush=True)
""")


def test_barrier_times_out_when_a_rank_never_arrives():
    _require_extension()
    env = dict(os.environ, MOE_EP_TIMEOUT_S="0.5", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", _TIMEOUT_CHILD], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=50)
    output = f"--- exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    both = proc.stdout + proc.stderr
    line = re.search(r"moe_ep: device wait timed out after 0\.500 s: kernel=intranode_barrier rank=0 channel=1 "
                     r"counter=barrier\[src\] last=1 expected>=2", both)
    assert line, f"the barrier's timeout line is missing:\n{output}"
    raised = re.search(r"RAISED (\w+) AFTER ([0-9.]+) S: (.*)", proc.stdout)
    assert raised, f"rank 0 did not report an exception:\n{output}"
    assert raised.group(1) == MoeEpTimeoutError.__name__, output
    assert float(raised.group(2)) >= 0.45, output
    assert "IpcBuffer.barrier" in raised.group(3), output
