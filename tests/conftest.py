"""Shared test infrastructure: a session-wide pool of torch.distributed ranks.

Fixtures
--------
``dist_pool``  (session) a factory: ``pool = dist_pool(world_size)`` returns a running
               :class:`tests.dist_pool.DistPool` of that many ranks (started on first use, cached
               for the session, restarted if an earlier test killed it, shut down at the end).
               ``pool.run(fn, *args, timeout=120, **kwargs)`` runs the module-level function
               ``fn(ctx, *args, **kwargs)`` on every rank and returns the per-rank results;
               ``ctx`` has ``rank``, ``world_size``, ``device``, ``group``, ``backend``.
``nccl_pool``  (session) a factory like ``dist_pool`` that always uses NCCL (one rank per GPU):
               ``nccl_pool(min(2, torch.cuda.device_count()))`` for GPU tests that must run on
               devices whatever the suite's backend; skips when there are too few GPUs. Same
               bounded ``run`` (a wedged rank becomes a PoolTimeout with every rank's stack).
``gpu_gloo_pool`` (session) a factory like ``dist_pool`` for the intranode (CUDA IPC) kernel tests:
               always gloo, and rank r runs on cuda:(r % device_count), so several ranks may share
               ONE GPU (``ctx.device`` is that GPU; the group moves CPU tensors). Skips, with the
               reason, when there is no GPU or the built ``moe_ep._C`` has no intranode kernels.
``require_intranode_kernels`` (function) skips the test, with the reason, under the same conditions.
``dist_backend`` (session) "gloo" or "nccl".
``seed``       (function) an int derived from the test's node id: fresh data per test,
               reproducible across runs.

Backend: ``--moe-ep-backend {gloo,nccl}`` or the environment variable ``MOE_EP_TEST_BACKEND``
(default gloo: CPU tensors, ``ctx.device`` is cpu). With nccl each rank uses ``cuda:rank``; a
test asking for more ranks than there are GPUs is skipped with the reason.
"""
from __future__ import annotations

import os
import sys
import zlib

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # spawned workers inherit sys.path: they import tests.* and moe_ep
    sys.path.insert(0, REPO_ROOT)

from tests.dist_pool import BACKEND_ENV, SUPPORTED_BACKENDS, DistPool  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--moe-ep-backend", choices=SUPPORTED_BACKENDS, default=None,
                     help=f"torch.distributed backend of the test rank pool (default: ${BACKEND_ENV} or gloo)")


@pytest.fixture(scope="session")
def dist_backend(request: pytest.FixtureRequest) -> str:
    backend = request.config.getoption("--moe-ep-backend") or os.environ.get(BACKEND_ENV, "gloo")
    if backend not in SUPPORTED_BACKENDS:
        raise pytest.UsageError(f"{BACKEND_ENV} must be one of {SUPPORTED_BACKENDS}, got {backend!r}")
    return backend


@pytest.fixture(scope="session")
def dist_pool(dist_backend: str):
    pools: dict[int, DistPool] = {}

    def get(world_size: int) -> DistPool:
        if dist_backend == "nccl":
            import torch

            available = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if available < world_size:
                pytest.skip(f"nccl backend needs {world_size} GPUs, {available} visible")
        pool = pools.get(world_size)
        if pool is None or not pool.alive:
            pools[world_size] = pool = DistPool(world_size, backend=dist_backend)
        return pool

    yield get
    for pool in pools.values():
        pool.shutdown()


@pytest.fixture(scope="session")
def nccl_pool(dist_backend: str, dist_pool):
    pools: dict[int, DistPool] = {}

    def get(world_size: int) -> DistPool:
        if dist_backend == "nccl":
            return dist_pool(world_size)  # the suite's own pool already is one
        import torch

        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available < max(world_size, 1):
            pytest.skip(f"needs {max(world_size, 1)} GPU(s) for an NCCL rank pool, {available} visible")
        pool = pools.get(world_size)
        if pool is None or not pool.alive:
            pools[world_size] = pool = DistPool(world_size, backend="nccl")
        return pool

    yield get
    for pool in pools.values():
        pool.shutdown()


def kernels_missing(family: str, entry_point: str) -> str | None:
    """Why a kernel family cannot run here (None when it can): no GPU, no extension, or a build
    without the family (neither listed in ``kernel_families``, as ``CudaBackend`` reads it, nor
    exporting ``entry_point``)."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    try:
        from moe_ep import _C
    except ImportError as exc:
        return (f"the CUDA extension moe_ep._C is not built ({exc}); "
                "build it with `python3 setup.py build_ext --inplace`")
    families = tuple(getattr(_C, "kernel_families", ()))
    if family not in families and not hasattr(_C, entry_point):
        return (f"this build of moe_ep._C has no {family} kernels (neither {family!r} in "
                f"kernel_families={families} nor {entry_point}); rebuild the extension")
    return None


def require_kernels(family: str, entry_point: str):
    """moe_ep._C when ``family`` can run here (see kernels_missing), else skip the test with the reason."""
    reason = kernels_missing(family, entry_point)
    if reason:
        pytest.skip(reason)
    from moe_ep import _C

    return _C


def intranode_kernels_missing() -> str | None:
    return kernels_missing("intranode", "intranode_dispatch")


def skip_where_kernels_trap(dist_backend: str, family: str, entry_point: str, covered_by: str) -> None:
    """Skip a reference-backend test of a refusal that has no host wait to raise from on GPUs.

    Under NCCL with ``family``'s kernels built and enabled, a rank that disagrees on sizes inside a
    call with no host wait cannot get a ValueError: the kernel prints both ranks' sizes and traps,
    which kills the CUDA context of the pool's workers. ``covered_by`` (a GPU test in a child
    process) asserts that trap and its message, so the skip hides no check."""
    if dist_backend != "nccl" or kernels_missing(family, entry_point) is not None:
        return
    from moe_ep import _C
    from moe_ep.comm.backends.cuda import enabled_families

    if family in enabled_families(tuple(getattr(_C, "kernel_families", ()))):
        pytest.skip(f"on GPUs the {family} kernels trap here with a message naming both ranks' sizes "
                    f"(no host wait to raise from); asserted by {covered_by}")


@pytest.fixture
def require_intranode_kernels() -> None:
    reason = intranode_kernels_missing()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def gpu_gloo_pool():
    pools: dict[int, DistPool] = {}

    def get(world_size: int) -> DistPool:
        reason = intranode_kernels_missing()
        if reason:
            pytest.skip(reason)
        pool = pools.get(world_size)
        if pool is None or not pool.alive:
            pools[world_size] = pool = DistPool(world_size, backend="gloo", cuda_devices=True)
        return pool

    yield get
    for pool in pools.values():
        pool.shutdown()


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    return zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
