"""`lumo data ...` commands: synth and dedup (library), normalize / tokenize / embed / verify (Ray Data jobs in pipelines/)."""
from __future__ import annotations

import json
import os
import sys
from shlex import quote as q

from .common import command_config, count, mark, positive_int, require_input, verdict

SOURCES = ["llava_pretrain", "audiocaps", "clotho", "wavcaps", "jsonl"]


# Where the next command's output goes: a folder beside this command's --out (the README's quick start).
SYNTH_NORMALIZED = {"llava_pretrain": "images", "audiocaps": "audio"}


def _sibling(path, name: str) -> str:
    """`name` in the folder that holds `path`, spelt as the user spelt `path` (relative stays relative;
    an object-store URI keeps its query)."""
    path = str(path)
    head, sep, query = path.partition("?")
    parent = os.path.dirname(head.rstrip("/"))
    return (f"{parent}/{name}" if parent else name) + (sep + query)


def _join(path, name: str) -> str:
    head, sep, query = str(path).partition("?")
    return f"{head.rstrip('/')}/{name}{sep}{query}"


def _next(*commands: str) -> None:
    """The last line of a command that leads to another: the next one, with the paths this one used."""
    print("next: " + " && ".join(commands))


def cmd_synth(args) -> int:
    from ..data.synth import write_synth
    info = write_synth(args.out, args.images, args.audio, args.seed)
    print(f"[synth] wrote {args.images} images and {args.audio} clips to {args.out}")
    for k, v in info.items():
        if isinstance(v, (str, int, float)):
            print(f"  {k}: {v}")
    made = [src for src, n in (("audiocaps", args.audio), ("llava_pretrain", args.images)) if n]
    if made:
        _next(*(f"lumo data normalize --source {src} --input {q(os.path.join(args.out, src))} "
                f"--out {q(_sibling(args.out, SYNTH_NORMALIZED[src]))}" for src in made))
    return 0


def cmd_normalize(args) -> int:
    from lumo_ray.data.normalize import NormalizeError, read_and_dedupe
    from lumo_ray.storage import locate
    cfg = command_config(args).data.normalize
    if args.source == "jsonl" and locate(args.input).is_file():  # a README or a JSON list is no JSONL of records
        from lumo_ray.data.manifest import check_manifest
        check_manifest(args.input, "jsonl input", "give a JSONL file of manifest records (one JSON object a line)")
    read = read_and_dedupe(args.source, args.input)  # a bad input fails here, before Ray is even imported
    from pipelines.normalize import run_normalize
    try:
        s = run_normalize(args.source, args.input, args.out, cfg, args.address, read=read)
    except NormalizeError as e:
        print(f"[normalize] FAILED: {e}", file=sys.stderr)
        return 1
    print(f"[normalize] {s.get('ok', '?')} records, {s.get('errors', '?')} errors -> {args.out}")
    print("  (several datasets make one shard set: give each one's manifest.jsonl to one tokenize)")
    _next(f"lumo data tokenize --manifest {q(_join(args.out, 'manifest.jsonl'))} --out {q(_sibling(args.out, 'shards'))}")
    return 0


def require_shards(path) -> None:
    """The folder of a finished `lumo data tokenize` that holds samples (index.json is written last)."""
    from ..errors import UserError
    from ..storage import locate

    todo = "give the --out folder of a finished `lumo data tokenize`"
    require_input("shards", path, todo, folder=True)
    index = locate(path) / "index.json"
    if not index.exists():
        raise UserError("shards", path, "no index.json: not a finished tokenize output", todo)
    try:
        samples = json.loads(index.read_text())["totals"]["samples"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError("shards", index, f"unreadable index.json ({type(e).__name__}: {e})", todo) from None
    if not samples:
        raise UserError("shards", path, "hold no samples", "tokenize a manifest that has samples")


def cmd_tokenize(args) -> int:
    from ..data.manifest import check_manifest
    from ..data.manifest_merge import MERGED, merge_manifests
    from ..tokenize_request import tokenize_request

    for m in args.manifest:
        check_manifest(m)  # before Ray is imported
    cfg = command_config(args)  # a config error before Ray starts too
    manifest = args.manifest[0]
    tokenize_request(cfg, manifest, args.actors)  # refused before a merge is written or torch / Ray imported
    if len(args.manifest) > 1:  # ids checked unique before anything is written; then one manifest, --out's
        from ..storage import locate
        manifest = merge_manifests(args.manifest, locate(args.out) / MERGED)
        print(f"[tokenize] merged {len(args.manifest)} manifests, in the order given, into {manifest}")
    from pipelines.tokenize import run_tokenize
    try:
        run_tokenize(manifest, cfg, args.out, actors=args.actors, address=args.address)
    except RuntimeError as e:
        print(f"[tokenize] FAILED: {e}", file=sys.stderr)
        return 1
    _next(f"lumo data verify --shards {q(args.out)} --out {q(_sibling(args.out, 'verify'))}")
    return 0


def cmd_embed(args) -> int:
    from ..data.manifest import check_manifest
    check_manifest(args.manifest)  # before Ray is imported
    cfg = command_config(args)
    from pipelines.embed import run_embed
    run_embed(args.manifest, cfg, args.out, actors=args.actors, address=args.address)
    return 0


def cmd_dedup(args) -> int:
    from ..data.manifest import check_manifest
    check_manifest(args.manifest)
    require_input("embeddings", args.embeddings, "give the --out folder of `lumo data embed` on this manifest",
                  folder=True)
    from ..embed.dedup import run_dedup
    run_dedup(args.embeddings, args.manifest, args.out, args.threshold, args.min_clip_score)
    return 0


def cmd_verify(args) -> int:
    from ..data.manifest import check_manifest
    require_shards(args.shards)  # the inputs before anything is written to --out
    if args.manifest:
        check_manifest(args.manifest)
    if args.baseline:
        require_input("baseline", args.baseline,
                      "give the baseline.json of an earlier `lumo data verify --write-baseline`", folder=False)
    cfg = command_config(args)
    from pipelines.verify import run_verify
    rep = run_verify(args.shards, cfg, args.out, manifest=args.manifest, baseline=args.baseline,
                     write_baseline=args.write_baseline, address=args.address)
    for k, v in rep["checks"].items():
        print(f"  {mark(v['pass'])}  {k}: {v.get('summary', '')}")
    from ..storage import locate
    code = verdict("verify", rep["pass"], locate(args.out) / "report.json")
    if rep["pass"]:
        _next(f"lumo train token-lm --shards {q(args.shards)} --out {q(_sibling(args.shards, 'token_lm'))}")
    return code


def add_commands(sub, common) -> None:
    data = sub.add_parser("data", help="datasets: synth, normalize, tokenize, embed, dedup, verify").add_subparsers(dest="sub", required=True)

    s = data.add_parser("synth", help="write a learnable synthetic dataset in the raw formats")
    common(s, config=False)
    s.add_argument("--out", required=True, help="dataset folder to write (llava_pretrain/ and audiocaps/ layouts)")
    s.add_argument("--images", type=count, default=64, help="synthetic images (coloured shapes)")
    s.add_argument("--audio", type=count, default=64, help="synthetic clips (beep patterns)")
    s.add_argument("--seed", type=count, default=0, help="seed of the images and clips (same seed, same bytes)")
    s.set_defaults(func=cmd_synth)

    n = data.add_parser("normalize", help="raw dataset -> manifest.jsonl, errors.jsonl, summary.json (Ray Data)")
    common(n)
    n.add_argument("--source", required=True, choices=SOURCES, help="the raw dataset's format")
    n.add_argument("--input", required=True, help="the dataset folder or its metadata file")
    n.add_argument("--out", required=True, help="output folder: manifest.jsonl, errors.jsonl, summary.json")
    n.set_defaults(func=cmd_normalize)

    t = data.add_parser("tokenize", help="manifests -> deterministic WebDataset shards (Ray Data actor pool)")
    common(t)
    t.add_argument("--manifest", required=True, nargs="+", metavar="MANIFEST",
                   help="manifest.jsonl, a path or an object-store URI (s3://, gs://); several (e.g. the images' "
                        "and the audio's `normalize` outputs) make one shard set: their record ids must be "
                        "unique, and they are merged in the order given into <out>/manifest.jsonl (A's lines, "
                        "then B's), which `lumo data verify` reads back from <out>/source.json; shards take "
                        "each split's records in id order, so the order changes no shard")
    t.add_argument("--out", required=True, help="shard directory: a path or an object-store URI (s3://, gs://)")
    t.add_argument("--actors", type=positive_int, default=None, help="tokenizer actors (default: data.tokenize.actors)")
    t.set_defaults(func=cmd_tokenize)

    e = data.add_parser("embed", help="CLIP image and caption embeddings of a manifest -> Parquet parts (Ray Data)")
    common(e)
    e.add_argument("--manifest", required=True, help="manifest.jsonl: a path or an object-store URI (s3://, gs://)")
    e.add_argument("--out", required=True, help="embeddings folder: a path or an object-store URI (s3://, gs://)")
    e.add_argument("--actors", type=positive_int, default=None, help="embedding actors (default: data.embed.actors)")
    e.set_defaults(func=cmd_embed)

    dd = data.add_parser("dedup", help="drop exact and near-duplicate images (CLIP cosine) and, optionally, "
                                       "pairs whose caption disagrees with the image; writes a filtered manifest")
    common(dd, config=False)
    dd.add_argument("--embeddings", required=True, help="the `lumo data embed` folder of this manifest")
    dd.add_argument("--manifest", required=True, help="manifest.jsonl to filter")
    dd.add_argument("--out", required=True, help="folder: manifest.jsonl, duplicates.jsonl, errors.jsonl, summary.json")
    dd.add_argument("--threshold", type=float, default=0.95, help="image cosine at or above which two records are "
                    "near-duplicates (on mean-centred embeddings; > 1 turns near-duplicate removal off)")
    dd.add_argument("--min-clip-score", type=float, default=None,
                    help="drop records whose caption-image cosine is below this (meaningful with real CLIP weights)")
    dd.set_defaults(func=cmd_dedup)

    v = data.add_parser("verify", help="the data verify gate over every record (exit 1 when it fails)")
    common(v)
    v.add_argument("--shards", required=True, help="shard directory: a path or an object-store URI")
    v.add_argument("--manifest", help="the manifest the shards were tokenized from, for re-tokenize consistency "
                                      "from the raw files (default: the one <shards>/source.json names: the "
                                      "--manifest of tokenize, or <shards>/manifest.jsonl when it merged several)")
    v.add_argument("--out", required=True, help="report directory: a path or an object-store URI")
    v.add_argument("--baseline", help="a baseline.json from an earlier verify: check drift")
    v.add_argument("--write-baseline", action="store_true", help="store this run's statistics as baseline.json")
    v.set_defaults(func=cmd_verify)
