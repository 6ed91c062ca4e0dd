"""GPU: the layout kernel (``moe_ep._C.get_dispatch_layout``, csrc/layout.cu) equals the reference
backend's ``get_dispatch_layout`` exactly, called directly on one GPU and through ``Buffer`` (one
NCCL rank, where the Buffer must pick the cuda backend)."""
from __future__ import annotations

import types

import pytest
import torch

from moe_ep.comm.backends.reference import ReferenceBackend
from tests.conftest import require_kernels

pytestmark = pytest.mark.gpu


def _extension():
    return require_kernels("layout", "get_dispatch_layout")


@pytest.fixture(scope="module")
def ext():
    return _extension()


def _reference(topk_idx: torch.Tensor, num_experts: int, num_ranks: int):
    stub = types.SimpleNamespace(num_ranks=num_ranks)  # the reference reads only num_ranks
    per_rank, _, per_expert, in_rank = ReferenceBackend.get_dispatch_layout(stub, topk_idx, num_experts)
    return per_rank, per_expert, in_rank


def _check_equal(ext, topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> None:
    num_tokens = topk_idx.shape[0]
    per_rank, per_expert, in_rank = ext.get_dispatch_layout(topk_idx, num_experts, num_ranks)
    want_rank, want_expert, want_in = _reference(topk_idx, num_experts, num_ranks)
    label = f"T={num_tokens} K={topk_idx.shape[1]} E={num_experts} R={num_ranks}"
    assert per_rank.dtype == torch.int32 and per_rank.shape == (num_ranks,), label
    assert per_expert.dtype == torch.int32 and per_expert.shape == (num_experts,), label
    assert in_rank.dtype == torch.bool and in_rank.shape == (num_tokens, num_ranks), label
    for got in (per_rank, per_expert, in_rank):
        assert got.device == topk_idx.device and got.is_contiguous(), label
    assert torch.equal(in_rank, want_in), f"{label}: is_token_in_rank differs in " \
        f"{(in_rank != want_in).sum().item()} places"
    assert torch.equal(per_expert, want_expert), f"{label}: num_tokens_per_expert differs"
    assert torch.equal(per_rank, want_rank), f"{label}: num_tokens_per_rank {per_rank.tolist()} " \
        f"!= {want_rank.tolist()}"


def _routing(kind: str, num_tokens: int, k: int, num_experts: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":  # distinct experts per token, as top-k gives
        idx = torch.rand(num_tokens, num_experts, generator=gen).topk(k, dim=1).indices if num_tokens else \
            torch.empty(0, k, dtype=torch.int64)
    elif kind == "duplicates":  # repeated ids in a row count once per entry, once per rank
        idx = torch.randint(0, max(1, num_experts // 8), (num_tokens, k), generator=gen)
    elif kind == "skewed":  # everything to one expert
        idx = torch.full((num_tokens, k), num_experts - 1, dtype=torch.int64)
    elif kind == "masked":  # -1 entries, and some rows entirely -1
        idx = torch.randint(0, num_experts, (num_tokens, k), generator=gen)
        idx[torch.rand(num_tokens, k, generator=gen) < 0.4] = -1
        idx[torch.rand(num_tokens, generator=gen) < 0.2] = -1
    elif kind == "all_masked":
        idx = torch.full((num_tokens, k), -1, dtype=torch.int64)
    else:
        raise AssertionError(kind)
    return idx.to(torch.int64).contiguous().cuda()


CASES = [
    # (kind, T, K, E, R)
    ("random", 1, 1, 8, 1),
    ("random", 1, 8, 64, 8),
    ("masked", 1, 4, 16, 2),
    ("all_masked", 1, 4, 16, 2),
    ("random", 0, 8, 64, 4),
    ("random", 0, 0, 64, 4),
    ("random", 5, 0, 64, 4),
    ("random", 100, 2, 8, 2),
    ("random", 257, 3, 9, 3),
    ("masked", 1000, 6, 48, 3),
    ("skewed", 4096, 8, 256, 8),
    ("skewed", 300, 16, 64, 64),
    ("duplicates", 777, 8, 256, 4),
    ("masked", 2049, 8, 256, 8),
    ("all_masked", 513, 8, 256, 8),
    ("random", 8192, 8, 256, 1),
    ("random", 8192, 8, 256, 2),
    ("random", 8192, 8, 256, 4),
    ("random", 8192, 8, 256, 8),
    ("random", 8191, 8, 288, 8),
    ("masked", 4097, 8, 288, 3),
    ("random", 16384, 16, 512, 64),
    ("masked", 16384, 16, 512, 16),
    ("random", 40000, 2, 64, 4),     # more tiles than blocks: the grid-stride path
    ("random", 3000, 7, 8192, 32),   # the largest expert count the kernel supports
]


@pytest.mark.parametrize("kind,num_tokens,k,num_experts,num_ranks", CASES,
                         ids=[f"{c[0]}-T{c[1]}-K{c[2]}-E{c[3]}-R{c[4]}" for c in CASES])
def test_layout_kernel_equals_reference(ext, kind, num_tokens, k, num_experts, num_ranks):
    topk_idx = _routing(kind, num_tokens, k, num_experts, seed=num_tokens * 31 + k * 7 + num_ranks)
    _check_equal(ext, topk_idx, num_experts, num_ranks)


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4, 8, 16, 64])
def test_every_rank_count_with_masked_rows(ext, num_ranks):
    num_experts = 24 * num_ranks if num_ranks <= 8 else 4 * num_ranks
    topk_idx = _routing("masked", 1500, 8, num_experts, seed=num_ranks)
    _check_equal(ext, topk_idx, num_experts, num_ranks)


def test_layout_runs_on_the_current_stream_and_repeats(ext):
    topk_idx = _routing("masked", 5000, 8, 256, seed=3)
    want = _reference(topk_idx, 256, 8)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        results = [ext.get_dispatch_layout(topk_idx, 256, 8) for _ in range(3)]  # counts re-zeroed each call
    torch.cuda.current_stream().wait_stream(side)
    for got in results:
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_layout_captures_in_a_cuda_graph(ext):
    static_idx = _routing("random", 2048, 8, 256, seed=4)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ext.get_dispatch_layout(static_idx, 256, 8)  # warm-up off the default stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = ext.get_dispatch_layout(static_idx, 256, 8)
    for seed in range(5, 9):
        static_idx.copy_(_routing("masked", 2048, 8, 256, seed=seed))
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(outputs, _reference(static_idx, 256, 8)):
            assert torch.equal(got, want), f"replay with seed {seed} differs"


def test_layout_on_a_second_device_index_follows_the_tensor(ext):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs to check that the kernel runs on the tensor's device")
    topk_idx = _routing("masked", 600, 4, 32, seed=9).to("cuda:1")
    got = ext.get_dispatch_layout(topk_idx, 32, 4)
    assert all(t.device == topk_idx.device for t in got)
    for g, w in zip(got, _reference(topk_idx, 32, 4)):
        assert torch.equal(g, w)


BAD_INPUTS = [
    # (description, make topk_idx, E, R, exception, message fragment)
    ("int32 ids", lambda: torch.zeros(4, 2, dtype=torch.int32, device="cuda"), 8, 2, TypeError, "topk_idx"),
    ("CPU tensor", lambda: torch.zeros(4, 2, dtype=torch.int64), 8, 2, ValueError, "topk_idx"),
    ("1-D ids", lambda: torch.zeros(4, dtype=torch.int64, device="cuda"), 8, 2, ValueError, "topk_idx"),
    ("non-contiguous", lambda: torch.zeros(2, 4, dtype=torch.int64, device="cuda").t(), 8, 2, ValueError,
     "contiguous"),
    ("E % R != 0", lambda: torch.zeros(4, 2, dtype=torch.int64, device="cuda"), 10, 4, ValueError, "num_experts"),
    ("R > 64", lambda: torch.zeros(4, 2, dtype=torch.int64, device="cuda"), 130, 65, ValueError, "num_ranks"),
    ("R = 0", lambda: torch.zeros(4, 2, dtype=torch.int64, device="cuda"), 8, 0, ValueError, "num_ranks"),
    ("E = 0", lambda: torch.zeros(4, 2, dtype=torch.int64, device="cuda"), 0, 1, ValueError, "num_experts"),
    ("E too large", lambda: torch.zeros(4, 2, dtype=torch.int64, device="cuda"), 8192 * 2, 2, ValueError,
     "num_experts"),
]


def _check_bad_inputs_here() -> None:
    """Runs in a child process (see below): one line per case, flushed before the next starts."""
    from moe_ep import _C

    for i, (what, make, num_experts, num_ranks, exc, fragment) in enumerate(BAD_INPUTS):
        print(f"START {i}", flush=True)
        try:
            _C.get_dispatch_layout(make(), num_experts, num_ranks)
            outcome = "no exception"
        except Exception as e:  # noqa: BLE001 (reported to the parent)
            outcome = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(f"RESULT {i} {outcome}", flush=True)


@pytest.fixture(scope="module")
def bad_input_outcomes(ext):
    """Each case's exception as 'Type: first line', from one child process, so that a crash in the
    extension's error path fails these tests instead of killing the pytest process."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c",
                           "import tests.test_cuda_layout as t; t._check_bad_inputs_here()"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    outcomes = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            _, i, outcome = line.split(" ", 2)
            outcomes[int(i)] = outcome
    return outcomes, proc


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)), ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_naming_the_argument(bad_input_outcomes, case):
    what, _, _, _, exc, fragment = BAD_INPUTS[case]
    outcomes, proc = bad_input_outcomes
    if case not in outcomes:
        pytest.fail(f"{what}: the checking process exited with {proc.returncode} before finishing this case "
                    f"(a crash in the extension's error path?)\nstdout:\n{proc.stdout[-2000:]}\n"
                    f"stderr:\n{proc.stderr[-4000:]}")
    outcome = outcomes[case]
    assert outcome.startswith(exc.__name__ + ":"), f"{what}: expected {exc.__name__}, got {outcome}"
    assert fragment in outcome, f"{what}: the message should name {fragment!r}: {outcome}"


def test_extension_reports_its_limits(ext):
    assert ext.layout_max_ranks == 64
    assert ext.layout_max_experts >= 512


# ------------------------------------------------------------------ through Buffer (1 NCCL rank)
def _buffer_worker(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    from moe_ep.comm import Buffer

    buffer = Buffer(dist.group.WORLD, num_nvl_bytes=0)
    backend = buffer.backend
    assert backend.name == "cuda", f"Buffer picked the {backend.name} backend on a GPU group"
    assert backend.uses_kernel("get_dispatch_layout") and "get_dispatch_layout" in backend.kernel_calls
    assert "dispatch" in backend.reference_calls
    assert "CUDA kernels for get_dispatch_layout" in backend.describe()
    for kind, num_tokens, k, num_experts in [("masked", 3000, 8, 256), ("random", 1, 4, 32),
                                             ("random", 0, 4, 32), ("skewed", 700, 6, 288)]:
        topk_idx = _routing(kind, num_tokens, k, num_experts, seed=num_tokens)
        for async_finish in (False, True):
            per_rank, per_rdma, per_expert, in_rank, event = buffer.get_dispatch_layout(
                topk_idx, num_experts, async_finish=async_finish)
            event.current_stream_wait()
            want = ReferenceBackend.get_dispatch_layout(backend, topk_idx, num_experts)
            assert per_rdma is None
            assert torch.equal(per_rank, want[0]) and torch.equal(per_expert, want[2]) and \
                torch.equal(in_rank, want[3]), f"Buffer.get_dispatch_layout differs for {kind} T={num_tokens}"
        # non-contiguous ids go through the same kernel
        wide = torch.cat([topk_idx, topk_idx], dim=1)[:, :k]
        got = buffer.get_dispatch_layout(wide, num_experts)
        want = ReferenceBackend.get_dispatch_layout(backend, wide, num_experts)
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])


def test_buffer_uses_the_cuda_backend_for_layout(ext):
    from moe_ep.launch import launch

    launch(_buffer_worker, 1, "nccl")


# ------------------------------------------------------------------ out-of-range ids (no host read)
_BAD_ID_SETUP = r'''
buffer = Buffer(dist.group.WORLD, num_nvl_bytes=0)
assert buffer.backend.uses_kernel("get_dispatch_layout"), buffer.backend.describe()
topk_idx = torch.randint(0, 16, (5, 2), device="cuda")
buffer.get_dispatch_layout(topk_idx, 16)
torch.cuda.synchronize()
topk_idx[3, 1] = {bad}
'''


@pytest.mark.parametrize("bad", [16, -2])
def test_out_of_range_expert_id_traps_with_a_message(ext, bad):
    """The Buffer does not read topk_idx on the host (a synchronisation; a ValueError from it
    would fail here); the layout kernel stops with one line naming the call, the entry and the
    bound, and the host gets an exception."""
    from tests.trap_child import assert_call_traps

    assert_call_traps(_BAD_ID_SETUP.format(bad=bad), "buffer.get_dispatch_layout(topk_idx, 16)",
                      f"moe_ep: get_dispatch_layout: topk_idx[3][1] = {bad} is outside [-1, 15] (num_experts = 16)")
