"""Generation from a token-LM run (stage 3.4): prompts per task, constrained sampling, span checks,
media decoding to PNG / WAV and text to files. t2t (text from text) also runs on a base-LM run
(`lumo train lm`), by the loop of lumo_ray.generate_text.

A run directory holds `config.yaml` (its `uti` section rebuilds the adapters that decode media) and
`export/` (a Hugging Face causal-LM directory with `token_space.json`). Prompts are cut from the
training layout of lumo_ray.data.sequences, so generation sees exactly what training saw before the
target span.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .codecs.base import AudioCodes
from .config import LumoConfig, load_config
from .data.sequences import IGNORE, MEDIA, SequenceBuilder, crop_audio
from .errors import UserError
from .models.constrained import SpanConstraint, SpanSpec, span_spec
from .runtime import torch_threads
from .storage import write_file
from .token_space import TokenSpace, TokenSpaceError, TokenSpaceMismatch, first_difference

TASKS = ("t2i", "t2a", "i2t", "a2t", "t2t")
TARGET = {"t2i": "image", "t2a": "audio", "i2t": "text", "a2t": "text", "t2t": "text"}
GUIDANCE_MAX = 20.0
"""Largest classifier-free guidance scale accepted (LlamaGen, Emu3 and Janus use 3-7.5)."""


@dataclass
class GenOptions:
    seed: int = 0
    temperature: float = 1.0
    top_k: int = 0
    """0: no top-k filter."""
    top_p: float = 1.0
    greedy: bool = False
    constrained: bool = True
    """False: plain sampling (the end token still stops a row), to measure what the constraint prevents."""
    audio_frames: Optional[int] = None
    """Generated audio code frames; default: the codec's clip length, capped by token_lm.seq.max_audio_tokens."""
    max_text_tokens: int = 48
    """New text tokens at most: an i2t / a2t caption (with its end token), a t2t continuation."""
    stop: list[str] = field(default_factory=list)
    """t2t: stop strings; a row ends once its text holds one, which is cut off with what follows (OpenAI's
    `stop`). (A list: options read back from JSON compare equal.)"""
    batch_size: int = 64
    threads: int = 1
    """torch intra-op threads while generating: one thread is much faster for small models on a busy CPU,
    and a fixed count keeps sampling bit-reproducible (float rounding depends on it)."""
    guidance_scale: float = 1.0
    """Classifier-free guidance (t2i / t2a): logits = uncond + s x (cond - uncond), from the caption prompt
    and the unconditional one (empty caption, what token_lm.seq.caption_dropout trains), each with its own
    KV cache in one batch, before the constraint and sampling. 1 (default): no guidance, the plain path,
    byte for byte. In [1, GUIDANCE_MAX]: below 1 would pull generations away from their caption."""


@dataclass
class Run:
    dir: Path
    cfg: LumoConfig
    model: Any
    ts: Optional[TokenSpace]
    """The export's token space (what the model was trained on)."""
    adapters: Any
    builder: SequenceBuilder
    hash_match: bool
    """The export's token-space hash equals the one the run config's adapters build."""
    config_hash: str
    name: str
    """Where the run is (its path or URI; `dir` is the local copy it was loaded from)."""
    config_source: str = "the run's config.yaml"
    """Where the adapters' config came from (the run's config.yaml, --config, --set items)."""
    differs_at: Optional[str] = None
    """The first token-space field that differs when hash_match is False."""
    kind: str = "token-lm"
    """'token-lm' (export/ holds token_space.json) or 'base-lm' (a `lumo train lm` run: t2t only; its
    `adapters` hold just the export's tokenizer, `ts` and `builder` are None)."""


def load_run(run_dir: str | Path, device: Optional[str] = None, cfg: Optional[LumoConfig] = None,
             cfg_source: str = "") -> Run:
    """Load export/ (model + token space) and the adapters of config.yaml, on `device` (default
    uti.runtime.device). A token-space mismatch is recorded in `hash_match` (the gate reports it;
    `require_same_space` refuses it). A base-LM run (`lumo train lm`) loads as kind 'base-lm', for t2t."""
    from .generate_text import is_base_lm, load_base_lm
    from .models.token_lm import load_token_lm
    from .storage import fetch_run, locate
    from .uti import Adapters, build_adapters, build_token_space

    d = fetch_run(run_dir)  # a path, or the local cache of a URI
    if cfg is None:
        if not (d / "config.yaml").exists():
            raise UserError("token-LM run", run_dir, "no config.yaml", "give a `lumo train token-lm` or "
                            "`lumo train mmpt` run directory (config.yaml + export/), or for t2t a `lumo train lm` one")
        cfg = load_config(LumoConfig, d / "config.yaml")
    if device is not None:  # told (a Ray unit's assigned device): the adapters run there too
        cfg = copy.deepcopy(cfg)
        cfg.uti.runtime.device = str(device)  # (runtime settings are never part of an identity)
    if is_base_lm(d):  # its model and tokenizer are all there is: t2t
        model, text = load_base_lm(d / "export", cfg.uti.runtime.device)
        return Run(d, cfg, model, None, Adapters(text=text), None, True, "", str(locate(run_dir)),
                   cfg_source or "the run's config.yaml", kind="base-lm")
    model, ts, _ = load_token_lm(d / "export")
    model = model.to(cfg.uti.runtime.device).eval()
    adapters = build_adapters(cfg.uti)
    built = build_token_space(cfg.uti, adapters)
    encode = adapters.text.encode if adapters.text is not None else None
    builder = SequenceBuilder(ts, cfg.token_lm.seq, encode)
    differs = first_difference(ts.identity(), built.identity()) if built.hash != ts.hash else None
    return Run(d, cfg, model, ts, adapters, builder, built.hash == ts.hash, built.hash, str(locate(run_dir)),
               cfg_source or "the run's config.yaml", differs)


def require_same_space(run: Run) -> None:
    if not run.hash_match:
        raise TokenSpaceMismatch(
            f"token space ({run.name}): the model's hash {run.ts.hash[:12]} (export/token_space.json) differs from "
            f"{run.config_hash[:12]}, which {run.config_source} builds (first differing field: {run.differs_at}): "
            f"its adapters cannot decode this model; " + (
                "the adapters changed since the run was trained: use the lumo_ray version that trained it, or retrain"
                if run.config_source == "the run's config.yaml" else
                "drop the override, or decode with the run's own config.yaml"))


# -- span specs ---------------------------------------------------------------------------------

def audio_frames(run: Run, opts: GenOptions) -> int:
    """Code frames of a generated clip: a valid codec length within the sequence budget."""
    if opts.audio_frames:
        return int(opts.audio_frames)
    a, k = run.adapters.audio, run.ts.num_codebooks
    budget = max(1, run.cfg.token_lm.seq.max_audio_tokens // k)
    clip = a.max_frames
    while clip > 1 and a.code_frames(clip) > budget:
        clip -= 1
    return a.code_frames(clip)


def task_spec(run: Run, task: str, opts: GenOptions) -> SpanSpec:
    sp = run.builder.sp
    compact = run.cfg.token_lm.seq.delimiters == "compact"
    if task == "t2i":
        run.ts.require_image_decoder("t2i")
        return span_spec(run.ts, "image", run.adapters.image.tokens_per_image, sp["<|img_start|>"])
    if task == "t2a":
        return span_spec(run.ts, "audio", audio_frames(run, opts) * run.ts.num_codebooks, sp["<|aud_start|>"])
    if task in ("i2t", "a2t"):
        start = (sp["<|img_end|>"] if task == "i2t" else sp["<|aud_end|>"]) if compact else sp["<|text_start|>"]
        eos = getattr(run.adapters.text, "eos_id", None)
        return span_spec(run.ts, "text", opts.max_text_tokens, start, () if eos is None else (eos,))
    raise ValueError(f"unknown task {task!r}: one of {TASKS}")


# -- prompts ------------------------------------------------------------------------------------

def build_prompt(run: Run, task: str, *, caption: Optional[str] = None, media_ids: Optional[np.ndarray] = None,
                 sid: str = "prompt", uncond: bool = False) -> np.ndarray:
    """The training layout up to (and including) the target span's opening token. uncond (t2i / t2a): the
    unconditional prompt of classifier-free guidance, no caption between the same delimiters."""
    b = run.builder
    if task in ("t2i", "t2a"):
        if not caption and not uncond:
            raise ValueError(f"{task} needs a non-empty caption prompt")
        text = np.zeros(1, np.int64) if uncond else np.asarray(run.adapters.text.encode(caption), np.int64)
        sample = {"json": {"id": sid, "task": task}, "text": text}
        seq = b.build(sample, task=task, media_override=np.zeros(1, np.int64) + b.sp["<|pad_mm|>"], drop_caption=uncond)
    elif task in ("i2t", "a2t"):
        if media_ids is None or len(media_ids) == 0:
            raise ValueError(f"{task} needs input media ids")
        m = np.asarray(media_ids, np.int64)
        if task == "a2t":
            m = crop_audio(m, run.ts.num_codebooks, run.cfg.token_lm.seq.max_audio_tokens, None)
        bad = run.ts.check_ids(m, MEDIA[task])
        if bad:
            raise TokenSpaceError(f"{sid}: input id {int(m[bad[0]])} at {bad[0]} is not a valid {MEDIA[task]} id")
        sample = {"json": {"id": sid, "task": task}, "text": np.zeros(1, np.int64)}
        seq = b.build(sample, task=task, media_override=m)
    else:
        raise ValueError(f"unknown task {task!r}: one of {TASKS}")
    first = int(np.nonzero(seq.labels != IGNORE)[0][0])
    return seq.input_ids[:first]


def media_file_ids(run: Run, task: str, path: str | Path) -> np.ndarray:
    """Encode an image (i2t) or audio file (a2t) with the run's adapters -> global ids."""
    if task == "i2t":
        codes = run.adapters.image.encode_batch([run.adapters.image.load(str(path))])[0]
        return run.ts.image_to_global(codes)
    if task == "a2t":
        codes = run.adapters.audio.encode_batch([run.adapters.audio.load(str(path))])[0]
        return run.ts.audio_to_global(codes.codes)
    raise ValueError(f"--input is for i2t / a2t, not {task}")


# -- generation ---------------------------------------------------------------------------------

def row_seed(seed: int, row: int) -> int:
    """The sampling seed of row `row` of a call seeded `seed` (SeedSequence: well mixed, fixed across
    numpy versions)."""
    return int(np.random.SeedSequence([int(seed), int(row)]).generate_state(1, np.uint64)[0] >> 1)


class RowSampler:
    """The last logits processor of sampled generation: temperature, top-k and top-p, then one draw per
    row from that row's own generator; the scores it returns are -inf but at the drawn id, so greedy
    selection takes it. A row's tokens so depend on its seed, prompt and options, not on the rows it is
    batched with (up to the float rounding of batched matmuls)."""

    def __init__(self, seeds: list[int], opts: GenOptions):
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.gens = [torch.Generator().manual_seed(s) for s in seeds]
        self.warpers = [TemperatureLogitsWarper(opts.temperature)]
        if opts.top_k:
            self.warpers.append(TopKLogitsWarper(int(opts.top_k)))
        if opts.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(opts.top_p))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for w in self.warpers:
            scores = w(input_ids, scores)
        probs = torch.softmax(scores.float(), -1).cpu()
        picks = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.gens)])
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(picks)), picks.to(scores.device)] = 0.0
        return out


def check_guidance(scale: Any, task: str, name: str = "guidance_scale") -> float:
    """The guidance scale as a float, or a UserError (a ValueError) naming `name` (the flag, config key or
    request field it came from) and saying what it takes."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
            or not 1.0 <= scale <= GUIDANCE_MAX:
        raise UserError(name, None, f"must be a number in [1, {GUIDANCE_MAX:g}] (1: no guidance), got {scale!r}")
    if scale != 1.0 and task not in ("t2i", "t2a"):
        raise UserError(name, None, f"guidance applies to t2i / t2a (guided by their caption), not {task}; "
                                    f"got {scale:g}", "leave it at 1")
    return float(scale)


def generate_spans(run: Run, task: str, prompts: list[np.ndarray], opts: GenOptions,
                   seeds: Optional[list[int]] = None, on_token=None) -> list[np.ndarray]:
    """Generated ids after each prompt (the span and its end token, pads stripped). Row i samples from
    its own generator, seeded `seeds[i]` (default row_seed(opts.seed, i)): its tokens do not depend on
    batch_size or on the other prompts, up to float rounding (bit-identical for one call's arguments).
    opts.guidance_scale != 1 (t2i / t2a): classifier-free guidance (guided_generate); 1 never enters it.
    on_token(i, id) (plain path, for a server that streams): called as row i's next token is chosen, up to
    its end token; it changes nothing that is generated."""
    from transformers import LogitsProcessorList

    scale = check_guidance(opts.guidance_scale, task)
    if task == "t2t":
        return generate_text_ids(run, prompts, opts, seeds, on_token)
    spec = task_spec(run, task, opts)
    pad = run.builder.pad_id
    seeds = [row_seed(opts.seed, i) for i in range(len(prompts))] if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    for i, p in enumerate(prompts):
        if p[-1] != spec.start_id:
            raise ValueError(f"prompt {i} of {task} does not end with the span's opening token {spec.start_id}")
    dev = model_device(run.model)
    vocab = model_vocab(run.model)
    uncond = build_prompt(run, task, uncond=True) if scale != 1.0 else None
    out: list[np.ndarray] = []
    for b0 in range(0, len(prompts), opts.batch_size):
        batch = prompts[b0: b0 + opts.batch_size]
        n = max(len(p) for p in list(batch) + ([] if uncond is None else [uncond]))  # (guided: its rows too)
        ids = torch.full((len(batch), n), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, p in enumerate(batch):  # left padding: every row's next token sits at column n
            ids[i, n - len(p):] = torch.as_tensor(p)
            mask[i, n - len(p):] = 1
        procs = [SpanConstraint(run.ts, spec, n, pad, vocab, enabled=opts.constrained)]
        if not opts.greedy:
            procs.append(RowSampler(seeds[b0: b0 + len(batch)], opts))
        with torch.no_grad(), torch_threads(opts.threads):  # greedy selection: the sampler already chose
            if uncond is not None:
                seqs = guided_generate(run.model, batch, uncond, scale, LogitsProcessorList(procs),
                                       spec.max_new_tokens, spec.terminators, pad, dev)
            else:
                seqs = run.model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                                          max_new_tokens=spec.max_new_tokens, eos_token_id=spec.terminators,
                                          pad_token_id=pad, logits_processor=LogitsProcessorList(procs),
                                          streamer=on_token and _row_streamer(on_token, b0, spec.terminators))
        for row in seqs[:, n:].cpu().numpy():
            out.append(_strip(row, spec.terminators, pad))
    return out


def guided_generate(model, prompts: list[np.ndarray], uncond: np.ndarray, scale: float, procs, max_new_tokens: int,
                    terminators: list[int], pad: int, dev) -> torch.Tensor:
    """Classifier-free guidance, transformers' greedy search by hand: the conditional prompts and as many
    copies of the unconditional one go through the model as one left-padded batch of 2B rows (a KV cache
    row each; positions count real tokens, as `generate` sets them); per step the B rows' scores are
    uncond + scale x (cond - uncond) on the float32 logits, then `procs` (the span constraint, the row
    sampler) and argmax; both halves of a row are fed the chosen token, a finished row gets pads, and it
    stops when every row has ended or after max_new_tokens. Returns [B, n + generated] like `generate`
    (n = the widest prompt), the conditional rows."""
    if not hasattr(model, "get_output_embeddings"):
        raise ValueError("guidance_scale needs the PyTorch model (a KV cache per row), not an ONNX export")
    rows = list(prompts) + [uncond] * len(prompts)
    b, n = len(prompts), max(len(p) for p in rows)
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, p in enumerate(rows):
        ids[i, n - len(p):] = torch.as_tensor(p)
        mask[i, n - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    seqs = ids[:b]
    stops = torch.as_tensor(list(terminators), device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    for step in range(max_new_tokens):
        logits = out.logits[:, -1, :].float()
        cond, unc = logits[:b], logits[b:]
        scores = procs(seqs, unc + scale * (cond - unc))
        nxt = torch.where(done, torch.full_like(done, pad, dtype=torch.long), scores.argmax(-1))
        seqs = torch.cat([seqs, nxt[:, None]], 1)
        done = done | torch.isin(nxt, stops)
        if bool(done.all()) or step + 1 == max_new_tokens:
            break
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], 1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=torch.cat([nxt, nxt])[:, None], attention_mask=mask, position_ids=pos,
                    cache=out.cache, use_cache=True)
    return seqs


def _row_streamer(on_token, first: int, terminators):
    """transformers' streamer (put / end) for a batch: on_token(first + i, id) for row i's new token; the
    prompt (the first put) and the pads after a row's end token are not passed on."""
    from transformers.generation.streamers import BaseStreamer

    class RowStreamer(BaseStreamer):
        def __init__(self):
            self.prompt_seen, self.done = False, set()

        def put(self, value):
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            for i, t in enumerate(value.reshape(-1).tolist()):
                if i not in self.done:
                    on_token(first + i, t)
                    if t in terminators:
                        self.done.add(i)

        def end(self):
            pass

    return RowStreamer()


def model_device(model) -> torch.device:
    return getattr(model, "device", None) or next(model.parameters()).device


def model_vocab(model) -> int:
    """Columns of the model's scores (the padded embedding size)."""
    emb = getattr(model, "get_output_embeddings", None)
    return int(emb().weight.shape[0]) if emb is not None else int(model.config.vocab_size)


def _strip(row: np.ndarray, terminators: list[int], pad: int) -> np.ndarray:
    """Keep up to and including the first terminator (end or stop token); without one, drop trailing pads."""
    hit = np.nonzero(np.isin(row, terminators))[0]
    if hit.size:
        return row[: hit[0] + 1].astype(np.int64)
    k = len(row)
    while k and row[k - 1] == pad:
        k -= 1
    return row[:k].astype(np.int64)


# -- checks and decoding ------------------------------------------------------------------------

@dataclass
class SpanCheck:
    well_formed: bool
    """Prompt ends with the opening token, the span is closed by the end token (not by a stop token
    such as the text EOS, not left open), nothing after it, no stray specials."""
    length: int
    exact_length: bool
    """Media: exactly the spec's length; text: 1..max-1 tokens (a text span at the cap was cut by it)."""
    out_of_range: int
    """Ids of the span outside the modality's ids."""
    phase_errors: int
    """Audio: positions not in codebook p mod K (0 for other modalities)."""
    decoded: bool = False
    error: str = ""

    @property
    def ok(self) -> bool:
        return (self.well_formed and self.exact_length and self.out_of_range == 0
                and self.phase_errors == 0 and self.decoded)


def check_span(ts: TokenSpace, spec: SpanSpec, prompt_last: int, gen: np.ndarray) -> tuple[SpanCheck, np.ndarray]:
    """Check one generated span (ids after the prompt). Returns the check and the span body."""
    g = np.asarray(gen, np.int64)
    hit = np.nonzero(np.isin(g, spec.terminators))[0]
    ended = bool(hit.size)
    closed = ended and int(g[hit[0]]) == spec.end_id  # ended by a stop token (text EOS): not closed
    body = g[: hit[0]] if ended else g
    trailing = g[hit[0] + 1:] if ended else g[:0]
    mod = spec.modality
    if mod == "audio":
        a0, a1 = ts.audio_ranges[0].start, ts.audio_ranges[-1].stop
        oor = int(((body < a0) | (body >= a1)).sum())
        phase = len(ts.audio_phase_errors(body))
    else:
        oor, phase = len(ts.check_ids(body, mod)), 0
    specials = ts.range("SPECIAL")
    stray = int(((body >= specials.start) & (body < specials.stop)).sum())
    well = bool(prompt_last == spec.start_id and closed and body.size > 0 and stray == 0 and trailing.size == 0)
    exact = body.size == spec.length if mod != "text" else 1 <= body.size < spec.length
    why = []
    if ended and not closed:
        why.append(f"ended by stop token {int(g[hit[0]])}, not the end token {spec.end_id}")
    elif not ended:
        why.append("no end token")
    if mod == "text" and body.size >= spec.length:
        why.append(f"ran to the {spec.length}-token cap")
    return SpanCheck(well, int(body.size), bool(exact), oor, phase, error="; ".join(why)), body


def decode_span(run: Run, modality: str, body: np.ndarray, seed: int = 0) -> Any:
    """Media / text from a span body; raises on anything that is not decodable."""
    if modality == "image":
        codes = run.ts.global_to_image(body)
        return run.adapters.image.decode(codes, seed=seed)
    if modality == "audio":
        codes = run.ts.global_to_audio(body)
        return run.adapters.audio.decode(AudioCodes(codes=codes))
    bad = run.ts.check_ids(body, "text")
    if bad:
        raise TokenSpaceError(f"text span holds id {int(body[bad[0]])} at {bad[0]}, outside TEXT")
    return run.adapters.text.decode(body.tolist())


def check_and_decode(run: Run, spec: SpanSpec, prompt: np.ndarray, gen: np.ndarray,
                     seed: int = 0) -> tuple[SpanCheck, Any]:
    chk, body = check_span(run.ts, spec, int(prompt[-1]), gen)
    out = None
    try:
        out = decode_span(run, spec.modality, body, seed)
        chk.decoded = True
    except Exception as e:  # a decode failure is a measured outcome, not a crash
        chk.error = "; ".join(x for x in (chk.error, f"{type(e).__name__}: {e}") if x)
    return chk, out


def save_output(run: Run, modality: str, value: Any, path_stem: Path) -> Path:
    """PNG for images, 16-bit WAV for audio, UTF-8 .txt for text."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    if modality == "image":
        from PIL import Image

        p = path_stem.with_suffix(".png")
        Image.fromarray(np.asarray(value, np.uint8)).save(p)
    elif modality == "audio":
        import soundfile as sf

        p = path_stem.with_suffix(".wav")
        sf.write(str(p), np.clip(np.asarray(value, np.float32).T, -1, 1), run.adapters.audio.sample_rate,
                 subtype="PCM_16")
    else:
        p = path_stem.with_suffix(".txt")
        write_file(p, str(value) + "\n")
    return p


# -- one call for the CLI, and many at once for a server ------------------------------------------

def job_prompt(run: Run, task: str, prompt: Optional[str] = None, input_path: Optional[str | Path] = None) -> np.ndarray:
    """The prompt ids of one generation: a caption (t2x), a media file (x2t) or the text to continue (t2t)."""
    require_same_space(run)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: one of {TASKS}")
    if task == "t2t":
        return text_prompt(run, prompt)
    if run.kind == "base-lm":
        raise UserError("task", task, "a base-LM run (`lumo train lm`) generates text only", "use t2t, or a token-LM run")
    if task in ("t2i", "t2a"):
        return build_prompt(run, task, caption=prompt)
    if input_path is None:
        raise ValueError(f"{task} needs --input FILE (an {'image' if task == 'i2t' else 'audio'} file)")
    return build_prompt(run, task, media_ids=media_file_ids(run, task, input_path), sid=str(input_path))


def write_samples(run: Run, task: str, p: np.ndarray, gens: list[np.ndarray], out_dir: str | Path, opts: GenOptions,
                  prompt: Optional[str] = None, input_path: Optional[str | Path] = None, log=print) -> list[dict]:
    """Check and decode each generated span of one prompt -> files in out_dir + generations.jsonl."""
    if task == "t2t":
        return write_text_samples(run, gens, out_dir, opts, prompt, log)
    spec = task_spec(run, task, opts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recs = []
    for i, g in enumerate(gens):
        chk, val = check_and_decode(run, spec, p, g, seed=opts.seed + i)
        rec = {"task": task, "index": i, "prompt": prompt, "input": str(input_path) if input_path else None,
               "ids": g.tolist(), "check": asdict(chk), "ok": chk.ok, "file": None}
        if val is not None:
            f = save_output(run, TARGET[task], val, out / f"{task}-{i:03d}")
            rec["file"] = str(f)
            if TARGET[task] == "text":
                rec["text"] = str(val)
                log(f"[{i}] {val}")
            else:
                log(f"[{i}] wrote {f}")
        else:
            log(f"[{i}] not decodable: {chk.error}")
        recs.append(rec)
    return _write_index(out, task, recs, opts)


def _write_index(out: Path, task: str, recs: list[dict], opts: GenOptions) -> list[dict]:
    write_file(out / "generations.jsonl", "".join(json.dumps(r) + "\n" for r in recs))
    write_file(out / "options.json", json.dumps({**asdict(opts), "task": task, "n": len(recs)}, indent=2) + "\n")
    return recs


# -- t2t ------------------------------------------------------------------------------------------

def context_len(run: Run) -> tuple[int, str]:
    """The longest sequence the run's model was trained on, and the config key that sets it."""
    if run.kind == "base-lm":
        return int(run.cfg.lm.seq_len), "lm.seq_len"
    return int(run.cfg.token_lm.seq.max_len), "token_lm.seq.max_len"


def max_new_tokens(run: Run, task: str, opts: GenOptions) -> int:
    """Tokens a generation may add after its prompt (a span with its end token; t2t: max_text_tokens)."""
    return int(opts.max_text_tokens) if task == "t2t" else task_spec(run, task, opts).max_new_tokens


def text_prompt(run: Run, prompt: Optional[str]) -> np.ndarray:
    """t2t: the prompt as plain text tokens (no delimiters; a token-LM run's TEXT ids)."""
    if run.adapters is None or run.adapters.text is None:
        raise UserError("task", "t2t", "this run has no text tokenizer (uti.text.load is off)",
                        "set uti.text.load=true (--set)")
    if not prompt:
        raise ValueError("t2t needs a non-empty prompt")
    return np.asarray(run.adapters.text.encode(prompt), np.int64)


def generate_text_ids(run: Run, prompts: list[np.ndarray], opts: GenOptions, seeds: Optional[list[int]] = None,
                      on_token=None) -> list[np.ndarray]:
    """t2t ids after each prompt (lumo_ray.generate_text.text_loop): the text part of the vocabulary
    (opts.constrained), each row drawn by its own generator (RowSampler, seeds[i] default
    row_seed(opts.seed, i); argmax when greedy), up to and including the end token or the token that
    completed a stop string. on_token(i, id): row i's token as it is chosen."""
    from .generate_text import text_loop

    text = run.adapters.text
    seeds = [row_seed(opts.seed, i) for i in range(len(prompts))] if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    cap, key = context_len(run)
    for p in prompts:
        if len(p) + opts.max_text_tokens > cap:
            raise UserError("--max-new-tokens" if len(p) < cap else "--prompt", None,
                            f"{len(p)} prompt tokens and up to {opts.max_text_tokens} new ones make "
                            f"{len(p) + opts.max_text_tokens}, over the run's {key} of {cap}",
                            "shorten the prompt or lower --max-new-tokens")
    pad = text.pad_id if text.pad_id is not None else (text.eos_id or 0)  # (masked out: any id would do)
    out: list[np.ndarray] = []
    for b0 in range(0, len(prompts), opts.batch_size):
        batch = prompts[b0: b0 + opts.batch_size]
        if opts.greedy:
            def pick(seqs, scores):
                return scores.argmax(-1)
        else:
            sampler = RowSampler(seeds[b0: b0 + len(batch)], opts)

            def pick(seqs, scores, sampler=sampler):  # the sampler leaves only its draw finite
                return sampler(seqs, scores).argmax(-1)
        hook = on_token and (lambda i, t, b0=b0: on_token(b0 + i, t))
        with torch.no_grad(), torch_threads(opts.threads):
            out += text_loop(run.model, batch, pick, vocab=text.vocab_size, constrained=opts.constrained,
                             eos=text.eos_id, pad=pad, max_new_tokens=opts.max_text_tokens, stop=opts.stop,
                             decode=text.decode, on_token=hook)
    return out


def text_result(run: Run, ids: np.ndarray, opts: GenOptions) -> dict:
    """A t2t row's text (cut before a stop string, without the end token), its finish reason ('stop':
    the end token or a stop string; 'length': max_text_tokens) and check; ok when every id is a text id."""
    from .generate_text import finish_text

    text = run.adapters.text
    ids = np.asarray(ids, np.int64)
    body = ids[:-1] if ids.size and text.eos_id is not None and ids[-1] == text.eos_id else ids
    bad = int(((body < 0) | (body >= text.vocab_size)).sum())
    chk = {"length": int(ids.size), "out_of_range": bad, "decoded": not bad,
           "error": f"{bad} ids outside the text vocabulary" if bad else ""}
    if bad:
        return {"text": None, "finish_reason": None, "check": chk, "ok": False}
    out, why = finish_text(ids.tolist(), text.decode, text.eos_id, opts.stop)
    return {"text": out, "finish_reason": why, "check": chk, "ok": True}


def write_text_samples(run: Run, gens: list[np.ndarray], out_dir: str | Path, opts: GenOptions,
                       prompt: Optional[str] = None, log=print) -> list[dict]:
    """t2t: each row's text -> t2t-NNN.txt in out_dir + generations.jsonl (ids, text, finish_reason)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recs = []
    for i, g in enumerate(gens):
        r = text_result(run, g, opts)
        rec = {"task": "t2t", "index": i, "prompt": prompt, "input": None, "ids": np.asarray(g).tolist(), **r,
               "file": None}
        if r["ok"]:
            rec["file"] = str(save_output(run, "text", r["text"], out / f"t2t-{i:03d}"))
            log(f"[{i}] {prompt or ''}{r['text']}")
        else:
            log(f"[{i}] not decodable: {r['check']['error']}")
        recs.append(rec)
    return _write_index(out, "t2t", recs, opts)


def generate(run: Run, task: str, out_dir: str | Path, *, prompt: Optional[str] = None,
             input_path: Optional[str | Path] = None, n: int = 1, opts: Optional[GenOptions] = None,
             log=print) -> list[dict]:
    """n samples for one prompt (t2x: caption text; x2t: a media file) -> files in out_dir +
    generations.jsonl. Returns one record per sample (path, text, check)."""
    opts = opts or GenOptions()
    p = job_prompt(run, task, prompt, input_path)
    gens = generate_spans(run, task, [p] * n, opts)
    return write_samples(run, task, p, gens, out_dir, opts, prompt, input_path, log)


def generate_jobs(run: Run, jobs: list[tuple[str, np.ndarray, int, GenOptions]],
                  on_token=None) -> list[list[np.ndarray]]:
    """Many generations in as few batches as their options allow: job (task, prompt ids, n, opts) gets
    `generate(...)`'s spans (rows seeded row_seed(opts.seed, i)), up to the float rounding of batching
    it with the others. Jobs with the same task and options but the seed share one batch. on_token(k, i,
    id): row i of job k chose its next token (generate_spans' on_token)."""
    groups: dict[str, list[int]] = {}
    for k, (task, _, _, o) in enumerate(jobs):
        groups.setdefault(json.dumps([task, {**asdict(o), "seed": 0}]), []).append(k)
    out: list[list[np.ndarray]] = [[] for _ in jobs]
    for ks in groups.values():
        task, o = jobs[ks[0]][0], jobs[ks[0]][3]
        prompts = [jobs[k][1] for k in ks for _ in range(jobs[k][2])]
        seeds = [row_seed(jobs[k][3].seed, i) for k in ks for i in range(jobs[k][2])]
        rows = [(k, i) for k in ks for i in range(jobs[k][2])]
        hook = on_token and (lambda r, t, rows=rows: on_token(*rows[r], t))
        spans = generate_spans(run, task, prompts, replace(o, batch_size=max(1, len(prompts))), seeds=seeds,
                               on_token=hook)
        for k in ks:
            out[k], spans = spans[: jobs[k][2]], spans[jobs[k][2]:]
    return out
