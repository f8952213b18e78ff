"""`lumo generate` and `lumo gate decode|prompts` (stage 3.4)."""
from __future__ import annotations

import sys


def _run(args):
    from .cli_lm import run_config
    from .generate import load_run

    cfg = None
    if getattr(args, "config", None) or getattr(args, "set", None):
        cfg = run_config(args.run, args.config, args.set)
    return load_run(args.run, cfg=cfg)  # a URI run is downloaded once (export/, config.yaml)


def _opts(args):
    from .generate import GenOptions

    return GenOptions(seed=args.seed, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      greedy=args.greedy, constrained=not args.no_constraint, audio_frames=args.audio_frames,
                      max_text_tokens=args.max_text_tokens)


def cmd_generate(args) -> int:
    from .generate import generate

    if (args.prompt is None) == (args.input is None):
        print("give exactly one of --prompt TEXT (t2i, t2a) or --input FILE (i2t, a2t)", file=sys.stderr)
        return 2
    from .storage import locate, output_dir

    with output_dir(args.out) as out:
        recs = generate(_run(args), args.task, out, prompt=args.prompt, input_path=args.input, n=args.n,
                        opts=_opts(args))
    ok = sum(r["ok"] for r in recs)
    print(f"{ok}/{len(recs)} compliant; wrote {locate(args.out) / 'generations.jsonl'}")
    return 0 if ok == len(recs) else 1


def cmd_gate_decode(args) -> int:
    from .eval.gates import run_decode_gate
    from .storage import locate, output_dir

    with output_dir(args.out) as out:
        rep = run_decode_gate(_run(args), out, n=args.n, opts=_opts(args), tasks=args.task or None)
    if not rep["token_space"]["match"]:
        print(f"  token space mismatch: export {rep['token_space']['export']} vs config {rep['token_space']['config']}")
    print(f"decode compliance {'PASS' if rep['pass'] else 'FAIL'}: {locate(args.out) / 'report.json'}")
    return 0 if rep["pass"] else 1


def cmd_gate_prompts(args) -> int:
    from .eval.gates import run_prompt_gate
    from .storage import locate, output_dir

    run = _run(args)
    with output_dir(args.out) as out:
        rep = run_prompt_gate(run, out, n=args.n, shards=args.shards, seed=args.seed)
    print(f"prompt ablation {'PASS' if rep['pass'] else 'FAIL'}: {locate(args.out) / 'report.json'}")
    return 0 if rep["pass"] else 1


def _sampling(p) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    p.add_argument("--no-constraint", action="store_true", help="turn constrained decoding off (to measure it)")
    p.add_argument("--audio-frames", type=int, default=None,
                   help="generated audio code frames (default: codec clip length capped by token_lm.seq.max_audio_tokens)")
    p.add_argument("--max-text-tokens", type=int, default=48)


def add_commands(sub, common) -> None:
    """sub: the top-level subparsers; common(parser) adds --config/--set/--address."""
    g = sub.add_parser("generate", help="generate from a token-LM run (constrained decoding; media to PNG/WAV)")
    common(g)
    g.add_argument("--run", required=True, help="token-LM run directory or URI (config.yaml + export/)")
    g.add_argument("--task", required=True, choices=["t2i", "t2a", "i2t", "a2t"])
    g.add_argument("--prompt", help="caption text (t2i, t2a)")
    g.add_argument("--input", help="image or audio file (i2t, a2t)")
    g.add_argument("--out", required=True)
    g.add_argument("--n", type=int, default=1, help="samples")
    _sampling(g)
    g.set_defaults(func=cmd_generate)

    gate = sub.add_parser("gate", help="generation gates (exit 1 when they fail)").add_subparsers(dest="sub", required=True)
    d = gate.add_parser("decode", help="decode compliance on a golden set of prompts per task")
    common(d)
    d.add_argument("--run", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--n", type=int, default=64, help="golden prompts per task")
    d.add_argument("--task", action="append", choices=["t2i", "t2a", "i2t", "a2t"], help="restrict to tasks (repeatable)")
    _sampling(d)
    d.set_defaults(func=cmd_gate_decode)

    p = gate.add_parser("prompts", help="prompt ablation: target-span loss, true vs swapped vs empty prompt (t2i, t2a)")
    common(p)
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=256, help="eval samples per task (all when fewer)")
    p.add_argument("--shards", default=None, help="shard directory (default: token_lm.shards of the run config)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_gate_prompts)
