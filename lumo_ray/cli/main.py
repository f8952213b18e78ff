"""The `lumo` command: parse, load the config, call a library function, a pipeline or a trainer."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..config import ConfigError, dump_config
from .common import LumoParser, check_ray_address, command_config, mark, positive_int, require_input, verdict


def _common(p: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        p.add_argument("--config", help="YAML config (default: the embedded tiny preset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set uti.audio.bandwidth=3.0 (repeatable)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, a running local cluster, or a new local one)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of an error (also LUMO_DEBUG=1)")


# -- uti -----------------------------------------------------------------------------------------

def cmd_uti_build(args) -> int:
    cfg = command_config(args)  # a config error before torch is imported
    from ..uti import build_adapters, build_token_space
    adapters = build_adapters(cfg.uti)
    ts = build_token_space(cfg.uti, adapters)
    ts.save(args.out)
    dump_config(cfg, args.out)
    print(ts.table())
    print(f"wrote {Path(args.out) / 'token_space.json'}")
    return 0


def cmd_uti_audit(args) -> int:
    if args.baseline and args.baseline.lower() != "none":
        require_input("baseline", args.baseline, "give the baseline.json of an earlier `lumo uti audit "
                      "--write-baseline`, or none", folder=False)
    cfg = command_config(args)
    from ..eval.audit import run_audit
    rep = run_audit(cfg, args.out, baseline=args.baseline, write_baseline=args.write_baseline)
    for k, v in rep["checks"].items():
        print(f"  {mark(v)}  {k}")
    for k, v in rep["metrics"].items():
        print(f"  {k:18s} {v if v is None else round(v, 4)}")
    for k, r in rep["regression"].items():
        run = "missing" if r["run"] is None else f"{r['run']:.4f}"
        print(f"  regression {k}: run {run} {r['rule']} -> {mark(r['pass'])}")
    for line in rep["details"].get("non_finite", []):
        print(f"  non-finite: {line}")
    print(f"  baseline: {rep['details']['baseline']}")
    return verdict("audit", rep["pass"], Path(args.out) / "report.json")


# -- tokenizer -----------------------------------------------------------------------------------

def cmd_tokenizer_train(args) -> int:
    require_input("--input", args.input, "give a manifest.jsonl or a text file (one text per line)", folder=False)
    from ..codecs.text import train_bpe
    out = train_bpe(args.input, args.vocab_size, args.out)
    print(f"wrote tokenizer to {out}")
    return 0


# -- demo ----------------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    from .demo.run import run_demo
    return run_demo(command_config(args), Path(args.out), address=args.address, config=args.config, sets=args.set)


def build_parser() -> argparse.ArgumentParser:
    p = LumoParser(prog="lumo", description="LumoOmni discrete-token multimodal program on Ray")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (also LUMO_DEBUG=1)")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="run the program end to end on the embedded tiny default",
                       description="Every stage on the embedded tiny default (about 12 minutes on 2 CPU cores): "
                                   "token space, UTI audit, data, VLM, base LM + token LM, stage 4, generation "
                                   "gates; writes summary.json and report.html; exits 1 when any gate fails.")
    _common(d)
    d.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    d.set_defaults(func=cmd_demo)

    uti = sub.add_parser("uti", help="Unified Token Interface").add_subparsers(dest="sub", required=True)
    b = uti.add_parser("build", help="build token_space.json and print the layout")
    _common(b)
    b.add_argument("--out", required=True, help="directory for token_space.json and config.yaml")
    b.set_defaults(func=cmd_uti_build)
    a = uti.add_parser("audit", help="the UTI audit gate (exit 1 when it fails)")
    _common(a)
    a.add_argument("--out", required=True, help="report directory (report.json, report.md)")
    a.add_argument("--baseline", help="baseline.json from an earlier run to apply the regression rules to "
                   "(default: the baseline committed for this configuration; 'none' skips regression)")
    a.add_argument("--write-baseline", action="store_true", help="store this run's metrics as baseline.json")
    a.set_defaults(func=cmd_uti_audit)

    tok = sub.add_parser("tokenizer", help="text tokenizer tools").add_subparsers(dest="sub", required=True)
    t = tok.add_parser("train", help="train a byte-level BPE into a Hugging Face tokenizer directory")
    _common(t, config=False)
    t.add_argument("--input", required=True, help="manifest.jsonl or a text file (one text per line)")
    t.add_argument("--vocab-size", type=positive_int, required=True,
                   help="vocabulary size of the BPE (specials included)")
    t.add_argument("--out", required=True, help="tokenizer directory to write")
    t.set_defaults(func=cmd_tokenizer_train)

    from . import cluster, codec, data, export, gen, lm, mmpt, plan, serve, vlm
    for wing in (data, gen, serve, export, plan, cluster, codec):  # data ..., generate / gate, serve, export, status, codec
        wing.add_commands(sub, _common)
    groups = {name: sub.add_parser(name, help=h).add_subparsers(dest="sub", required=True) for name, h in
              [("train", "Ray Train jobs"), ("eval", "evaluations and ablations"), ("tune", "Ray Tune studies")]}
    for wing in (vlm, lm, mmpt):
        wing.add_commands(groups, _common)
    return p


def main(argv: list[str] | None = None) -> int:
    from ..errors import is_user_error, one_line, ray_auth_failure, unwrap

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers' per-load "Loading weights" / "Writing model shards" bars: one console event per
    # stage is ours to print (inherited by the workers of a local Ray this process starts)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # imported before main() (in-process callers): its switch was read
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    args = build_parser().parse_args(argv)
    if getattr(args, "address", None):
        os.environ["RAY_ADDRESS"] = args.address
    debug = bool(getattr(args, "debug", False)) or os.environ.get("LUMO_DEBUG", "") not in ("", "0")
    try:
        if hasattr(args, "address") and os.environ.get("RAY_ADDRESS"):
            check_ray_address(os.environ["RAY_ADDRESS"])  # a cluster's token, before Ray retries without it
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the console; the traceback on request
        if debug:
            raise
        if isinstance(e, ConfigError):
            print(f"error: config: {one_line(e)}", file=sys.stderr)
            return 2
        auth = ray_auth_failure(e)  # the fallback where the check above could not tell (Ray's own refusal)
        if auth:
            print(f"error: {auth}", file=sys.stderr)
            return 2
        if is_user_error(unwrap(e)):  # also one raised in a Ray worker (a shard a training worker refused)
            print(f"error: {one_line(unwrap(e))}", file=sys.stderr)
            return 2
        print(f"error: {type(e).__name__}: {one_line(e)} (rerun with --debug or LUMO_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1

