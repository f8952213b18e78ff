"""`lumo export`: a token-LM or stage-4 run as a Hugging Face directory or ONNX (lumo_ray/export.py)."""
from __future__ import annotations

from .common import command_config


def cmd_export(args) -> int:
    from ..errors import UserError
    from ..storage import is_uri, locate

    command_config(args)  # --set keys are checked like every command's
    run = locate(args.run)
    if not (run / "config.yaml").exists() or not (run / "export" / "token_space.json").exists():
        raise UserError("token-LM run", args.run, "no config.yaml and export/token_space.json there",
                        "give a `lumo train token-lm` or `lumo train mmpt` run directory")
    if args.quantize and args.format != "onnx":
        raise UserError("--quantize", args.quantize, "applies to --format onnx only", "add --format onnx")
    if is_uri(args.out):
        raise UserError("--out", args.out, "an object-store URI", "export to a path, then upload the folder")
    from ..export import export_run

    rep = export_run(args.run, args.format, args.out, args.quantize)
    line = f"[export] {args.format} -> {args.out}: max |logit difference| {rep['max_abs_logit_diff']:.2e} on {rep['prompts']} golden prompts"
    if "int8" in rep:
        q = rep["int8"]
        line += (f"; int8: {q['size_ratio']:.2f}x the size, {q['latency_ratio']:.2f}x the latency, max |logit "
                 f"difference| {q['max_abs_logit_diff']:.3f}, argmax agreement {q['argmax_agreement']:.3f}")
        ev = rep.get("eval_loss", {})
        line += (f"; eval loss {ev['pytorch']:.4f}, int8 {ev['int8']:.4f} ({ev['int8_delta']:+.4f})" if "int8" in ev
                 else f"; eval loss: {ev.get('skipped', 'not measured')}")
    print(line)
    return 0


def add_commands(sub, common) -> None:
    p = sub.add_parser("export", help="export a token-LM / stage-4 run: a Hugging Face directory or ONNX (+ int8)")
    common(p)
    p.add_argument("--run", required=True, help="token-LM or stage-4 run directory or URI")
    p.add_argument("--format", required=True, choices=["hf", "onnx"], help="hf: from_pretrained directory; onnx: model.onnx")
    p.add_argument("--quantize", choices=["int8"], help="with --format onnx: also model.int8.onnx (dynamic int8)")
    p.add_argument("--out", required=True, help="output directory (a path)")
    p.set_defaults(func=cmd_export)
