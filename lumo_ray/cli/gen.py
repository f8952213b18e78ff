"""`lumo generate` (stage 3.4; t2t also on a base-LM run) and `lumo gate decode|prompts`."""
from __future__ import annotations

import sys

from .common import count, fraction, onnx_option, positive_int, verdict, with_onnx


def _run(args):
    from ..generate import load_run
    from .lm import run_config

    cfg, source = None, ""
    if getattr(args, "config", None) or getattr(args, "set", None):
        cfg = run_config(args.run, args.config, args.set)
        source = " + ".join([f"--config {args.config}" if args.config else "the run's config.yaml"]
                            + [f"--set {s}" for s in args.set or []])
    return load_run(args.run, cfg=cfg, cfg_source=source)  # a URI run is downloaded once (export/, config.yaml)


def _opts(args, cfg=None):
    """Generation options of the flags; the guidance scale from --guidance-scale, else (t2i / t2a) the
    config's generate.guidance_scale (gates without the flag: 1)."""
    from ..errors import UserError
    from ..generate import GenOptions, check_guidance

    if not args.temperature > 0:  # (NaN too)
        raise UserError("--temperature", None, f"must be > 0, got {args.temperature}", "use --greedy for argmax decoding")
    flag = getattr(args, "guidance_scale", None)
    task = args.task if isinstance(getattr(args, "task", None), str) else "t2i"
    if flag is not None:
        scale = check_guidance(flag, task, "--guidance-scale")
    elif cfg is not None and task in ("t2i", "t2a"):
        scale = check_guidance(cfg.generate.guidance_scale, task, "generate.guidance_scale")
    else:
        scale = 1.0
    return GenOptions(seed=args.seed, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      greedy=args.greedy, constrained=not args.no_constraint, audio_frames=args.audio_frames,
                      max_text_tokens=args.max_text_tokens, guidance_scale=scale,
                      stop=list(getattr(args, "stop", None) or []))


def cmd_generate(args) -> int:
    if args.manifest:
        return _generate_manifest(args)
    if (args.prompt is None) == (args.input is None):
        print("give exactly one of --prompt TEXT (t2i, t2a, t2t), --input FILE (i2t, a2t) or --manifest M", file=sys.stderr)
        return 2
    from ..errors import UserError
    from ..storage import locate, output_dir

    texted = args.task in ("t2i", "t2a", "t2t")  # a text prompt; i2t / a2t take input media
    if texted != (args.prompt is not None):
        raise UserError("--task", args.task, f"takes {'--prompt TEXT' if texted else '--input FILE'}",
                        f"give that instead of {'--input' if texted else '--prompt'}")
    if texted and not args.prompt.strip():
        raise UserError("--prompt", None, "empty", "give the caption" if args.task != "t2t" else "give the text to continue")
    if args.stop and args.task != "t2t":
        raise UserError("--stop", None, f"stop strings end t2t text, not {args.task}", "drop --stop")
    if args.input is not None:  # a bad input fails in a second, before the model loads
        from ..codecs.base import MediaError
        from ..data.probe import probe_audio, probe_image

        media = "image" if args.task == "i2t" else "audio"
        try:
            (probe_image if media == "image" else probe_audio)(args.input)
        except MediaError as e:
            raise UserError(f"--input of {args.task}", args.input, e.reason, f"give a readable {media} file") from None
    from ..generate import generate  # torch and the model: after the input checks

    _opts(args)  # a bad --guidance-scale fails before the model loads
    run = _run(args)
    opts = _opts(args, run.cfg)  # (and a bad generate.guidance_scale before anything is written)
    with output_dir(args.out) as out:
        recs = generate(run, args.task, out, prompt=args.prompt, input_path=args.input, n=args.n, opts=opts)
    ok = sum(r["ok"] for r in recs)
    print(f"{ok}/{len(recs)} compliant; wrote {locate(args.out) / 'generations.jsonl'}")
    return 0 if ok == len(recs) else 1


def _generate_manifest(args) -> int:
    """Every record of a manifest the task can take, on a Ray Data actor pool (pipelines/batch_generate.py)."""
    from ..errors import UserError
    from ..storage import is_uri

    if args.prompt is not None or args.input is not None:
        print("--manifest generates from each record: drop --prompt / --input", file=sys.stderr)
        return 2
    if args.task == "t2t":
        raise UserError("--manifest", args.manifest, "batch generation covers t2i / t2a / i2t / a2t",
                        "generate t2t with --prompt TEXT")
    for what, p in (("--manifest", args.manifest), ("--out", args.out)):
        if is_uri(p):
            raise UserError(what, p, "an object-store URI", "give a local or shared-FS path (batch generation "
                                                           "writes its parts in place)")
    from pathlib import Path

    if not Path(args.manifest).is_file():
        raise UserError("--manifest", args.manifest, "not found", "give a manifest.jsonl of `lumo data normalize`")
    from pipelines.batch_generate import run_batch_generate

    from .lm import run_config
    cfg = run_config(args.run, args.config, args.set)  # its generate: section sizes the actors
    s = run_batch_generate(args.manifest, args.run, args.task, args.out, _opts(args, cfg), n=args.n, actors=args.actors,
                           unit_size=args.unit_size, address=args.address, cfg=cfg)
    return 0 if s["errors"] == 0 and s["compliant"] == s["samples"] else 1


def cmd_gate_decode(args) -> int:
    from ..eval.gates import run_decode_gate
    from ..storage import locate, output_dir

    opts = _opts(args)  # a bad --temperature fails before the model loads and anything is written
    with output_dir(args.out) as out:
        rep = run_decode_gate(with_onnx(_run(args), args.onnx), out, n=args.n, opts=opts, tasks=args.task or None)
    if not rep["token_space"]["match"]:
        print(f"  token space mismatch: export {rep['token_space']['export']} vs config {rep['token_space']['config']}")
    return verdict("decode compliance", rep["pass"], locate(args.out) / "report.json")


def cmd_gate_prompts(args) -> int:
    from ..eval.gates import run_prompt_gate
    from ..storage import locate, output_dir

    run = with_onnx(_run(args), args.onnx)
    with output_dir(args.out) as out:
        rep = run_prompt_gate(run, out, n=args.n, shards=args.shards, seed=args.seed)
    return verdict("prompt ablation", rep["pass"], locate(args.out) / "report.json")


def _sampling(p) -> None:
    p.add_argument("--seed", type=count, default=0, help="sampling seed (the same seed gives the same tokens)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of sampling")
    p.add_argument("--top-k", type=count, default=0, help="keep the k most likely ids (0: no top-k filter)")
    p.add_argument("--top-p", type=fraction, default=1.0, help="nucleus sampling mass, in (0, 1] (1.0: off)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    p.add_argument("--no-constraint", action="store_true", help="turn constrained decoding off (to measure it)")
    p.add_argument("--audio-frames", type=positive_int, default=None,
                   help="generated audio code frames (default: codec clip length capped by token_lm.seq.max_audio_tokens)")
    p.add_argument("--max-text-tokens", "--max-new-tokens", dest="max_text_tokens", type=positive_int, default=48,
                   help="cap of a generated caption's tokens (i2t, a2t; with its end token) or of t2t's new tokens")


def add_commands(sub, common) -> None:
    """sub: the top-level subparsers; common(parser) adds --config/--set/--address."""
    g = sub.add_parser("generate", help="generate from a token-LM run (constrained decoding; media to PNG/WAV)")
    common(g)
    g.add_argument("--run", required=True, help="token-LM run directory or URI (config.yaml + export/); for t2t "
                                                "also a base-LM run (`lumo train lm`)")
    g.add_argument("--task", required=True, choices=["t2i", "t2a", "i2t", "a2t", "t2t"],
                   help="direction: text to image / audio, or back; t2t: continue a text (the text part of a "
                        "token LM's vocabulary, or a base LM)")
    g.add_argument("--prompt", help="caption text (t2i, t2a); the text to continue (t2t)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="t2t: end a sample when its text holds TEXT, cut off with what follows (repeatable)")
    g.add_argument("--input", help="image or audio file (i2t, a2t)")
    g.add_argument("--manifest", help="generate for every record of this manifest.jsonl the task can take (its "
                                      "caption, or its image / audio) on a Ray Data actor pool: results.jsonl, "
                                      "media/, errors.jsonl, summary.json; resumable")
    g.add_argument("--actors", type=positive_int, default=None, help="with --manifest: generator actors, each loads the run "
                                                            "(default generate.actors; CPUs / GPUs: generate.*)")
    g.add_argument("--unit-size", type=positive_int, default=None, help="with --manifest: records per unit of work, a re-run "
                                                                "keeps finished units (default generate.unit_size)")
    g.add_argument("--out", required=True, help="output directory (path or URI): generations.jsonl, PNG / WAV files")
    g.add_argument("--n", type=positive_int, default=1, help="samples")
    _sampling(g)
    g.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance of t2i / t2a, in [1, 20]: logits = uncond + s x (cond - uncond) "
                        "(the unconditional prompt has no caption); 1 = none (default generate.guidance_scale, 1)")
    g.set_defaults(func=cmd_generate)

    gate = sub.add_parser("gate", help="generation gates (exit 1 when they fail)").add_subparsers(dest="sub", required=True)
    d = gate.add_parser("decode", help="decode compliance on a golden set of prompts per task")
    common(d)
    d.add_argument("--run", required=True, help="token-LM run directory or URI")
    d.add_argument("--out", required=True, help="report directory (path or URI)")
    d.add_argument("--n", type=positive_int, default=64, help="golden prompts per task")
    d.add_argument("--task", action="append", choices=["t2i", "t2a", "i2t", "a2t"], help="restrict to tasks (repeatable)")
    _sampling(d)
    onnx_option(d)
    d.set_defaults(func=cmd_gate_decode)

    p = gate.add_parser("prompts", help="prompt ablation: target-span loss, true vs swapped vs empty prompt (t2i, t2a)")
    common(p)
    p.add_argument("--run", required=True, help="token-LM run directory or URI")
    p.add_argument("--out", required=True, help="report directory (path or URI)")
    p.add_argument("--n", type=positive_int, default=256, help="eval samples per task (all when fewer)")
    p.add_argument("--shards", default=None, help="shard directory (default: token_lm.shards of the run config)")
    p.add_argument("--seed", type=count, default=0, help="seed of the eval-sample choice and the swapped pairs")
    onnx_option(p)
    p.set_defaults(func=cmd_gate_prompts)
