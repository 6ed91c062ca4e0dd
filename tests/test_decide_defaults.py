"""scripts/decide_defaults.py applies README's pre-registered rules for the defaults that wait for a
2-GPU run to that run's JSON: the receive pool (direct dispatch and pulled combine within 12 and 24
SMs) and the bf16 combine partials (issue 5's combine target, kernel durations, eager and graph)."""
from __future__ import annotations

import importlib.util
import pathlib

from moe_ep.bench_ll import PEER, PEER_SETTINGS as LL_SETTINGS
from moe_ep.bench_normal import PEER_SETTINGS as NORMAL_SETTINGS

_spec = importlib.util.spec_from_file_location(
    "decide_defaults", pathlib.Path(__file__).resolve().parents[1] / "scripts" / "decide_defaults.py")
decide = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(decide)


def _normal(gbps: dict, world_size: int = 2, tokens: int = 4096) -> dict:
    """A normal.json as written to disk (budgets are string keys) with the given GB/s per (budget, op)."""
    best: dict = {}
    for (budget, op), value in gbps.items():
        best.setdefault(str(budget), {})[op] = {"gbps": value, "us": 1.0, "sms": budget, "chunk": None}
    return {"world_size": world_size, "settings": dict(NORMAL_SETTINGS, tokens=tokens), "best_within_sms": best}


def _all(direct: float, plain: float, pull: float, push: float) -> dict:
    rows = {}
    for budget in (12, 24):
        rows.update({(budget, "dispatch_fp8_direct"): direct, (budget, "dispatch_fp8"): plain,
                     (budget, "dispatch_bf16_direct"): direct, (budget, "dispatch_bf16"): plain,
                     (budget, "combine_bf16_pull"): pull, (budget, "combine_bf16"): push})
    return rows


def test_pool_rule():
    on = decide.decide_pool(_normal(_all(400, 300, 350, 300)))
    assert (on["recv_pool"], on["combine_pull"]) == ("on", "on")
    no_pull = decide.decide_pool(_normal(_all(400, 300, 250, 300)))
    assert (no_pull["recv_pool"], no_pull["combine_pull"]) == ("on", "off (MOE_EP_COMBINE_PULL=0)")
    rows = _all(400, 300, 350, 300)
    rows[24, "dispatch_bf16_direct"] = 299.0  # one direct dispatch loses at one budget: no pool
    assert decide.decide_pool(_normal(rows))["recv_pool"] == "off"
    del rows[12, "combine_bf16_pull"]
    missing = decide.decide_pool(_normal(rows))
    assert missing["recv_pool"] == "undecided" and "combine_bf16_pull / combine_bf16 within 12 SMs" in missing["why"]
    assert decide.decide_pool(_normal(_all(400, 300, 350, 300), world_size=1))["recv_pool"] == "undecided"
    assert decide.decide_pool(_normal(_all(400, 300, 350, 300), tokens=64))["recv_pool"] == "undecided"


def _ll(combine_kernels: float, combine_graph: float, world_size: int = 2) -> dict:
    rows = [{"tokens": 128, "backend": "buffer", "mode": mode, "op": op, "us": us}
            for mode, op, us in (("kernels", "dispatch", 15.0), ("kernels-graph", "dispatch", 15.0),
                                 ("kernels", "combine", combine_kernels), ("kernels-graph", "combine", combine_graph))]
    return {"world_size": world_size, "settings": dict(LL_SETTINGS), "rows": rows, "peer": PEER}


def test_partials_rule():
    on = decide.decide_partials(_ll(30.0, 29.0), _ll(25.0, 24.0))
    assert on["bf16_partials"] == "on" and on["combine_kernels_us_eager_graph"]["bfloat16"] == [25.0, 24.0]
    assert decide.decide_partials(_ll(27.0, 26.0), _ll(25.0, 24.0))["bf16_partials"] == "off"  # float32 meets it
    assert decide.decide_partials(_ll(33.0, 32.0), _ll(29.0, 27.0))["bf16_partials"] == "off"  # graph over 28 µs
    assert decide.decide_partials(_ll(30.0, 29.0), _ll(25.0, 24.0, world_size=1))["bf16_partials"] == "undecided"
    no_kernel_rows = {**_ll(30.0, 29.0), "rows": []}
    assert decide.decide_partials(no_kernel_rows, _ll(25.0, 24.0))["bf16_partials"] == "undecided"
