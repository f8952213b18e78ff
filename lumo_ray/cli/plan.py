"""`lumo plan`: the memory planner (lumo_ray/plan.py) over a token-LM config, or the reference table."""
from __future__ import annotations

from .common import command_config, positive_float, positive_int

REF = dict(base="qwen3-8b", vocab=164_032, gpus=8, gpu_mem=80.0, micro_batch=1, seq=4096, target=1024)


def _size(b: float) -> str:
    return f"{b / 1e9:.1f} GB" if b >= 1e9 else f"{b / 1e6:.1f} MB"


def _table(shape, freeze_modes, world: int, micro: int, seq: int, target: int, ckpt_modes, gpu_mem: float,
           lora_r: int, act_bytes: int, lora_targets: tuple = ()) -> list[str]:
    from ..plan import GB, LORA_TARGETS, STRATEGIES, estimate, fits

    lora_targets = lora_targets or LORA_TARGETS

    rows = ["| freeze | strategy | checkpointing | trainable | weights | grads | AdamW | activations | loss head | "
            "peak / GPU | fits |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in freeze_modes:
        for st in STRATEGIES:
            for c in ckpt_modes:
                e = estimate(shape, freeze=f, strategy=st, world=world, micro_batch=micro, seq=seq, target_tokens=target,
                             checkpointing=c, lora_r=lora_r, act_bytes=act_bytes, lora_targets=lora_targets)
                rows.append(f"| {f} | {st} | {'on' if c else 'off'} | {e.trainable:,} | " + " | ".join(
                    _size(x) for x in (e.weights, e.gradients, e.optimizer, e.activations, e.loss_head, e.peak))
                    + f" | {'yes' if fits(e, gpu_mem * GB) else 'NO'} |")
    return rows


def longest_target(cfg) -> int:
    """The longest target span a token-LM sequence of this config can have, with its end token: an
    audio crop (token_lm.seq.max_audio_tokens), an image's tokens, or a caption (up to 128 tokens)."""
    from ..uti import load_token_space

    ts = load_token_space(cfg.uti)
    spans = [128]
    if ts.num_codebooks:
        spans.append(cfg.token_lm.seq.max_audio_tokens)
    if ts.has_image:
        spans.append(int(ts.adapters["image"]["tokens_per_image"]))
    return max(spans) + 1


def cmd_plan(args) -> int:
    from ..plan import shape_of

    if args.reference:
        r = REF
        shape = shape_of(r["base"], r["vocab"])
        print(f"# Reference: Qwen3-8B token LM (vocab {r['vocab']:,}), {r['gpus']} x {r['gpu_mem']:.0f} GB, micro-batch "
              f"{r['micro_batch']} x {r['seq']} tokens, {r['target']} target positions, bf16 autocast (2-byte "
              f"activations, fp32 weights and AdamW); fsdp rows: train.strategy fsdp")
        print("\n".join(_table(shape, ("new_rows", "lora", "full"), r["gpus"], r["micro_batch"], r["seq"], r["target"],
                               (False, True), r["gpu_mem"], 8, 2)))
        return 0
    cfg = command_config(args)
    c, t = cfg.token_lm, cfg.token_lm.train
    vocab = args.vocab
    if vocab is None:
        from ..uti import load_token_space

        vocab = load_token_space(cfg.uti).padded_size
    world = args.gpus or t.num_workers
    micro = max(1, t.global_batch // (world * t.grad_accum))
    seq = c.seq.max_len
    target = args.target_tokens or min(seq, longest_target(cfg))
    shape = shape_of(c.base, vocab)
    act_bytes = 2 if (t.bf16 and t.use_gpu) else 4  # bf16 autocast on GPUs; fp32 on CPU
    print(f"# {c.base} token LM, vocab {vocab:,}, freeze {c.freeze}, {world} x {args.gpu_mem:.0f} GB, micro-batch "
          f"{micro} x {seq} tokens ({target} target positions), {act_bytes}-byte activations; activation "
          f"checkpointing {'on' if t.activation_checkpointing else 'off'} in the config; strategy {t.strategy} in the config")
    print("\n".join(_table(shape, (c.freeze,), world, micro, seq, target, (t.activation_checkpointing,),
                           args.gpu_mem, c.lora.r, act_bytes, tuple(c.lora.target_modules))))
    if args.hours:
        tokens = t.steps * t.global_batch * seq
        print(f"{t.steps} steps x {t.global_batch} x {seq} tokens = {tokens:,} tokens: {tokens / (args.hours * 3600):,.0f} "
              f"tokens/s overall ({tokens / (args.hours * 3600 * world):,.0f} per GPU) to finish in {args.hours} h")
    return 0


def add_commands(sub, common) -> None:
    p = sub.add_parser("plan", help="per-GPU memory of a token-LM training config before launch (fits / does not fit)")
    common(p)
    p.add_argument("--gpus", type=positive_int, default=None, help="GPUs (default token_lm.train.num_workers)")
    p.add_argument("--gpu-mem", type=positive_float, default=80.0, help="GB per GPU")
    p.add_argument("--vocab", type=positive_int, default=None, help="vocabulary rows (default: the config's token space)")
    p.add_argument("--target-tokens", type=positive_int, default=None, help="positions the loss reads per sequence "
                   "(default: the longest target span of the config: audio crop, image tokens or 128 caption tokens)")
    p.add_argument("--hours", type=positive_float, default=None, help="target wall time: print the tokens/s it needs")
    p.add_argument("--reference", action="store_true", help="the reference program's table: Qwen3-8B token LM on 8 x 80 GB")
    p.set_defaults(func=cmd_plan)
