"""Applies the rules README's "Defaults decided by the 2-GPU run" wrote down before the figures
existed, to the JSON of a 2-GPU run (scripts/device_next.sh stage A), so the decision is read off
the data, not argued after it (applied in the fourteenth session; rerun it to see whether a later
run would still decide the same):

    PYTHONPATH=$PWD python3 scripts/decide_defaults.py --normal OUT/normal.json \
        --ll OUT/f32_partials/ll.json --ll-bf16 OUT/ll.json

* receive pool on by default: every ``*_direct`` dispatch beats its plain row within 12 and within
  24 SMs (``best_within_sms``, what a user with that SM budget gets) and ``combine_bf16_pull`` beats
  ``combine_bf16`` there; a pulled combine that loses while the direct dispatches win keeps the pool
  on with ``MOE_EP_COMBINE_PULL=0``;
* bf16 combine partials by default: only if they bring the low-latency combine within issue 5's
  target (kernel durations, eager and graph replay) where float32 partials do not;
* the low-latency family by default: read from the test logs of stages C and D, not from JSON.

A rule whose rows are missing, or a run not at the settings the rule is about, says "undecided".
"""
from __future__ import annotations

import argparse
import json
from typing import Optional

from moe_ep.bench_ll import against_peer
from moe_ep.bench_normal import PEER_SETTINGS as NORMAL_SETTINGS

BUDGETS = (12, 24)
DIRECT = {"dispatch_fp8_direct": "dispatch_fp8", "dispatch_bf16_direct": "dispatch_bf16"}
PULL = ("combine_bf16_pull", "combine_bf16")


def _gbps(best: dict, budget: int, op: str) -> Optional[float]:
    row = best.get(str(budget), best.get(budget, {})).get(op)
    return None if row is None else row["gbps"]


def decide_pool(normal: dict) -> dict:
    """The receive pool's and the pulled combine's defaults from ``bench normal --recv-pool``."""
    s = normal["settings"]
    if normal["world_size"] != 2 or any(s.get(k) != v for k, v in NORMAL_SETTINGS.items()):
        return {"recv_pool": "undecided", "combine_pull": "undecided",
                "why": "not bench normal at the peer's settings on 2 ranks"}
    best = normal.get("best_within_sms") or {}
    pairs = {**DIRECT, PULL[0]: PULL[1]}  # new row -> the plain row it must beat
    seen = {(b, new): (_gbps(best, b, new), _gbps(best, b, old)) for b in BUDGETS for new, old in pairs.items()}
    missing = [f"{new} / {pairs[new]} within {b} SMs" for (b, new), (x, y) in seen.items() if x is None or y is None]
    if missing:
        return {"recv_pool": "undecided", "combine_pull": "undecided", "why": "missing rows: " + ", ".join(missing)}
    direct_wins = all(seen[b, new][0] > seen[b, new][1] for b in BUDGETS for new in DIRECT)
    pull_wins = all(seen[b, PULL[0]][0] > seen[b, PULL[0]][1] for b in BUDGETS)
    figures = {f"{new} vs {pairs[new]} within {b} SMs": [round(x, 1), round(y, 1)] for (b, new), (x, y) in seen.items()}
    if not direct_wins:
        return {"recv_pool": "off", "combine_pull": "n/a", "why": "a direct dispatch lost", "gbps": figures}
    return {"recv_pool": "on", "combine_pull": "on" if pull_wins else "off (MOE_EP_COMBINE_PULL=0)",
            "why": "direct dispatches won" + ("; pulled combine won" if pull_wins else "; pulled combine lost"),
            "gbps": figures}


def decide_partials(ll_float32: dict, ll_bf16: dict) -> dict:
    """bf16 combine partials by default only if they alone meet issue 5's combine target."""
    summaries = {name: report.get("against_peer") or against_peer(report)
                 for name, report in (("float32", ll_float32), ("bfloat16", ll_bf16))}
    if not all(summary["comparable"] for summary in summaries.values()):
        return {"bf16_partials": "undecided", "why": "a bench ll run not at the peer's settings on 2 ranks"}
    combine = {name: next(r for r in summary["rows"] if r["op"] == "combine") for name, summary in summaries.items()}
    meets = {name: row["meets_target"] for name, row in combine.items()}
    if None in meets.values():
        return {"bf16_partials": "undecided", "why": "no kernel rows (bench ll from before the eleventh session?)"}
    figures = {name: [row["kernels_us"], row["kernels_graph_us"]] for name, row in combine.items()}
    on = meets["bfloat16"] and not meets["float32"]
    why = ("bf16 meets the target, float32 does not" if on else
           "float32 meets it too: the extra rounding buys nothing" if meets["float32"] else
           "neither meets it: bf16 alone does not decide the target")
    return {"bf16_partials": "on" if on else "off", "why": why, "combine_kernels_us_eager_graph": figures,
            "target_us": combine["float32"]["target_us"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--normal", help="normal.json of bench normal --recv-pool (2 GPUs)")
    parser.add_argument("--ll", help="ll.json of bench ll, float32 partials (2 GPUs)")
    parser.add_argument("--ll-bf16", help="ll.json of bench ll with MOE_EP_LL_COMBINE_PARTIALS=bfloat16")
    parser.add_argument("--out", help="write the decisions here as JSON")
    args = parser.parse_args()
    load = lambda path: json.load(open(path)) if path else None  # noqa: E731
    decisions = {"low_latency_family": "read the logs of device_next.sh stages C (ll_tests) and D (nccl_experimental)"}
    if args.normal:
        decisions["receive_pool"] = decide_pool(load(args.normal))
    if args.ll and args.ll_bf16:
        decisions["combine_partials"] = decide_partials(load(args.ll), load(args.ll_bf16))
    print(json.dumps(decisions, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(decisions, f, indent=1)


if __name__ == "__main__":
    main()
