"""`lumo data ...` commands (Ray Data jobs in pipelines/)."""
from __future__ import annotations


def add_commands(sub, common) -> None:
    pass
