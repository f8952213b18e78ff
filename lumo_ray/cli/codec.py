"""`lumo codec train-vq`: train the tiny VQ image codec on Ray Train (section `codec` of the config)."""
from __future__ import annotations

import sys
import time

from .common import command_config


def cmd_codec_train_vq(args) -> int:
    from trainers.codec_vq import run_codec_vq

    sets = list(args.set or [])
    if args.out:
        sets.append(f"codec.out={args.out}")
    cfg = command_config(args, sets=sets)
    t0 = time.time()
    try:
        run_codec_vq(cfg, args.address)
    except ValueError as e:
        print(f"[codec] {e}", file=sys.stderr)
        return 2
    print(f"[codec] wall time {time.time() - t0:.0f}s")
    return 0


def add_commands(sub, common) -> None:
    """sub: the top-level subparsers; common(parser, config=True) adds --config/--set/--address."""
    g = sub.add_parser("codec", help="codec training").add_subparsers(dest="sub", required=True)
    t = g.add_parser("train-vq", help="train the tiny VQ image codec (uti.image model 'tiny') on Ray Train; "
                                      "writes model.safetensors + metrics.json (synthetic / real PSNR, SSIM)")
    common(t)
    t.add_argument("--out", default=None, help="run directory (default: codec.out)")
    t.set_defaults(func=cmd_codec_train_vq)
