"""A call that traps on the device, run in a child process (a trap leaves the CUDA context
unusable). The kernels that check their own input (out-of-range expert ids: layout, intranode
dispatch in worst-token mode, low latency) print one line and trap; their tests assert here that
the call raised on the host and that the line was printed."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Optional

from tests.dist_pool import free_port

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One rank over NCCL: a Buffer picks the cuda backend only for a group whose tensors live on GPUs.
_PRELUDE = r'''
import os, sys
sys.path.insert(0, {root!r})
os.environ.update({env!r})
import torch, torch.distributed as dist
from moe_ep.comm import Buffer
from moe_ep.comm.errors import MoeEpTimeoutError
torch.cuda.set_device(0)
dist.init_process_group("nccl", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
'''

_CALL = r'''
try:
{call}
    torch.cuda.synchronize()
except MoeEpTimeoutError as exc:
    print("RAISED MoeEpTimeoutError:", str(exc)[:200], flush=True)
    os._exit(3)
except RuntimeError as exc:
    print("RAISED", type(exc).__name__, str(exc)[:200], flush=True)
    os._exit(4)
print("NO ERROR", flush=True)
'''


def child_code(setup: str, call: str, env: Optional[dict] = None) -> str:
    """The child's program: the prelude (``torch``, ``dist``, ``Buffer`` and a one-rank NCCL group
    in scope), ``setup``, then ``call`` with the exit codes assert_call_traps reads."""
    body = textwrap.indent(textwrap.dedent(call).strip(), "    ")
    return (_PRELUDE.format(root=REPO_ROOT, env=dict(env or {}), port=free_port()) + textwrap.dedent(setup)
            + _CALL.format(call=body))


def assert_call_traps(setup: str, call: str, expected_line: str, env: Optional[dict] = None,
                      timeout: float = 180.0) -> None:
    """Runs ``setup`` and then ``call`` (statements) in a child process; asserts that the call
    raised on the host (exit 4: the trapped context's RuntimeError; 3: a bounded wait's timeout)
    and that ``expected_line`` was printed. A host-side ValueError, or no error, fails."""
    proc = subprocess.run([sys.executable, "-c", child_code(setup, call, env)], capture_output=True, text=True,
                          timeout=timeout)
    output = proc.stdout + proc.stderr
    assert "NO ERROR" not in output, output
    assert proc.returncode in (3, 4), f"exit code {proc.returncode} (3/4: the call raised):\n{output}"
    assert expected_line in output, output


# Two ranks (processes, a gloo group; one GPU each, or both on GPU 0 where there is one). `case` is
# sys.argv[1]; `rank`, `device`, `torch`, `dist`, `os`, `time` are in scope of setup and call.
_TWO_RANKS = r'''
import os, sys, threading, time
sys.path.insert(0, {root!r})
os.environ["MOE_EP_TIMEOUT_S"] = "15"  # a wait that should have ended in a named trap ends here instead
import torch, torch.distributed as dist, torch.multiprocessing as mp

def rank_main(rank, case):
    torch.cuda.set_device(min(rank, torch.cuda.device_count() - 1))
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    device = torch.device("cuda", torch.cuda.current_device())
{setup}
    try:
{call}
        threading.Timer(20, lambda: (print(f"rank {{rank}}: BLOCKED", flush=True), os._exit(0))).start()
        torch.cuda.synchronize()
        print(f"rank {{rank}}: NO ERROR", flush=True)
    except Exception as exc:
        print(f"rank {{rank}}: RAISED {{type(exc).__name__}}: {{str(exc)[:400]}}", flush=True)
    os._exit(0)

if __name__ == "__main__":
    print("GPUS", torch.cuda.device_count(), flush=True)
    mp.spawn(rank_main, args=(sys.argv[1],), nprocs=2, join=True)
'''


def run_two_ranks(tmp_path, setup: str, call: str, case: str = "", timeout: float = 150.0) -> str:
    """Runs ``setup`` and then ``call`` (statements) on two ranks and returns their output. Each rank
    prints ``rank r: RAISED <type>: <message>``, ``rank r: NO ERROR``, or ``rank r: BLOCKED`` when
    its host wait has not returned 20 s after the call: two processes that trap at the same moment
    on one shared GPU had one host wait left blocked by the driver (README, Bounded waits)."""
    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS.format(root=REPO_ROOT, port=free_port(),
                                        setup=textwrap.indent(textwrap.dedent(setup).strip(), " " * 4),
                                        call=textwrap.indent(textwrap.dedent(call).strip(), " " * 8)))
    proc = subprocess.run([sys.executable, str(script), case], capture_output=True, text=True, timeout=timeout)
    return proc.stdout + proc.stderr
