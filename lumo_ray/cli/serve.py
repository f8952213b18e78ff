"""`lumo serve`: a token-LM or stage-4 run over HTTP on Ray Serve (servers/generate.py)."""
from __future__ import annotations

from .common import command_config


def cmd_serve(args) -> int:
    from ..errors import UserError
    from ..storage import locate

    sets = list(args.set or [])
    for flag, key in (("host", "host"), ("port", "port"), ("replicas", "replicas"), ("token_file", "token_file")):
        if getattr(args, flag) is not None:
            sets.append(f"serve.{key}={getattr(args, flag)}")
    cfg = command_config(args, sets=sets)
    run = locate(args.run)
    if not (run / "config.yaml").exists() or not (run / "export").is_dir():
        raise UserError("token-LM run", args.run, "no config.yaml and export/ there",
                        "give a `lumo train token-lm` or `lumo train mmpt` run directory")
    if cfg.serve.token_file and not locate(cfg.serve.token_file).exists():
        raise UserError("token file", cfg.serve.token_file, "not found", "write the bearer token into it, or drop --token-file")
    from servers.generate import run_server

    run_server(cfg, args.run, address=args.address)
    return 0


def add_commands(sub, common) -> None:
    p = sub.add_parser("serve", help="serve a token-LM or stage-4 run over HTTP (Ray Serve): GET /health, "
                                     "GET /v1/model, POST /v1/generate (docs/serving.md)")
    common(p)
    p.add_argument("--run", required=True, help="token-LM or stage-4 run directory or URI (config.yaml + export/)")
    p.add_argument("--host", help="bind address (default serve.host, 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="HTTP port (default serve.port, 8000)")
    p.add_argument("--replicas", type=int, help="model replicas (default serve.replicas, 1)")
    p.add_argument("--token-file", help="file with a bearer token that every request must send (default: open)")
    p.set_defaults(func=cmd_serve)
