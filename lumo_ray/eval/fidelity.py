"""Generation fidelity of a token LM (docs/gates.md, t2x): does a generated image / clip show what its
caption asks for?

Synthetic captions name attributes (lumo_ray.data.synth): images "two red circles on the left"
(count, colour, shape, position), audio "three short high beeps" (count, length, pitch). An
attribute probe is fitted on the REAL train-split codes of the run's shards and then reads:

- real eval-split codes of n seeded eval samples: the probe's accuracy there is the ceiling;
- codes generated for those samples' captions (t2i / t2a, constrained decoding);
- codes generated for swapped captions: each sample gets another eval sample's caption, chosen so
  the gated attributes differ where possible, and is scored against its ORIGINAL attributes (the
  floor: a model that ignores the caption scores here as it does on its own captions).

Chance is the majority-class rate of the scored eval labels (the accuracy of always guessing the
most frequent value; never below 1/k).

Gate (FidelityConfig.gated, default image colour and audio pitch): the probe must read real eval
codes at >= probe_min (0.95), else the gate fails saying the probe cannot read the attribute (a reported
attribute below it is marked unreadable: its accuracies say nothing of the model); then
generated accuracy >= chance + fraction x (ceiling - chance) and > swapped accuracy, with a paired
one-sided exact sign test (per sample: generated correct vs swapped correct) at p < max_p (0.01),
always (n < 7 cannot reach 0.01 and fails, saying so; lumo_ray/eval/stats.py). The report also holds
n, the mean per-sample gap generated - swapped with a seeded bootstrap 95% CI and the win rate
(share of samples where only the generated code is read right). Other attributes are reported.
The same rule is eval/attribute_gate.py, shared with caption accuracy.

With FidelityConfig.captions (default on) the run also captions the same eval samples (i2t / a2t) and
scores what the captions say per attribute (eval/captions.py; counted in the verdict only with
gate_captions), and reports the field's metrics: BLEU-4 / CIDEr-D of those captions, CLIPScore and a
Fréchet CLIP distance of the t2i images (eval/field_metrics.py).

Probe choice (why): per attribute, a multinomial logistic regression (weak L2, fitted with L-BFGS
in float64 from zeros under one torch thread: deterministic, and no scikit-learn needed) on one of a
few candidate feature sets, chosen per attribute by 3-fold cross-validation on the train split:

- codes: a bag of the span's codes (global ids mapped to local codes through the token-space
  ranges). Needs nothing of the codec, so it works for any codebook; for audio (EnCodec) it reads
  pitch and length.
- codes+blocks / codes+bins: plus bags per coarse region, for position and count. Images: the grid
  is g x g tokens in row-major order, bags per 2x2 and 3x3 block. Audio is interleaved by codebook
  (position p holds codebook p mod K): bags per codebook, whole clip, 4 and 16 time bins (16 bins,
  0.125 s of a 2 s clip, resolve the 0.14 s gaps between beeps: count's ceiling 0.86 -> 1.00 on the
  demo's real eval codes).
- pixels / pixels+blocks (images): colour histograms (RGB at 6 levels) of the image the run's codec
  decodes from the codes, whole and per block. Still a function of the codes alone (the decoder is
  fixed), and exactly what a user sees. Needed because a trained VQ spreads one colour over many
  codes that also encode edges and background: on the test shards the code bags read colour at
  ~0.6, the decoded colours at 1.0 (with the earlier random-init VQ, code bags read 0.73).

A linear probe reads what is in the bags; it cannot count blobs or tell a square from a circle. An
image attribute whose best linear 3-fold CV on the train split is below CNN_BELOW (0.95) is read
instead by a small fixed CNN on the decoded pixels (eval/pixel_probe.py: one net, a head per image
attribute, seeded, fitted once on the real train images; on the demo's data it reads count 0.98 and
shape 0.97 on the gate's 64 real eval samples, where the linear probe reads 0.77 and 0.66).

Each bag is normalized to frequencies and square-rooted (Hellinger: a few frequent background codes
or colours do not drown the rare object ones), then centred on the train mean. Audio codes are
cropped exactly as the model's t2a target is (the centred crop to the generated length), so real
and generated clips cover the same span. The probe is linear where linear reads the attribute
(deliberately weak: what it reads in generated codes is there, not invented by a flexible
classifier), and the CNN is small, fixed and fitted on real codes only. A CNN-read attribute's
report keeps the linear candidates' CV accuracies (`cv_accuracy`: why the CNN reads it); its own
accuracy is the ceiling, on the real eval codes. Fitted probes are cached
in-process by a digest of their training data (the same shards are probed once per process).

No Ray here: plain NumPy / PyTorch.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..config.lm import FidelityConfig
from ..data import synth
from ..data.mix import primary
from ..data.sequences import crop_audio
from ..runtime import torch_threads
from ..storage import write_file
from ..token_space import TokenSpace
from .attribute_gate import attribute_row, gate
from .pixel_probe import VERSION as PIXEL_PROBE_VERSION, PixelProbe, fit_pixel_probe
from .captions import ATTRIBUTES, CaptionError, parse_caption  # noqa: F401  (the synthetic caption grammar)
from .captions import TASK as X2T, generate_captions, score_captions, summary_lines as caption_lines, swap_partners

CLASSES = {
    "image": {"colour": tuple(synth.COLOURS), "shape": synth.SHAPES, "count": (1, 2, 3, 4),
              "position": synth.POSITIONS},
    "audio": {"pitch": tuple(synth.PITCHES), "count": (1, 2, 3, 4), "length": tuple(synth.LENGTHS)},
}
TASK = {"image": "t2i", "audio": "t2a"}
IMAGE_GRIDS = (1, 2, 3)
"""Spatial bags: whole grid, 2x2 and 3x3 blocks."""
AUDIO_BINS = (1, 4, 16)
"""Temporal bags per codebook: whole clip, 4 and 16 time bins (16: the gaps between beeps)."""
PIXEL_LEVELS = 6
"""Image pixel features: RGB quantized to 6 levels per channel (216 colour bins)."""
L2 = 1e-3
"""L2 weight of the probes (features are square-rooted frequencies, so weights are large: a weak
penalty; on the tiny synthetic sets 1e-4..1e-2 read the same within noise)."""
MAX_ITER = 100
CV_FOLDS = 3
CNN_BELOW = 0.95
"""An image attribute whose best linear CV accuracy is below this is read by the pixel CNN."""


# -- items: samples with parsed attributes ------------------------------------------------------

@dataclass
class Item:
    id: str
    caption: str
    attrs: dict
    ids: np.ndarray
    """The sample's media span (global ids, uncropped)."""


def to_items(samples: list[dict], modality: str, decode: Callable[[list[int]], str]) -> list[Item]:
    out = []
    for s in samples:
        sid = str(s["json"].get("id", "?"))
        cap = decode(np.asarray(s["text"], np.int64).tolist())
        out.append(Item(sid, cap, parse_caption(modality, cap, sid), np.asarray(s[modality], np.int64)))
    return out


def load_items(shards, ts: TokenSpace, split: str, decode: Callable[[list[int]], str]) -> dict[str, list[Item]]:
    """Every sample of a split holding image / audio, sorted by id."""
    from ..data.shard_reader import ShardDataset

    samples = list(ShardDataset(shards, split, shuffle=False, expected=ts))
    return {m: to_items(sorted((s for s in samples if m in s), key=lambda s: str(s["json"]["id"])), m, decode)
            for m in ATTRIBUTES}


def select_eval(items: list[Item], n: int, seed: int, modality: str) -> list[Item]:
    """Up to n items chosen by seed (order kept)."""
    idx = np.random.default_rng([seed, len(modality), 5]).permutation(len(items))[:n]
    return [items[i] for i in sorted(idx)]


# -- features -----------------------------------------------------------------------------------

def _media_body(ts: TokenSpace, ids: np.ndarray) -> np.ndarray:
    """A span's media ids: up to the first special id (a generated span ends with its end token)."""
    g = np.asarray(ids, np.int64)
    sp = ts.range("SPECIAL")
    hit = np.nonzero((g >= sp.start) & (g < sp.stop))[0]
    return g[: hit[0]] if hit.size else g


def _bag(codes: np.ndarray, size: int) -> np.ndarray:
    h = np.bincount(codes, minlength=size)[:size].astype(np.float64)
    return np.sqrt(h / max(codes.size, 1))


def _edges(n: int, b: int) -> np.ndarray:
    return np.linspace(0, n, b + 1).round().astype(int)


def _block_bags(grid: np.ndarray, size: int) -> list[np.ndarray]:
    """Bags of a 2-D array of symbols over the whole array, then its 2x2 and 3x3 blocks."""
    h, w = grid.shape
    out = []
    for b in IMAGE_GRIDS:
        eh, ew = _edges(h, b), _edges(w, b)
        out += [_bag(grid[eh[i]:eh[i + 1], ew[j]:ew[j + 1]].ravel(), size) for i in range(b) for j in range(b)]
    return out


def pixel_features(img: np.ndarray) -> np.ndarray:
    """Colour histograms (RGB quantized to PIXEL_LEVELS^3 bins) of a decoded image, whole + blocks."""
    q = np.asarray(img, np.int64)[..., :3] * PIXEL_LEVELS // 256
    sym = (q[..., 0] * PIXEL_LEVELS + q[..., 1]) * PIXEL_LEVELS + q[..., 2]
    return np.concatenate(_block_bags(sym, PIXEL_LEVELS ** 3))


def image_features(ts: TokenSpace, ids: np.ndarray, tokens: int,
                   decode: Optional[Callable] = None) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """(features, decoded image): code bags over the whole grid and its 2x2 / 3x3 blocks, then (with
    `decode`, the codec's codes -> image) the colour histograms of the decoded image, and that uint8
    image (for the pixel CNN; None without `decode`); (None, None) when the span is not a g x g grid of
    image ids of the expected length, or does not decode."""
    r = ts.range("IMAGE")
    g = _media_body(ts, ids)
    side = math.isqrt(tokens)
    if g.size != tokens or side * side != tokens or ((g < r.start) | (g >= r.stop)).any():
        return None, None
    feats = _block_bags((g - r.start).reshape(side, side), r.size)
    img = None
    if decode is not None:
        try:
            with torch_threads(1):
                img = np.asarray(decode(g - r.start, seed=0))
        except Exception:  # an undecodable span is unreadable (scored wrong), not a crash
            return None, None
        feats.append(pixel_features(img))
    return np.concatenate(feats), img


def audio_features(ts: TokenSpace, ids: np.ndarray, tokens: int) -> Optional[np.ndarray]:
    """Per codebook: bags over the whole clip (first), then over 4 time bins, after the centred crop
    to `tokens` ids; None when the span breaks codebook phase or is empty."""
    k = ts.num_codebooks
    g = _media_body(ts, ids)
    if g.size == 0 or g.size % k or ts.audio_phase_errors(g):
        return None
    g = crop_audio(g, k, tokens, None)
    codes = ts.global_to_audio(g)  # [K, T]
    size, t = ts.audio_ranges[0].size, codes.shape[1]
    feats = []
    for b in AUDIO_BINS:
        e = _edges(t, b)
        feats += [_bag(codes[c, e[i]:e[i + 1]], size) for c in range(k) for i in range(b)]
    return np.concatenate(feats)


def feature_sets(ts: TokenSpace, modality: str, pixels: bool) -> dict[str, np.ndarray]:
    """Candidate feature sets (column indices), simplest first; each attribute picks one by CV."""
    if modality == "audio":
        whole = ts.num_codebooks * ts.audio_ranges[0].size
        return {"codes": np.arange(whole), "codes+bins": np.arange(whole * sum(AUDIO_BINS))}
    size, blocks = ts.range("IMAGE").size, sum(b * b for b in IMAGE_GRIDS)
    sets = {"codes": np.arange(size), "codes+blocks": np.arange(size * blocks)}
    if pixels:
        o, p = size * blocks, PIXEL_LEVELS ** 3
        sets.update({"pixels": np.arange(o, o + p), "pixels+blocks": np.arange(o, o + p * blocks)})
    return sets


# -- the probe ----------------------------------------------------------------------------------

def _fit_softmax(x: torch.Tensor, y: torch.Tensor, k: int, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(x.shape[1], k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=MAX_ITER, tolerance_grad=1e-6, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


@dataclass
class AttributeProbe:
    classes: tuple
    features: str
    """The feature set used (a key of feature_sets), or 'pixels CNN' (read by the ModalityProbe's CNN)."""
    cols: np.ndarray
    """Its feature columns."""
    w: np.ndarray
    b: np.ndarray
    cv_accuracy: dict
    """3-fold CV accuracy on the train split per candidate feature set."""
    train_n: int

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.argmax(x[:, self.cols] @ self.w + self.b, axis=1)


def fit_attribute(x: np.ndarray, labels: list, classes: tuple, seed: int,
                  sets: dict[str, np.ndarray]) -> AttributeProbe:
    """Multinomial logistic regression (L2 = L2 constant) on the feature set with the best 3-fold CV
    accuracy on the train split (ties: the earlier, simpler set)."""
    y = np.array([classes.index(v) for v in labels], np.int64)
    k = len(classes)
    order = {n: i for i, n in enumerate(sets)}
    with torch_threads(1):
        xt, yt = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y)
        folds = np.random.default_rng([seed, 17]).permutation(len(y)) % CV_FOLDS
        cv = {}
        for name, cols in sets.items():
            xs = xt[:, torch.as_tensor(cols)]
            hit = 0
            for f in range(CV_FOLDS):
                tr, te = np.nonzero(folds != f)[0], np.nonzero(folds == f)[0]
                w, b = _fit_softmax(xs[tr], yt[tr], k, L2)
                hit += int(((xs[te] @ w + b).argmax(1) == yt[te]).sum())
            cv[name] = hit / len(y)
        best = max(sets, key=lambda n: (cv[n], -order[n]))
        w, b = _fit_softmax(xt[:, torch.as_tensor(sets[best])], yt, k, L2)
    return AttributeProbe(tuple(classes), best, sets[best], w.numpy(), b.numpy(), cv, len(y))


@dataclass
class ModalityProbe:
    """Per-attribute probes of one modality over its code features."""
    modality: str
    ts: TokenSpace
    tokens: int
    """Image: tokens per image; audio: ids the clips are cropped to (the generated length)."""
    mean: np.ndarray
    decode: Optional[Callable] = None
    """Image: the codec's decoder (codes -> uint8 image) for the pixel feature sets."""
    attributes: dict[str, AttributeProbe] = field(default_factory=dict)
    pixels: Optional[PixelProbe] = None
    """Image: the CNN on decoded pixels, for the attributes whose features are 'pixels CNN'."""

    def features(self, spans: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list]:
        """(features centred on the train mean, readable mask, decoded images or None): unreadable spans
        get zero rows."""
        parts = [_features(self.ts, self.modality, s, self.tokens, self.decode) for s in spans]
        ok = np.array([r is not None for r, _ in parts], bool)
        x = np.zeros((len(parts), self.mean.size))
        for i, (r, _) in enumerate(parts):
            if r is not None:
                x[i] = r - self.mean
        return x, ok, [im for _, im in parts]

    def predict(self, spans: list[np.ndarray]) -> dict[str, list]:
        """attribute -> predicted value per span (None for an unreadable span)."""
        x, ok, images = self.features(spans)
        cnn = self.pixels.predict(images) if self.pixels is not None else {}
        out = {}
        for a, p in self.attributes.items():
            if p.features == PIXEL_CNN:
                out[a] = [v if good else None for v, good in zip(cnn[a], ok)]
                continue
            idx = p.predict(x)
            out[a] = [p.classes[int(i)] if good else None for i, good in zip(idx, ok)]
        return out


PIXEL_CNN = "pixels CNN"


def _features(ts: TokenSpace, modality: str, ids: np.ndarray, tokens: int,
              decode: Optional[Callable]) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """(features, decoded image): images decode when `decode` is given; audio has no image."""
    if modality == "image":
        return image_features(ts, ids, tokens, decode)
    return audio_features(ts, ids, tokens), None


_PROBES: dict[str, ModalityProbe] = {}


def fit_probe(ts: TokenSpace, modality: str, items: list[Item], tokens: int, seed: int = 0,
              decode: Optional[Callable] = None) -> ModalityProbe:
    """Fit every attribute of a modality on real (train-split) items. decode (images): the codec's
    codes -> image, which adds the pixel feature sets. Cached by a digest of the inputs (the token
    space hash names the codec)."""
    h = hashlib.sha256(json.dumps([modality, tokens, seed, ts.hash, L2, IMAGE_GRIDS, AUDIO_BINS, PIXEL_LEVELS,
                                   decode is not None, CNN_BELOW, PIXEL_PROBE_VERSION]).encode())
    for it in items:
        h.update(json.dumps([it.id, it.attrs]).encode())
        h.update(np.ascontiguousarray(it.ids, np.int64).tobytes())
    key = h.hexdigest()
    if key not in _PROBES:
        _PROBES[key] = _fit_probe(ts, modality, items, tokens, seed, decode)
    return _PROBES[key]


def _fit_probe(ts: TokenSpace, modality: str, items: list[Item], tokens: int, seed: int,
               decode: Optional[Callable]) -> ModalityProbe:
    if len(items) < 2 * CV_FOLDS:
        raise ValueError(f"{len(items)} {modality} train samples: too few to fit the attribute probe")
    rows, images = [], []
    for it in items:
        f, im = _features(ts, modality, it.ids, tokens, decode)
        if f is None:
            raise ValueError(f"train sample {it.id}: {modality} span of {it.ids.size} ids is not readable")
        rows.append(f)
        images.append(im)
    x = np.stack(rows)
    mean = x.mean(axis=0)
    x = x - mean
    probe = ModalityProbe(modality, ts, tokens, mean, decode)
    sets = feature_sets(ts, modality, decode is not None)
    for a in ATTRIBUTES[modality]:
        probe.attributes[a] = fit_attribute(x, [it.attrs[a] for it in items], CLASSES[modality][a], seed, sets)
    weak = [a for a, p in probe.attributes.items() if max(p.cv_accuracy.values()) < CNN_BELOW]
    if modality == "image" and decode is not None and weak:  # spatial attributes: the CNN on decoded pixels
        classes = CLASSES[modality]
        probe.pixels = fit_pixel_probe(np.stack(images), {a: [it.attrs[a] for it in items] for a in classes},
                                       classes, seed)
        for a in weak:
            probe.attributes[a].features = PIXEL_CNN
    return probe


# -- scoring ------------------------------------------------------------------------------------

def score_modality(probe: ModalityProbe, items: list[Item], generated: list[np.ndarray],
                   swapped: list[np.ndarray], cfg: FidelityConfig, real: Optional[list[np.ndarray]] = None) -> dict:
    """Accuracies of one modality (real eval = ceiling, generated, swapped vs the ORIGINAL attributes,
    chance) per attribute, with the gate on cfg.gated[modality]. `real` defaults to the items' codes."""
    m = probe.modality
    n = len(items)
    if not (len(generated) == len(swapped) == n):
        raise ValueError(f"{m}: {n} items but {len(generated)} generated / {len(swapped)} swapped spans")
    real = [it.ids for it in items] if real is None else real
    preds = {k: probe.predict(v) for k, v in (("real", real), ("generated", generated), ("swapped", swapped))}
    gated = list(cfg.gated.get(m, []))
    unknown = [a for a in gated if a not in ATTRIBUTES[m]]
    if unknown:
        raise ValueError(f"fidelity.gated.{m}: unknown attribute(s) {unknown}; one of {ATTRIBUTES[m]}")
    rep: dict = {"n": n, "unreadable": {k: int(sum(v is None for v in p[ATTRIBUTES[m][0]])) for k, p in preds.items()},
                 "attributes": {}}
    ok = n > 0
    for a in ATTRIBUTES[m]:
        truth = [it.attrs[a] for it in items]
        hit = {k: np.array([pv == t for pv, t in zip(p[a], truth)], bool) for k, p in preds.items()}
        ceiling = float(hit["real"].mean()) if n else float("nan")
        r = attribute_row(truth, hit["generated"], hit["swapped"], ceiling, a in gated, cfg)
        r["probe"] = {"features": probe.attributes[a].features, "cv_accuracy": probe.attributes[a].cv_accuracy,
                      "train_n": probe.attributes[a].train_n}
        r["probe_reads"] = bool(ceiling >= cfg.probe_min)  # below it the attribute's numbers judge the probe
        if a in gated:
            r.update(gate(r, n, cfg))
            ok = ok and r["pass"]
        rep["attributes"][a] = r
    rep["pass"] = bool(ok)
    if n == 0:
        rep["reason"] = f"no {m} eval samples"
    rep["predictions"] = {k: {a: [None if v is None else str(v) for v in p[a]] for a in p} for k, p in preds.items()}
    return rep


def score_generations(probes: dict[str, ModalityProbe], items: dict[str, list[Item]],
                      generated: dict[str, list[np.ndarray]], swapped: dict[str, list[np.ndarray]],
                      cfg: FidelityConfig) -> dict:
    """The gate over given spans (generated by a model, or doctored ones in tests). Every modality with
    gated attributes must be present and pass."""
    rep: dict = {"gate": "generation_fidelity", "modalities": {}, "n": {}, "chance": "majority-class rate of the "
                 "scored eval labels", "config": asdict(cfg)}
    ok = True
    for m in ATTRIBUTES:
        if m not in probes:
            if cfg.gated.get(m):
                rep["modalities"][m] = {"n": 0, "pass": False, "reason": f"no {m} in the run or its shards"}
                rep["n"][m] = 0
                ok = False
            continue
        r = score_modality(probes[m], items[m], generated[m], swapped[m], cfg)
        rep["modalities"][m] = r
        rep["n"][m] = r["n"]
        ok = ok and r["pass"]
    rep["pass"] = bool(ok and rep["modalities"])
    return rep


# -- the gate on a run --------------------------------------------------------------------------

def _available(run) -> list[str]:
    from .gates import available_tasks

    tasks = available_tasks(run)
    return [m for m in ATTRIBUTES if TASK[m] in tasks]


def _gen_options(cfg: FidelityConfig):
    from ..generate import GenOptions

    return GenOptions(seed=cfg.seed, temperature=cfg.temperature, top_k=cfg.top_k, batch_size=cfg.batch_size,
                      guidance_scale=cfg.guidance_scale)


def run_fidelity(run_or_dir: Any, out_dir: str | Path, cfg: Optional[FidelityConfig] = None,
                 shards: Optional[str] = None, log=print) -> dict:
    """`lumo eval fidelity`: fit probes on the shards' train split, generate for n seeded eval captions
    and for swapped captions, score -> out_dir/report.json, report.md and samples/. cfg defaults to the
    run config's token_lm.fidelity; shards to its token_lm.shards."""
    from ..generate import Run, audio_frames, build_prompt, generate_spans, load_run
    from .gates import _swap_partners

    run: Run = run_or_dir if isinstance(run_or_dir, Run) else load_run(run_or_dir)
    cfg = cfg or run.cfg.token_lm.fidelity
    if cfg.gate_captions and not cfg.captions:
        from ..errors import UserError
        raise UserError("token_lm.fidelity.gate_captions", None, "gates caption accuracy, which "
                        "token_lm.fidelity.captions=false turns off", "set captions true or gate_captions false")
    shards = shards or primary(run.cfg.token_lm.shards)  # a mix: its first source
    if not shards:
        raise ValueError(f"{run.name}: no shards (set token_lm.shards in the run config or pass --shards)")
    opts = _gen_options(cfg)
    decode = run.adapters.text.decode
    mods = _available(run)
    train = load_items(shards, run.ts, "train", decode)
    evals = load_items(shards, run.ts, cfg.split, decode)
    probes, items, gen, swp, partners = {}, {}, {}, {}, {}
    for m in mods:
        if not train[m] or not evals[m]:
            continue
        tokens = (run.adapters.image.tokens_per_image if m == "image"
                  else audio_frames(run, opts) * run.ts.num_codebooks)
        probes[m] = fit_probe(run.ts, m, train[m], tokens, cfg.seed,
                              run.adapters.image.decode if m == "image" else None)
        items[m] = select_eval(evals[m], cfg.n, cfg.seed, m)
        keys = [[str(it.attrs[a]) for a in cfg.gated.get(m, [])] or [it.caption] for it in items[m]]
        partners[m] = _swap_partners(keys, np.random.default_rng([cfg.seed, len(m), 29]))
        task = TASK[m]
        prompts = [build_prompt(run, task, caption=it.caption, sid=it.id) for it in items[m]]
        gen[m] = generate_spans(run, task, prompts, opts)
        swp[m] = generate_spans(run, task, [prompts[j] for j in partners[m]], opts)
        log(f"  {m}: probe fitted on {len(train[m])} train samples; generated {len(prompts)} x 2 ({task})")
    rep = score_generations(probes, items, gen, swp, cfg)
    rep.update(run=run.name, shards=str(shards), split=cfg.split,
               generation={k: getattr(opts, k) for k in ("seed", "temperature", "top_k", "batch_size", "constrained",
                                                         "guidance_scale")},
               probe={"features": {"image": "sqrt-frequency bags of the codes, or of the decoded image's colours "
                                            f"({PIXEL_LEVELS}^3 bins), over the whole grid (+ its 2x2 and 3x3 blocks)",
                                   "audio": "sqrt-frequency bags per codebook over the clip (+ "
                                            + " and ".join(str(b) for b in AUDIO_BINS[1:]) + " time bins)"},
                      "classifier": f"multinomial logistic regression (L2 {L2}, L-BFGS, float64; feature set by 3-fold CV); "
                                    f"an image attribute it reads below {CNN_BELOW} in CV: a small CNN on the decoded "
                                    f"pixels (eval/pixel_probe.py)",
                      "train_n": {m: len(train[m]) for m in probes},
                      "tokens": {m: p.tokens for m, p in probes.items()}})
    for m, r in rep["modalities"].items():
        if m in partners:
            r["swap_partner"] = [items[m][j].id for j in partners[m]]
            r["ids"] = [it.id for it in items[m]]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.captions and items:
        rep["captions"], rep["field_metrics"] = _captions(run, items, gen, partners, cfg, opts, out, log)
        if cfg.gate_captions:  # off by default: reported, not enforced (FidelityConfig.gate_captions)
            rep["pass"] = bool(rep["pass"] and all(c["pass"] for c in rep["captions"].values()))
    rep["samples"] = {m: _save_samples(run, m, items[m], gen[m], rep["modalities"][m], out, cfg.samples, opts)
                      for m in items}
    write_report(rep, out)
    for line in summary_lines(rep):
        log(line)
    return rep


def _decoded(run, m: str, ids: np.ndarray) -> Optional[Any]:
    """The media a span's body decodes to (None: it does not), on one thread (the same floats every run)."""
    from ..generate import decode_span

    try:
        with torch_threads(1):
            return decode_span(run, m, _media_body(run.ts, ids))
    except Exception:  # an undecodable span is a measured outcome, not a crash
        return None


def _captions(run, items: dict[str, list[Item]], gen: dict, partners: dict, cfg: FidelityConfig, opts, out: Path,
              log) -> tuple[dict, dict]:
    """Caption accuracy (i2t / a2t on the same eval samples' real codes; eval/captions.py) and the field's
    metrics (CIDEr-D / BLEU-4 of those captions, CLIPScore / Fréchet distance of the t2i images;
    eval/field_metrics.py). The first cfg.samples inputs are saved (decoded) for the report."""
    from ..codecs.clip import load_clip
    from ..generate import save_output
    from .field_metrics import caption_metrics, t2i_metrics

    caps, field = {}, {}
    for m, its in items.items():
        texts = generate_captions(run, m, its, opts)
        caps[m] = score_captions(m, its, texts, swap_partners(its, cfg.seed, m), cfg)
        for i, row in enumerate(caps[m]["samples"][: cfg.samples]):
            val = _decoded(run, m, its[i].ids)
            f = save_output(run, m, val, out / "samples" / X2T[m] / f"{i:03d}") if val is not None else None
            row["file"] = str(f.relative_to(out)) if f else None
        field[X2T[m]] = caption_metrics([[it.caption] for it in its], texts)
        log(f"  {m}: captioned {len(its)} eval samples ({X2T[m]}), {caps[m]['unparseable']} outside the grammar")
    if "image" in items:
        clip = load_clip(cfg.clip_model or "tiny")
        field["t2i"] = t2i_metrics(clip, [_decoded(run, "image", g) for g in gen["image"]],
                                   [_decoded(run, "image", it.ids) for it in items["image"]],
                                   [it.caption for it in items["image"]], partners["image"])
    return caps, field


def _save_samples(run, m: str, items: list[Item], gens: list[np.ndarray], r: dict, out: Path, k: int,
                  opts) -> list[dict]:
    from ..generate import build_prompt, check_and_decode, save_output, task_spec

    spec = task_spec(run, TASK[m], opts)
    rows = []
    for i, (it, g) in enumerate(list(zip(items, gens))[:k]):
        chk, val = check_and_decode(run, spec, build_prompt(run, TASK[m], caption=it.caption, sid=it.id), g, seed=i)
        f = save_output(run, m, val, out / "samples" / m / f"{i:03d}") if val is not None else None
        read = {a: r["predictions"]["generated"][a][i] for a in ATTRIBUTES[m]}
        rows.append({"id": it.id, "caption": it.caption, "file": str(f.relative_to(out)) if f else None,
                     "read": read, "error": chk.error or None})
    return rows


def summary_lines(rep: dict) -> list[str]:
    lines = []
    for m, r in rep["modalities"].items():
        if "attributes" not in r:
            lines.append(f"  {m:5s} FAIL: {r['reason']}")
            continue
        for a, x in r["attributes"].items():
            verdict = verdict_text(x, rep["config"]["probe_min"])
            lines.append(f"  {m:5s} {a:8s} n={r['n']:3d} chance {x['chance']:.2f} ceiling {x['ceiling']:.2f} "
                         f"generated {x['generated']:.2f} swapped {x['swapped']:.2f} (p {x['paired']['p']:.3g})  {verdict}")
    if rep.get("captions"):
        lines += caption_lines(rep["captions"])
    for task, f in (rep.get("field_metrics") or {}).items():
        lines.append(f"  {task:5s} {field_metrics_text(f)} (reported)")
    return lines


def verdict_text(x: dict, probe_min: float) -> str:
    """PASS / FAIL (reason) of a gated attribute; 'reported' of another, saying when the probe cannot read it."""
    if x["gated"]:
        return "PASS" if x["pass"] else f"FAIL ({x['reason']})"
    if not x.get("probe_reads", True):
        return f"reported; the probe cannot read it (real eval accuracy {x['ceiling']:.2f} < {probe_min:.2f})"
    return "reported"


def field_metrics_text(f: dict) -> str:
    """One task's field metrics in a line: BLEU-4 / CIDEr-D (captions) or CLIPScore / Fréchet distance (t2i)."""
    if "clipscore" in f:
        c = f["clipscore"]
        return (f"CLIPScore {c['generated']:.2f} (swapped caption {c['generated_swapped_caption']:.2f}, real "
                f"{c['real']:.2f}), Fréchet CLIP distance to real {f['frechet_clip']:.4f} ({f['clip']} CLIP)")
    return f"BLEU-4 {f['bleu4']:.3f}, CIDEr-D {f['cider_d']:.3f} (n {f['n']})"


def report_md(rep: dict) -> str:
    cfg = rep["config"]
    lines = [f"# Generation fidelity: {'PASS' if rep['pass'] else 'FAIL'}", "",
             f"Attribute probe fitted on real train-split codes; chance = {rep['chance']}. Gated attributes need real "
             f"eval accuracy >= {cfg['probe_min']}, generated >= chance + {cfg['fraction']} x (ceiling - chance), "
             f"generated > swapped, and a one-sided sign test p < {cfg['max_p']} (when n allows it).", "",
             "| modality | attribute | n | chance | real eval (ceiling) | generated | swapped | gap (95% CI) | p | gated | pass |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in rep["modalities"].items():
        if "attributes" not in r:
            lines.append(f"| {m} | - | {r['n']} | - | - | - | - | - | - | - | FAIL ({r['reason']}) |")
            continue
        for a, x in r["attributes"].items():
            p = x["paired"]
            verdict = verdict_text(x, rep["config"]["probe_min"])
            lines.append(f"| {m} | {a} | {r['n']} | {x['chance']:.3f} | {x['ceiling']:.3f} | {x['generated']:.3f} | "
                         f"{x['swapped']:.3f} | {p['gap']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}] | "
                         f"{p['p']:.3g} | {'yes' if x['gated'] else 'no'} | {verdict} |")
    lines += _captions_md(rep)
    samples = rep.get("samples") or {}
    if samples:
        lines += ["", "## Generated samples", ""]
        for m, rows in samples.items():
            for s in rows:
                f = s["file"]
                media = ("(not decodable)" if not f else f'<img src="{f}" width="96">' if f.endswith(".png")
                         else f'<audio controls src="{f}"></audio>')
                read = ", ".join(f"{a} {v}" for a, v in s["read"].items())
                lines.append(f"- **{s['id']}** {s['caption']}: {media} (probe reads: {read})")
    return "\n".join(lines) + "\n"


def _captions_md(rep: dict) -> list[str]:
    caps, field = rep.get("captions") or {}, rep.get("field_metrics") or {}
    lines = []
    if caps:
        gating = any(c["gating"] for c in caps.values())
        lines += ["", f"## Caption accuracy (i2t / a2t): {'gated' if gating else 'reported, not gated'}", "",
                  "Generated captions of the same eval samples, parsed with the synthetic grammar; swapped = the "
                  "caption scored against another sample's attributes; ceiling 1; a caption outside the grammar is "
                  "wrong on every attribute.", "",
                  "| task | attribute | n | unparseable | chance | generated | swapped | gap (95% CI) | p | verdict |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in caps.values():
            for a, x in c["attributes"].items():
                p = x["paired"]
                lines.append(f"| {c['task']} | {a} | {c['n']} | {c['unparseable']} | {x['chance']:.3f} | "
                             f"{x['generated']:.3f} | {x['swapped']:.3f} | {p['gap']:+.3f} [{p['ci95'][0]:+.3f}, "
                             f"{p['ci95'][1]:+.3f}] | {p['p']:.3g} | {'PASS' if x['pass'] else 'FAIL (' + x['reason'] + ')'} |")
    if field:
        lines += ["", "## The field's metrics (reported)", ""] + [f"- {t}: {field_metrics_text(f)}" for t, f in field.items()]
    return lines


def write_report(rep: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_file(out / "report.json", json.dumps(rep, indent=2) + "\n")
    write_file(out / "report.md", report_md(rep))
    return out / "report.json"
