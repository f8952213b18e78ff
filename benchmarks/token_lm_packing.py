"""Packed vs right-padded token-LM training steps: the share of computed positions that are padding and
the useful (non-pad) input tokens per second, side by side.

    python -m benchmarks.token_lm_packing [--demo-steps 20] [--steps 4] [--repeats 3] [--threads 1]
        [--audio 1200,3000] [--out DIR]

Both columns run the trainer's own step (trainers.token_lm.Stepper: forward, backward, clipping,
AdamW) on the same sequences in the same order; only token_lm.seq.pack differs, so the losses agree
(the max difference is printed). The two modes alternate `repeats` times and their step times add up.

(a) the demo's mix: the demo's synthetic shards (48 images, 48 clips, the demo's data settings and
token-LM config: pack_len 0, rows no wider than the longest sequence), the tiny preset under new_rows,
micro-batch 16 (global_batch 16, one worker).
(b) the reference program's lengths: 32-token images, 10-30-token captions and audio of `--audio`
tokens (1,200: the 3,000-token clip as configs/reference crops it, max_len 2,048; 3,000: uncropped,
max_len 4,096), i2t, a2t, t2i and t2a equally likely (stage 4's default mix), sequences made directly
(random ids of the right ranges, the builder's full layouts), pack_len = max_len so images and captions
share rows with audio; the tiny preset with 4,096 positions, micro-batch 8.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


class ListSource:
    """A fixed list of sequences served in order, as TrainSequences serves a rank's stream."""

    def __init__(self, seqs):
        self.seqs, self.i = seqs, 0

    def next(self, step: int, j: int):
        s = self.seqs[self.i % len(self.seqs)]
        self.i += 1
        return s


def reference_sequences(ts, n: int, n_audio: int, seed: int = 0) -> list:
    """Sequences with the reference program's lengths in the builder's full layouts (random ids)."""
    from lumo_ray.data.sequences import IGNORE, Sequence, noise_like

    rng = np.random.default_rng(seed)
    sp = {k: ts.special_id(k) for k in ts.specials}
    out = []
    for i in range(n):
        task = ("i2t", "a2t", "t2i", "t2a")[int(rng.integers(0, 4))]
        mod = "image" if task[0] == "i" or task[-1] == "i" else "audio"
        media = noise_like(ts, mod, 32 if mod == "image" else n_audio, rng)
        cap = rng.integers(0, ts.text_vocab, int(rng.integers(10, 31)))
        start, end, gen = (sp[k] for k in (("<|img_start|>", "<|img_end|>", "<|gen_img|>") if mod == "image" else
                                           ("<|aud_start|>", "<|aud_end|>", "<|gen_aud|>")))
        if task.endswith("2t"):
            head = [start, *media, end, sp["<|gen_text|>"], sp["<|text_start|>"]]
            tail = [*cap, sp["<|text_end|>"]]
        else:
            head = [sp["<|text_start|>"], *cap, sp["<|text_end|>"], gen, start]
            tail = [*media, end]
        ids = np.array(head + tail, np.int64)
        labels = np.concatenate([np.full(len(head), IGNORE, np.int64), np.array(tail, np.int64)])
        out.append(Sequence(ids, labels, task, f"ref{i}"))
    return out


def run(mode: bool, cfg, ts, model_fn, source_fn, steps: int) -> dict:
    """One warm-up step, then `steps` timed steps of the trainer's Stepper; counters of the timed ones."""
    from lumo_ray.data.sequences import SequenceBuilder
    from trainers.loop import make_scheduler
    from trainers.lm import micro_batch
    from trainers.token_lm import Stepper, param_groups

    c, t = cfg.token_lm, cfg.token_lm.train
    c.seq.pack = mode
    model = model_fn().train()
    groups, vocab = param_groups(model, c, t)
    opt = torch.optim.AdamW(groups)
    sched = make_scheduler(opt, t)
    st = Stepper(model, groups, vocab, source_fn(), SequenceBuilder(ts, c.seq), c, t, ts, micro_batch(t, 1), False)
    losses = [st(0, opt, sched)]
    tokens, positions = st.tokens, st.positions
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        losses.append(st(step, opt, sched))
    return {"secs": time.perf_counter() - t0, "tokens": st.tokens - tokens, "positions": st.positions - positions,
            "losses": losses}


def compare(name: str, cfg, ts, model_fn, source_fn, steps: int, repeats: int) -> list[str]:
    tot = {m: {"secs": 0.0, "tokens": 0, "positions": 0} for m in (False, True)}
    losses = {}
    for _ in range(repeats):
        for m in (False, True):
            r = run(m, cfg, ts, model_fn, source_fn, steps)
            losses[m] = r.pop("losses")
            for k, v in r.items():
                tot[m][k] += v
    pad = {m: 1 - tot[m]["tokens"] / tot[m]["positions"] for m in tot}
    rate = {m: tot[m]["tokens"] / tot[m]["secs"] for m in tot}
    dloss = max(abs(a - b) for a, b in zip(losses[False], losses[True]))
    per = tot[True]["tokens"] // (repeats * steps)
    return [f"| {name}: pad fraction | {pad[False]:.1%} | {pad[True]:.1%} | |",
            f"| {name}: computed positions / step | {tot[False]['positions'] // (repeats * steps):,} | "
            f"{tot[True]['positions'] // (repeats * steps):,} | real tokens / step {per:,} |",
            f"| {name}: useful tokens/s | {rate[False]:,.0f} | {rate[True]:,.0f} | {rate[True] / rate[False]:.2f}x |",
            f"| {name}: step time | {tot[False]['secs'] / (repeats * steps):.2f} s | "
            f"{tot[True]['secs'] / (repeats * steps):.2f} s | max loss difference {dloss:.1e} |"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-steps", type=int, default=20, help="timed steps per run on the demo mix (after a warm-up step)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per run on the reference lengths")
    ap.add_argument("--repeats", type=int, default=3, help="padded / packed runs alternated this many times")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the trainer's default: 1 per worker)")
    ap.add_argument("--out", default=None, help="folder for the demo's shards (kept: a second run reuses them)")
    ap.add_argument("--audio", default="1200,3000", help="audio tokens per clip in (b), comma-separated ('': skip b)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from pipelines.synth_shards import build_synth_shards
    from lumo_ray.config import LumoConfig, load_config
    from lumo_ray.data.sequences import SequenceBuilder
    from lumo_ray.models.base_lm import build_base_lm
    from lumo_ray.models.token_lm import apply_freeze, extend_vocab, warm_start
    from lumo_ray.uti import load_token_space
    from trainers.token_lm import TrainSequences

    root = Path(a.out or tempfile.mkdtemp(prefix="lumo-packing-"))
    quiet = dict(log=lambda *x, **k: None)
    shards, _, cfg = build_synth_shards(root / "demo", **quiet)  # the demo's 48 + 48 samples and settings
    cfg.token_lm.shards = str(shards)
    ts = load_token_space(cfg.uti)
    c = cfg.token_lm
    rows = [f"# token-LM steps padded vs packed; {platform.machine()}, {os.cpu_count()} CPUs, {a.threads} torch "
            f"thread(s), torch {torch.__version__}; {a.demo_steps} (demo) / {a.steps} (reference) timed steps x "
            f"{a.repeats} repeats per mode",
            "| measure | padded | packed | |", "|---|---|---|---|"]
    rows += compare("demo mix (tiny, micro-batch 16, pack_len 0)", cfg, ts,
                    lambda: warm_start(c.base, ts, c.freeze, c.init_scale, 0, c.lora, **quiet).model,
                    lambda: TrainSequences(c, 0, SequenceBuilder(ts, c.seq), ts, 0, 1), a.demo_steps, a.repeats)
    def ref_model():
        m = build_base_lm("tiny", ts.text_vocab, seed=0, overrides={"max_position_embeddings": 4096})
        return apply_freeze(extend_vocab(m, ts, 0.02, 0), "new_rows", ts.text_vocab)
    for n_audio in [int(x) for x in a.audio.split(",") if x]:
        max_len = 2048 if n_audio <= 2000 else 4096
        ref = load_config(LumoConfig, None, ["token_lm.train.global_batch=8", f"token_lm.seq.max_len={max_len}",
                                             f"token_lm.seq.pack_len={max_len}"])
        seqs = reference_sequences(ts, 8 * (a.steps + 1), n_audio)
        rows += compare(f"reference, {n_audio}-token audio (tiny, micro-batch 8, pack_len {max_len})", ref, ts,
                        ref_model, lambda: ListSource(seqs), a.steps, a.repeats)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
