"""`lumo serve`: a token-LM or stage-4 run over HTTP on Ray Serve (servers/generate.py)."""
from __future__ import annotations

from .common import command_config, port, positive_int


def cmd_serve(args) -> int:
    from ..errors import UserError
    from ..serve_guards import access_log_path, check_binding, open_access_log, read_token  # no torch: fast
    from ..storage import locate

    sets = list(args.set or [])
    for flag, key in (("host", "host"), ("port", "port"), ("replicas", "replicas"), ("token_file", "token_file"),
                      ("access_log", "access_log")):
        if getattr(args, flag) is not None:
            sets.append(f"serve.{key}={getattr(args, flag)}")
    if args.insecure:
        sets.append("serve.insecure=true")
    cfg = command_config(args, sets=sets)
    s = cfg.serve
    run = locate(args.run)
    if not (run / "config.yaml").exists() or not (run / "export").is_dir():
        raise UserError("token-LM run", args.run, "no config.yaml and export/ there",
                        "give a `lumo train token-lm` or `lumo train mmpt` run directory")
    # every refusal before Ray starts: a missing, unreadable or empty token file; an open bind beyond
    # loopback; an access log that cannot be written
    token = read_token(s.token_file) if s.token_file else ""
    warning = check_binding(s.host, s.port, token, s.insecure)
    if warning:
        print(warning, flush=True)
    log = access_log_path(s, args.run)
    try:
        open_access_log(log).close()
    except OSError as e:
        raise UserError("access log", log, f"cannot open it for appending ({e.strerror or e})",
                        "set serve.access_log (--access-log) to a writable file") from None
    from servers.generate import run_server

    run_server(cfg, args.run, address=args.address)
    return 0


def add_commands(sub, common) -> None:
    p = sub.add_parser("serve", help="serve a token-LM or stage-4 run over HTTP (Ray Serve): GET /health, "
                                     "GET /v1/model, POST /v1/generate, and OpenAI's /v1 routes (docs/serving.md)")
    common(p)
    p.add_argument("--run", required=True, help="token-LM or stage-4 run directory or URI (config.yaml + export/)")
    p.add_argument("--host", help="bind address (default serve.host, 127.0.0.1: this machine only; beyond it "
                                  "needs --token-file or --insecure)")
    p.add_argument("--port", type=port, help="HTTP port (default serve.port, 8000)")
    p.add_argument("--replicas", type=positive_int, help="model replicas (default serve.replicas, 1)")
    p.add_argument("--token-file", help="file with a bearer token that every request must send (default: open; "
                                        "an empty or unreadable file refuses to start)")
    p.add_argument("--insecure", action="store_true", help="serve a --host beyond loopback without a token "
                                                           "(serve.insecure)")
    p.add_argument("--access-log", help="file that gets a line per request (default serve.access_log: "
                                        "serve/access.log in the run directory)")
    p.set_defaults(func=cmd_serve)
