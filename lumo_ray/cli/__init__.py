"""The `lumo` command line and `lumo demo`: the only package code that imports the Ray jobs
(pipelines/, trainers/). main.py parses and dispatches; one module per command group."""
from .main import build_parser, main

__all__ = ["build_parser", "main"]
