"""`lumo status` and cluster helpers."""
from __future__ import annotations


def add_commands(sub, common) -> None:
    """sub: the top-level subparsers; common(parser, config=True) adds --config/--set/--address."""
