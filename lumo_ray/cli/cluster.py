"""`lumo status`: what the connected Ray cluster offers and what the chosen config would ask for."""
from __future__ import annotations

import sys

from .common import command_config


def cmd_status(args) -> int:
    from pipelines.status import run_status
    cfg = command_config(args)
    try:
        rep = run_status(cfg, args.address)
    except (ConnectionError, ValueError) as e:
        print(f"[status] {e}", file=sys.stderr)
        return 1
    return 1 if (args.strict and rep["problems"]) else 0


def add_commands(sub, common) -> None:
    """sub: the top-level subparsers; common(parser, config=True) adds --config/--set/--address."""
    s = sub.add_parser("status", help="cluster resources (nodes, CPUs, GPUs, memory, object store) vs. what the "
                                      "config asks for; joins an existing cluster, never starts one")
    common(s)
    s.add_argument("--strict", action="store_true", help="exit 1 when a request group does not fit the cluster")
    s.set_defaults(func=cmd_status)
