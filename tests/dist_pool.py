"""A persistent pool of torch.distributed ranks for tests.

Spawning ranks is slow (each process imports torch and joins a process group), so a pool starts
``world_size`` processes once and then runs many test functions on them::

    pool = DistPool(world_size=4)            # or the ``dist_pool`` fixture in conftest.py
    results = pool.run(fn, arg1, arg2)       # fn(ctx, arg1, arg2) on every rank -> list by rank

``fn`` must be a module-level (picklable) function; arguments and results travel by pickle
(tensors in results are moved to CPU first). ``ctx`` is a :class:`RankContext` with ``rank``,
``world_size``, ``device``, ``group`` (``dist.group.WORLD``) and ``backend``.

``DistPool(n, backend="gloo", cuda_devices=True)`` keeps the gloo group but gives rank r the GPU
cuda:(r % device_count) (set as its current device, and as ``ctx.device``): several ranks may
share one GPU, as the CUDA-IPC intranode tests need. The group itself still moves CPU tensors.

Failures: an exception on any rank is re-raised in the caller as :class:`RankFailure` carrying
the rank and the remote traceback. If some ranks are still busy a few seconds after another rank
failed (typically blocked in a collective the failed rank never reached), or if the call runs past
its timeout, every rank's Python stack is dumped into the error and the pool is killed, so the
next ``run`` on a fresh pool starts clean. A skip raised on every rank becomes a skip in the test.

This module deliberately imports neither torch nor pytest at import time: workers import it
before they set the thread environment, and torch must see ``OMP_NUM_THREADS`` on import.
"""
from __future__ import annotations

import os
import pickle
import queue
import signal
import socket
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BACKEND_ENV = "MOE_EP_TEST_BACKEND"
SUPPORTED_BACKENDS = ("gloo", "nccl")

# Seconds the other ranks get to finish after one rank raised before the pool is declared wedged.
ERROR_GRACE_S = 5.0
# Collective timeout inside the process group: a backstop, the pool's own timeouts act first.
PROCESS_GROUP_TIMEOUT_S = 600
START_TIMEOUT_S = 300.0

# Environment the workers get before importing torch: several ranks share few cores here.
WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
}


class RankFailure(Exception):
    """One or more ranks raised (or the pool wedged) while running a function."""


class PoolTimeout(RankFailure):
    """The function did not finish on every rank within its timeout; the pool was killed."""


class RankContext:
    """What a pooled function receives as its first argument."""

    def __init__(self, rank: int, world_size: int, device: Any, group: Any, backend: str) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.group = group
        self.backend = backend

    def __repr__(self) -> str:
        return f"RankContext(rank={self.rank}, world_size={self.world_size}, device={self.device}, backend={self.backend!r})"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _to_cpu(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, tuple):
        return tuple(_to_cpu(item) for item in obj)
    if isinstance(obj, list):
        return [_to_cpu(item) for item in obj]
    if isinstance(obj, dict):
        return {key: _to_cpu(value) for key, value in obj.items()}
    return obj


def _is_skip(exc: BaseException) -> bool:
    return type(exc).__name__ == "Skipped" and type(exc).__module__.startswith("_pytest")


def _health_check(ctx: RankContext) -> int:
    import torch
    import torch.distributed as dist

    # gloo moves CPU tensors (ctx.device may be a GPU with cuda_devices=True); NCCL, GPU tensors.
    probe = torch.ones(1, device=ctx.device if ctx.backend == "nccl" else "cpu")
    dist.all_reduce(probe, group=ctx.group)
    return int(probe.item())


def _worker_main(rank: int, world_size: int, backend: str, init_method: str, task_queue: Any,
                 result_queue: Any, stack_dir: str, cuda_devices: bool = False) -> None:
    os.environ.update(WORKER_ENV)
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    import faulthandler

    # The parent sends SIGUSR1 before killing a wedged pool: every thread's stack lands here.
    stack_file = open(os.path.join(stack_dir, f"rank{rank}.txt"), "w")
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    try:
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        elif cuda_devices:
            if torch.cuda.device_count() == 0:
                raise RuntimeError("cuda_devices=True but no CUDA device is visible")
            device = torch.device("cuda", rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))
        ctx = RankContext(rank, world_size, device, dist.group.WORLD, backend)
        _health_check(ctx)
    except BaseException:
        result_queue.put(("ready", rank, "error", traceback.format_exc()))
        return
    result_queue.put(("ready", rank, "ok", None))

    while True:
        message = task_queue.get()
        if message is None:
            break
        seq, payload = message
        try:
            fn, args, kwargs = pickle.loads(payload)
            result = fn(ctx, *args, **kwargs)
            result_queue.put((seq, rank, "ok", pickle.dumps(_to_cpu(result))))
        except BaseException as exc:  # reported to the parent, the worker lives on
            detail = (type(exc).__qualname__, str(exc)[:4000], traceback.format_exc(), _is_skip(exc))
            result_queue.put((seq, rank, "error", detail))
    try:
        dist.destroy_process_group()
    except Exception:
        pass


class DistPool:
    """``world_size`` persistent ranks in one process group (see the module docstring)."""

    def __init__(self, world_size: int, backend: str = "gloo", start_timeout: float = START_TIMEOUT_S,
                 cuda_devices: bool = False) -> None:
        if backend not in SUPPORTED_BACKENDS:
            raise ValueError(f"backend must be one of {SUPPORTED_BACKENDS}, got {backend!r}")
        if cuda_devices and backend != "gloo":
            raise ValueError("cuda_devices=True is for gloo pools (NCCL pools already use cuda:rank)")
        import torch.multiprocessing as mp

        self.world_size = world_size
        self.backend = backend
        self.cuda_devices = cuda_devices
        self.alive = False
        self._seq = 0
        self._stack_dir = tempfile.mkdtemp(prefix=f"moe_ep_pool{world_size}_")
        context = mp.get_context("spawn")
        self._result_queue = context.Queue()
        self._task_queues = [context.Queue() for _ in range(world_size)]
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self._procs = [
            context.Process(target=_worker_main, daemon=True, name=f"moe_ep_rank{rank}",
                            args=(rank, world_size, backend, init_method, self._task_queues[rank],
                                  self._result_queue, self._stack_dir, cuda_devices))
            for rank in range(world_size)
        ]
        for proc in self._procs:
            proc.start()
        self.alive = True
        errors = {}
        ready: set[int] = set()
        deadline = time.monotonic() + start_timeout
        while len(ready) + len(errors) < world_size:
            message = self._get(deadline)
            if message is None:
                stacks = self.kill()
                raise PoolTimeout(f"{world_size}-rank {backend} pool did not start within {start_timeout:.0f} s "
                                  f"(ready: {sorted(ready)})\n{stacks}")
            _, rank, status, detail = message
            if status == "ok":
                ready.add(rank)
            else:
                errors[rank] = detail
                break
        if errors:
            self.kill()
            rank, detail = min(errors.items())
            raise RankFailure(f"rank {rank} of a {world_size}-rank {backend} pool failed to start:\n{detail}")

    def _get(self, deadline: float) -> Any:
        """The next message before ``deadline`` (None on timeout); raises if a worker died."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                return self._result_queue.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [(rank, proc.exitcode) for rank, proc in enumerate(self._procs) if not proc.is_alive()]
                if dead:
                    self.kill()
                    raise RankFailure(f"{self.world_size}-rank pool: worker(s) died (rank, exit code): {dead}")

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 120.0, **kwargs: Any) -> list[Any]:
        """Run ``fn(ctx, *args, **kwargs)`` on every rank; return the results ordered by rank."""
        if not self.alive:
            raise RuntimeError(f"{self.world_size}-rank pool is not running (it was killed or shut down)")
        payload = pickle.dumps((fn, args, kwargs))
        self._seq += 1
        seq = self._seq
        for task_queue in self._task_queues:
            task_queue.put((seq, payload))

        results: dict[int, Any] = {}
        errors: dict[int, tuple] = {}
        deadline = time.monotonic() + timeout
        grace_deadline = None
        while len(results) + len(errors) < self.world_size:
            message = self._get(deadline if grace_deadline is None else min(deadline, grace_deadline))
            if message is None:
                break
            message_seq, rank, status, detail = message
            if message_seq != seq:
                continue  # a late answer to an earlier call
            if status == "ok":
                results[rank] = detail
            else:
                errors[rank] = detail
                if grace_deadline is None:
                    grace_deadline = time.monotonic() + ERROR_GRACE_S

        missing = sorted(set(range(self.world_size)) - set(results) - set(errors))
        name = getattr(fn, "__qualname__", repr(fn))
        if not errors and not missing:
            return [pickle.loads(results[rank]) for rank in range(self.world_size)]
        if not errors:
            stacks = self.kill()
            raise PoolTimeout(f"{name} timed out after {timeout:.0f} s on rank(s) {missing} of {self.world_size}; "
                              f"the pool was killed.\n{stacks}")

        if not missing and all(detail[3] for detail in errors.values()) and len(errors) == self.world_size:
            import pytest

            pytest.skip(errors[0][1])

        report = []
        for rank in sorted(errors):
            exc_name, exc_text, remote_tb, _ = errors[rank]
            report.append(f"--- rank {rank}: {exc_name}: {exc_text}\n--- remote traceback (rank {rank}):\n{remote_tb}")
        first_rank = min(errors)
        headline = f"{name} raised on rank(s) {sorted(errors)} of {self.world_size}: " \
                   f"rank {first_rank}: {errors[first_rank][0]}: {errors[first_rank][1]}"
        if missing:
            stacks = self.kill()
            report.append(f"rank(s) {missing} did not finish within {ERROR_GRACE_S:.0f} s of the failure; "
                          f"the pool was killed.\n{stacks}")
        else:
            self._check_health()
        raise RankFailure(headline + "\n" + "\n".join(report))

    def _check_health(self) -> None:
        """After a failure every rank answered: make sure the group still works, else kill it."""
        try:
            self.run(_health_check, timeout=20.0)
        except Exception:
            if self.alive:
                self.kill()

    def _dump_stacks(self) -> str:
        for proc in self._procs:
            if proc.is_alive() and proc.pid is not None:
                try:
                    os.kill(proc.pid, signal.SIGUSR1)
                except OSError:
                    pass
        time.sleep(1.0)
        dumps = []
        for rank in range(self.world_size):
            path = os.path.join(self._stack_dir, f"rank{rank}.txt")
            try:
                with open(path) as handle:
                    text = handle.read().strip()
            except OSError:
                text = ""
            # Drop the queue feeder threads every worker has; keep the threads doing work.
            text = "\n\n".join(block for block in text.split("\n\n") if " in _feed" not in block)
            if text:
                dumps.append(f"--- python stacks of rank {rank}:\n{text}")
        return "\n".join(dumps)

    def kill(self) -> str:
        """Kill every worker now; returns their stack dumps (for error messages)."""
        if not self.alive:
            return ""
        stacks = self._dump_stacks()
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        self._reap()
        return stacks

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask every worker to leave the group and exit; kill those that do not."""
        if not self.alive:
            return
        for task_queue in self._task_queues:
            try:
                task_queue.put(None)
            except Exception:
                pass
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        self._reap()

    def _reap(self) -> None:
        self.alive = False
        for proc in self._procs:
            proc.join(5.0)
        for q in [self._result_queue, *self._task_queues]:
            q.cancel_join_thread()
            q.close()
