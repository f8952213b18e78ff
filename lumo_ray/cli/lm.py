"""`lumo train/eval/tune` commands of the lm stage (base LM, token LM, ablations, prompt study)."""
from __future__ import annotations

import json

from .common import command_config, count, mark, onnx_option, positive_int, verdict, with_onnx


def run_config(run: str, config, sets):
    """The config of a run directory (path or URI; only config.yaml is read), or `config` when given, plus --set."""
    from ..config import LumoConfig, load_config
    from ..storage import local_file, locate

    if config:
        return load_config(LumoConfig, config, sets)
    f = locate(run) / "config.yaml"
    if not f.exists():
        from ..errors import UserError
        raise UserError("run", run, "no config.yaml", "give a run directory, or pass --config")
    with local_file(f) as p:
        return load_config(LumoConfig, p, sets)


def cmd_train_lm(args) -> int:
    from trainers.lm import run_lm

    cfg = command_config(args, aliases={"input": "lm.inputs", "out": "lm.out"})
    m = run_lm(cfg, address=args.address)
    return 0 if m.get("eval_loss") == m.get("eval_loss") else 1  # NaN eval loss fails


def cmd_train_token_lm(args) -> int:
    from trainers.token_lm import run_token_lm

    cfg = command_config(args, aliases={k: f"token_lm.{k}" for k in ("shards", "base", "out")})
    m = run_token_lm(cfg, address=args.address)
    return 0 if m.get("eval_loss") == m.get("eval_loss") else 1


def cmd_eval_perplexity(args) -> int:
    from ..eval.perplexity import run_perplexity

    rep = run_perplexity(args.run, args.data, split=args.split, seq_len=args.seq_len, batch_size=args.batch_size,
                         device=args.device, out=args.out)
    print(f"perplexity {rep['perplexity']:.4f} over {rep['tokens']:,} tokens ({rep['blocks']} blocks of "
          f"{rep['seq_len']}, {rep['texts']} texts; eval loss {rep['eval_loss']:.4f} nats/token)")
    print(f"wrote {args.out}" if args.out else json.dumps(rep))  # (no --out: the report on stdout)
    return 0


def cmd_modality_ablation(args) -> int:
    from ..eval.modality_ablation import run_modality_ablation
    from ..storage import locate, output_dir

    cfg = run_config(args.run, args.config, args.set)
    with output_dir(args.out) as out:
        rep = run_modality_ablation(args.run, out, cfg, shards=args.shards, onnx=args.onnx)
    for m, r in rep["modalities"].items():
        if "loss" in r:
            print(f"  {m:5s} n={rep['n'][m]:3d} correct {r['loss']['correct']:.3f}  "
                  + "  ".join(f"{k} {r[k]['gap']:+.3f} (win {r[k]['win']:.2f}, p {r[k]['p']:.1g})" for k in ("shuffle", "noise", "const"))
                  + f"  {mark(r['pass'])}")
        else:
            print(f"  {m:5s} FAIL: {r['reason']}")
    return verdict("modality ablation", rep["pass"], locate(args.out) / "report.md")


def cmd_text_invariance(args) -> int:
    from ..eval.text_invariance import run_text_invariance
    from ..storage import locate, output_dir

    cfg = run_config(args.run, args.config, args.set)
    with output_dir(args.out) as out:
        rep = run_text_invariance(args.run, args.base, out, cfg)
    print(f"  max |logit diff| {rep['max_abs_logit_diff']:.3g}; frozen params changed: "
          f"{len(rep['changed_frozen_params'])}; new-row prob mass {rep['new_row_prob_mass']['mean']:.4g}")
    return verdict("text invariance", rep["pass"], locate(args.out) / "report.md")


def cmd_fidelity(args) -> int:
    from ..eval.fidelity import run_fidelity
    from ..generate import load_run
    from ..storage import locate, output_dir

    cfg = run_config(args.run, args.config, args.set)
    fc = cfg.token_lm.fidelity
    if args.n is not None:
        fc.n = args.n
    if args.seed is not None:
        fc.seed = args.seed
    if args.guidance_scale is not None:
        from ..generate import check_guidance

        fc.guidance_scale = check_guidance(args.guidance_scale, "t2i", "--guidance-scale")
    run = with_onnx(load_run(args.run, cfg=cfg), args.onnx)
    with output_dir(args.out) as out:
        rep = run_fidelity(run, out, fc, shards=args.shards)  # prints one line per attribute
    return verdict("generation fidelity", rep["pass"], locate(args.out) / "report.md")


def cmd_tune_prompts(args) -> int:
    from trainers.tune_prompts import run_prompt_study

    cfg = command_config(args, aliases={"out": "token_lm.prompt_study.out"})
    res = run_prompt_study(cfg, address=args.address)
    return 0 if res["pass"] else 1


def add_commands(groups: dict, common) -> None:
    """groups: {'train': subparsers, 'eval': subparsers, 'tune': subparsers}; common(parser) adds --config/--set/--address."""
    p = groups["train"].add_parser("lm", help="stage 0: pretrain a Qwen3-architecture causal LM on text (Ray Train)")
    common(p)
    p.add_argument("--input", action="append", help="manifest.jsonl or text file (repeatable; default lm.inputs)")
    p.add_argument("--out", help="run directory, path or URI (default lm.out)")
    p.set_defaults(func=cmd_train_lm)

    p = groups["train"].add_parser("token-lm", help="stage 3.3: warm-start a token LM on the shards (Ray Train)")
    common(p)
    p.add_argument("--shards", help="tokenized shard directory (default token_lm.shards)")
    p.add_argument("--base", help="base causal LM: HF dir or URI of one, hub id or 'tiny' (default token_lm.base)")
    p.add_argument("--out", help="run directory, path or URI (default token_lm.out)")
    p.set_defaults(func=cmd_train_token_lm)

    p = groups["eval"].add_parser("perplexity", help="held-out text perplexity of a base-LM run (`lumo train lm`), "
                                  "the number its training reports as eval perplexity")
    p.add_argument("--run", required=True, help="base-LM run directory or URI (config.yaml + export/)")
    p.add_argument("--data", required=True, help="text file (one text per line) or manifest.jsonl, path or URI")
    p.add_argument("--split", choices=["all", "eval"], default="all",
                   help="all: every text of --data (default); eval: those the run's lm.eval_fraction holds out, "
                        "as its training did")
    p.add_argument("--seq-len", type=positive_int, default=None, help="tokens per packed block (default the run's lm.seq_len)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="blocks per forward pass")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--out", help="JSON report file, path or URI (default: the JSON is printed)")
    p.set_defaults(func=cmd_eval_perplexity)

    p = groups["eval"].add_parser("modality-ablation", help="modality ablation of a token-LM run: caption loss with "
                                  "correct vs shuffled vs noise media (exit 1 when it fails)")
    common(p)
    p.add_argument("--run", required=True, help="token-LM run directory or URI (holds config.yaml and export/)")
    p.add_argument("--out", required=True, help="report directory (path or URI)")
    p.add_argument("--shards", help="shard directory (default: the run's token_lm.shards)")
    onnx_option(p)
    p.set_defaults(func=cmd_modality_ablation)

    p = groups["eval"].add_parser("text-invariance", help="text invariance of a new_rows token-LM run: its text logits "
                                  "equal the base LM's (exit 1 when not)")
    common(p)
    p.add_argument("--run", required=True, help="token-LM run directory or URI")
    p.add_argument("--base", required=True, help="the base LM it warm-started from (HF dir or URI of one, hub id or 'tiny')")
    p.add_argument("--out", required=True, help="report directory (path or URI)")
    p.set_defaults(func=cmd_text_invariance)

    p = groups["eval"].add_parser("fidelity", help="generation fidelity (t2i, t2a): an attribute probe reads "
                                  "generated codes")
    common(p)
    p.add_argument("--run", required=True, help="token-LM run directory or URI (holds config.yaml and export/)")
    p.add_argument("--out", required=True, help="report directory (path or URI)")
    p.add_argument("--shards", help="shard directory (default: the run's token_lm.shards)")
    p.add_argument("--n", type=positive_int, default=None, help="eval captions per modality (default token_lm.fidelity.n)")
    p.add_argument("--seed", type=count, default=None, help="default token_lm.fidelity.seed")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance of the generations, "
                   "in [1, 20] (default token_lm.fidelity.guidance_scale, 1: none)")
    onnx_option(p)
    p.set_defaults(func=cmd_fidelity)

    p = groups["tune"].add_parser("prompts", help="Ray Tune study of prompts/delimiters/new-row LR/init/crop/dropout")
    common(p)
    p.add_argument("--out", help="study directory, path or URI (default token_lm.prompt_study.out)")
    p.set_defaults(func=cmd_tune_prompts)
