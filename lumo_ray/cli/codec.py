"""`lumo codec train-vq`: train the tiny VQ image codec on Ray Train (section `codec` of the config);
`lumo codec train-audio`: fit the tiny EnCodec audio preset on Ray Train (section `codec_audio`);
`lumo codec train-clip`: train the tiny CLIP preset (trainers/codec_clip.py; one process, one thread);
`lumo codec fit-kmeans`: a k-means codebook over CLIP embeddings, in this process when they fit
`codec_kmeans.in_process_max_bytes`, else on Ray Data (pipelines/kmeans.py)."""
from __future__ import annotations

import sys
import time

from .common import command_config, count, positive_float, positive_int


def _train(args, run, section: str) -> int:
    sets = list(args.set or [])
    if args.out:
        sets.append(f"{section}.out={args.out}")
    cfg = command_config(args, sets=sets)
    t0 = time.time()
    try:
        run(cfg, args.address)
    except (ValueError, FileNotFoundError) as e:
        print(f"[codec] {e}", file=sys.stderr)
        return 2
    print(f"[codec] wall time {time.time() - t0:.0f}s")
    return 0


def cmd_codec_train_vq(args) -> int:
    from trainers.codec_vq import run_codec_vq

    return _train(args, run_codec_vq, "codec")


def cmd_codec_train_audio(args) -> int:
    from trainers.codec_audio import run_codec_audio

    return _train(args, run_codec_audio, "codec_audio")


def cmd_codec_train_clip(args) -> int:
    from trainers.codec_clip import train_preset

    meta = train_preset(args.out, args.seed, args.steps, args.batch, args.lr)
    nd = meta["near_duplicates"]["trained"]
    print(f"[train-clip] near-duplicate recall at {nd['threshold']}: resize {nd['resize_recall']}, "
          f"jpeg {nd['jpeg_recall']}, shift {nd['shift_recall']}; distinct pairs above: "
          f"{nd['distinct_pairs_above']} -> {args.out} ({meta['train_seconds']:.0f} s)")
    return 0


def cmd_codec_fit_kmeans(args) -> int:
    from pipelines.kmeans import fit_kmeans

    cfg = command_config(args)
    fit_kmeans(args.embeddings, args.k, args.out, seed=args.seed, column=args.column, max_iter=args.max_iter,
               n_init=args.n_init, address=args.address, in_process_max_bytes=cfg.codec_kmeans.in_process_max_bytes)
    return 0


def add_commands(sub, common) -> None:
    """sub: the top-level subparsers; common(parser, config=True) adds --config/--set/--address."""
    g = sub.add_parser("codec", help="codec training: the tiny VQ codec, the tiny audio codec, k-means codebooks"
                       ).add_subparsers(dest="sub", required=True)
    t = g.add_parser("train-vq", help="train the tiny VQ image codec (uti.image model 'tiny') on Ray Train; "
                                      "writes model.safetensors + metrics.json (synthetic / real PSNR, SSIM)")
    common(t)
    t.add_argument("--out", default=None, help="run directory (default: codec.out)")
    t.set_defaults(func=cmd_codec_train_vq)

    a = g.add_parser("train-audio", help="fit the tiny EnCodec audio preset (uti.audio model 'tiny-24k', seed 0) on "
                                         "Ray Train: writes model.safetensors + metrics.json (waveform-probe "
                                         "accuracy, SNR, log-mel L1); the shipped preset: "
                                         "lumo_ray/codecs/assets/encodec_tiny24k")
    common(a)
    a.add_argument("--out", default=None, help="run directory (default: codec_audio.out)")
    a.set_defaults(func=cmd_codec_train_audio)

    c = g.add_parser("train-clip", help="train the tiny CLIP preset (data.embed.model 'tiny') on synthetic images: "
                                        "writes model.safetensors + meta.json (near-duplicate recall)")
    c.add_argument("--out", required=True, help="folder for the weights (the shipped preset: "
                                                "lumo_ray/codecs/assets/clip_tiny)")
    c.add_argument("--seed", type=count, default=0, help="seed of the init and of the drawn images")
    c.add_argument("--steps", type=positive_int, default=3000)
    c.add_argument("--batch", type=positive_int, default=128, help="images per step (half of them captioned scenes)")
    c.add_argument("--lr", type=positive_float, default=2e-3)
    c.set_defaults(func=cmd_codec_train_clip)

    k = g.add_parser("fit-kmeans", help="a k-means codebook over `lumo data embed` embeddings (Lloyd in this "
                                        "process when they fit codec_kmeans.in_process_max_bytes, else passes on "
                                        "Ray Data); writes codebook.npy + codebook.json (its sha256)")
    common(k)
    k.add_argument("--embeddings", required=True, help="an embeddings folder (index.json) from `lumo data embed`")
    k.add_argument("--k", type=positive_int, required=True, help="codewords")
    k.add_argument("--out", required=True, help="folder for codebook.npy and codebook.json")
    k.add_argument("--seed", type=count, default=0, help="seed of the k-means++ initialisation")
    k.add_argument("--n-init", type=positive_int, default=1, help="fits from seeds seed..seed+N-1; the lowest inertia is kept")
    k.add_argument("--max-iter", type=positive_int, default=50, help="most Lloyd iterations per fit")
    k.add_argument("--column", default="image", choices=["image", "text", "patches"],
                   help="which embeddings (patches: the per-patch image embeddings, when embedded)")
    k.set_defaults(func=cmd_codec_fit_kmeans)
