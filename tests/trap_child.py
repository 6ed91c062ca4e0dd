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
