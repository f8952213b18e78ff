"""`lumo train/eval/tune` commands of the vlm stage."""
from __future__ import annotations

import json
from pathlib import Path

from .common import command_config, count, positive_int


def cmd_train_vlm(args) -> int:
    from trainers.vlm import train_vlm
    out = train_vlm(command_config(args), address=args.address)
    fin = out["metrics"].get("final", {})
    print(json.dumps({"run_dir": out["run_dir"], "step": fin.get("step"), "eval_loss": fin.get("eval_loss"),
                      "export": out["export"]}, indent=1))
    return 0


def export_of(run: Path) -> Path:
    """A run directory's export (or the export directory itself)."""
    if (run / "config.json").exists():
        return run
    if (run / "export" / "config.json").exists():
        return run / "export"
    from ..errors import UserError
    raise UserError("VLM run", run, "no export/ and not an export directory",
                    "give a `lumo train vlm` run directory that finished its steps, or its export/")


def cmd_eval_vlm_ablation(args) -> int:
    from ..storage import fetch_run, local_file, locate, output_dir
    run = fetch_run(args.run)  # a path, or the local cache of a URI
    export = export_of(run)
    from ..eval.vlm_ablation import ablation_from_export, ablation_table, write_ablation  # torch: after the check
    # the split the run saved: in the run directory, or beside the export directory given as --run
    split_loc = locate(args.run) / "splits.json" if export != run else locate(args.run).parent / "splits.json"
    if export != run and (run / "splits.json").exists():  # the run's copy: its data/eval.arrow is beside
        rep = ablation_from_export(export, run / "splits.json", n=args.n, seed=args.seed,
                                   allow_small_n=args.allow_small_n)
    else:
        with local_file(split_loc) as split:
            rep = ablation_from_export(export, split if split.exists() else None, n=args.n, seed=args.seed,
                                       allow_small_n=args.allow_small_n)
    with output_dir(args.out) as out:
        p = write_ablation(rep, out)
    print(ablation_table(rep))
    print(f"wrote {locate(args.out) / p.name}")
    return 0 if rep["pass"] else 1


def cmd_tune_vlm(args) -> int:
    from trainers.tune_vlm import run_sweep
    rep = run_sweep(command_config(args), address=args.address)
    print(rep["table_md"])
    print(f"best: {json.dumps(rep['best'])}\nwrote {rep['out']}")
    return 0


def add_commands(groups: dict, common) -> None:
    """groups: {'train': subparsers, 'eval': subparsers, 'tune': subparsers}; common(parser) adds --config/--set/--address."""
    t = groups["train"].add_parser("vlm", help="stage-1 VLM connector alignment (Ray Train, DDP)")
    common(t)
    t.set_defaults(func=cmd_train_vlm)
    e = groups["eval"].add_parser("vlm-ablation", help="visual-token ablation gate (exit 1 when it fails)")
    common(e, config=False)
    e.add_argument("--run", required=True, help="a `lumo train vlm` run directory or URI (or its export/)")
    e.add_argument("--out", required=True, help="report directory (path or URI)")
    e.add_argument("--n", type=positive_int, default=128, help="held-out samples (64-256; all of eval when fewer)")
    e.add_argument("--seed", type=count, default=0, help="seed of the held-out sample choice and the noise condition")
    e.add_argument("--allow-small-n", action="store_true",
                   help="run on fewer than 64 samples; the report then does not gate (exit 1)")
    e.set_defaults(func=cmd_eval_vlm_ablation)
    s = groups["tune"].add_parser("vlm", help="Ray Tune sweep: learning rate x vision LayerNorm")
    common(s)
    s.set_defaults(func=cmd_tune_vlm)
