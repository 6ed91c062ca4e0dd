"""``python -m moe_ep <command>``: ``run`` (the main job: an MoE stack over N ranks, checked
against a dense run), ``demo`` (dispatch/combine over N ranks) and ``info`` (what this install can
do: build, GPUs, backends per call, settings)."""
from __future__ import annotations

import sys


COMMANDS = {
    "run": "moe_ep.run",
    "demo": "moe_ep.demo",
    "info": "moe_ep.info",
}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m moe_ep {" + ",".join(COMMANDS) + "} [options]   (each takes --help)")
        sys.exit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    import importlib
    importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main()
