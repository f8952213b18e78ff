"""`lumo train/eval/tune` commands of the lm stage."""
from __future__ import annotations


def add_commands(groups: dict, common) -> None:
    """groups: {'train': subparsers, 'eval': subparsers, 'tune': subparsers}; common(parser) adds --config/--set/--address."""
