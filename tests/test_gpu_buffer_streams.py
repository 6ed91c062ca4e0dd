"""GPU: the Buffer's stream and event semantics (async_finish, previous_event,
allocate_on_comm_stream, receive hooks, worst-token mode) over NCCL, one rank per GPU (up to 2).
Every asynchronous form must give the same bytes as the synchronous call."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

HIDDEN = 384  # a multiple of 128 that is not a power of two


def _inputs(rank: int, world_size: int, device: torch.device):
    gen = torch.Generator(device="cpu").manual_seed(1000 + rank)
    num_tokens, num_experts, top_k = 37 + 5 * rank, 8 * world_size, 4
    x = torch.randn(num_tokens, HIDDEN, generator=gen).bfloat16().to(device)
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    topk_idx = scores.topk(top_k, dim=1).indices.to(device)
    topk_idx[::5, 1] = -1
    topk_weights = torch.rand(num_tokens, top_k, generator=gen).to(device)
    return x, topk_idx, topk_weights, num_experts


def _streams_worker(ctx) -> None:
    rank, world_size = ctx.rank, ctx.world_size
    import torch.distributed as dist

    from moe_ep.comm import Buffer, EventOverlap

    device = torch.device("cuda", rank)
    x, topk_idx, topk_weights, num_experts = _inputs(rank, world_size, device)
    buffer = Buffer(dist.group.WORLD, low_latency_mode=True,
                    num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(64, HIDDEN, world_size, num_experts))
    assert buffer.get_comm_stream() is not None

    def layout(**kw):
        return buffer.get_dispatch_layout(topk_idx, num_experts, **kw)

    per_rank, _, per_expert, in_rank, event = layout()
    assert isinstance(event, EventOverlap)
    args = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                topk_idx=topk_idx, topk_weights=topk_weights)
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(x, **args)

    # async_finish: returns an event; after waiting, the same bytes.
    *async_out, event = buffer.dispatch(x, **args, async_finish=True)
    assert event.event is not None
    event.current_stream_wait()
    assert torch.equal(async_out[0], recv_x) and torch.equal(async_out[1], recv_idx)
    assert torch.equal(async_out[2], recv_w) and async_out[3] == counts

    # previous_event + allocate_on_comm_stream, as DeepEP's overlap recipe uses them.
    previous = Buffer.capture()
    *comm_out, event = buffer.dispatch(x, **args, previous_event=previous, async_finish=True,
                                       allocate_on_comm_stream=True)
    with event:
        pass
    assert torch.equal(comm_out[0], recv_x)
    with pytest.raises(ValueError, match="previous_event"):
        buffer.dispatch(x, **args, allocate_on_comm_stream=True)

    combined, _, _ = buffer.combine(recv_x, handle)
    combined_async, _, event = buffer.combine(recv_x, handle, async_finish=True)
    event.current_stream_wait()
    assert torch.equal(combined, combined_async)
    assert torch.equal(combined.float(), (x.float() * in_rank.sum(1, keepdim=True)).bfloat16().float())

    # worst-token mode (fixed sizes, no host sync) gives the same leading rows.
    # The same value on every rank (it sizes the blocks the ranks exchange): all tokens of all ranks.
    worst = sum(37 + 5 * r for r in range(world_size)) + 9
    w_x, w_idx, w_w, w_counts, w_handle, _ = buffer.dispatch(x, **args, num_worst_tokens=worst)
    assert w_counts == [] and w_x.shape[0] == worst
    n = recv_x.shape[0]
    assert torch.equal(w_x[:n], recv_x) and torch.equal(w_idx[:n], recv_idx) and (w_idx[n:] == -1).all()
    w_combined, _, _ = buffer.combine(w_x, w_handle)
    assert torch.equal(w_combined, combined)

    # Low latency: the hook form and the async form give the plain call's data.
    ll_x, ll_idx, ll_w = x[:32], topk_idx[:32], topk_weights[:32]
    plain, plain_count, _, _, _ = buffer.low_latency_dispatch(ll_x, ll_idx, 64, num_experts, use_fp8=False)
    plain, plain_count = plain.clone(), plain_count.clone()
    recv, count, ll_handle, _, hook = buffer.low_latency_dispatch(ll_x, ll_idx, 64, num_experts, use_fp8=False,
                                                                  return_recv_hook=True)
    hook()
    assert torch.equal(count, plain_count)
    for local in range(count.shape[0]):
        rows = int(count[local])
        assert torch.equal(recv[local, :rows], plain[local, :rows])
    out, event, hook = buffer.low_latency_combine(recv, ll_idx, ll_w, ll_handle, return_recv_hook=True)
    hook()
    expected = ll_x.float() * torch.where(ll_idx >= 0, ll_w, 0.0).sum(1, keepdim=True)
    assert ((out.float() - expected).norm() / expected.norm()).item() < 1e-2
    torch.cuda.synchronize()


def test_stream_and_event_semantics_match_sync_calls(nccl_pool):
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    nccl_pool(min(2, max(count, 1))).run(_streams_worker, timeout=300)
