"""`lumo train mmpt` and `lumo tune mmpt`: stage 4 (any-to-any) commands."""
from __future__ import annotations


def mmpt_config(args, aliases: dict[str, str]):
    """The config with stage 4's defaults under the file and --set (trainers.mmpt.MMPT_DEFAULTS), the
    command's flags over them (aliases of --set keys)."""
    from trainers.mmpt import MMPT_DEFAULTS

    from .common import command_config

    return command_config(args, MMPT_DEFAULTS, aliases={**aliases, "init": "token_lm.mmpt.init"})


def cmd_train_mmpt(args) -> int:
    from trainers.mmpt import run_mmpt

    cfg = mmpt_config(args, {k: f"token_lm.{k}" for k in ("shards", "base", "out")})
    m = run_mmpt(cfg, address=args.address)
    return 0 if m.get("eval_loss") == m.get("eval_loss") else 1


def cmd_tune_mmpt(args) -> int:
    from trainers.tune_mmpt import run_mmpt_study

    cfg = mmpt_config(args, {"out": "token_lm.mmpt.study.out"})
    res = run_mmpt_study(cfg, address=args.address)
    return 0 if res["pass"] else 1


def add_commands(groups: dict, common) -> None:
    p = groups["train"].add_parser("mmpt", help="stage 4: any-to-any training on i2t/a2t/t2i/t2a (Ray Train)")
    common(p)
    p.add_argument("--init", help="stage-3.3 token-LM run (or its export/) to start from (default token_lm.mmpt.init)")
    p.add_argument("--shards", help="tokenized shard directory (default token_lm.shards)")
    p.add_argument("--base", help="base causal LM when no --init: HF dir or URI, hub id or 'tiny' (default token_lm.base)")
    p.add_argument("--out", help="run directory, path or URI (default token_lm.out; runs/mmpt under this command)")
    p.set_defaults(func=cmd_train_mmpt)

    p = groups["tune"].add_parser("mmpt", help="Ray Tune study of the stage-4 task mix, ramp, LoRA rank, new-row and LoRA LR")
    common(p)
    p.add_argument("--init", help="stage-3.3 token-LM run every trial starts from (default token_lm.mmpt.init)")
    p.add_argument("--out", help="study directory, path or URI (default token_lm.mmpt.study.out)")
    p.set_defaults(func=cmd_tune_mmpt)
