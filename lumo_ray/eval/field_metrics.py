"""The field's generation metrics, reported beside the attribute probe and caption accuracy (not gated):

- captions (i2t, a2t): corpus BLEU-4 and CIDEr-D against the reference captions, as the COCO caption
  evaluation computes them (pycocoevalcap 1.2, bleu_scorer.py / cider_scorer.py; tests/test_field_metrics.py
  checks both against values that code gives). Written here rather than depended on: pycocoevalcap is a
  104 MB wheel (the Java tokenizer, METEOR and SPICE jars) around two small pure-Python scorers.
  Captions are lower-cased and split into words with punctuation dropped (what COCO's PTB tokenizer does to
  these captions); the CIDEr-D document frequencies come from the scored set's references, as there.
- images (t2i): CLIPScore = 100 x mean max(cos(image, caption), 0) (torchmetrics' definition; Hessel et
  al. scale by 2.5 instead) and the Fréchet distance between the CLIP image embeddings of generated
  images and of real ones (FID's formula on CLIP features), both on a CLIP the run names
  (FidelityConfig.clip_model; the shipped tiny preset by default, which was trained on the synthetic
  scenes beside their captions, trainers/codec_clip.py).

No Ray here: plain NumPy (the CLIP forward in PyTorch).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Optional, Sequence

import numpy as np

BLEU_N = 4
CIDER_N = 4
CIDER_SIGMA = 6.0
"""CIDEr-D's Gaussian length penalty (pycocoevalcap's default)."""


def words(caption: Optional[str]) -> list[str]:
    """Lower-cased words, punctuation dropped (None, an undecodable caption: no words)."""
    return re.findall(r"[a-z0-9']+", (caption or "").lower())


def _ngrams(ws: list[str], n: int) -> Counter:
    return Counter(tuple(ws[i:i + k]) for k in range(1, n + 1) for i in range(len(ws) - k + 1))


# -- BLEU-4 -------------------------------------------------------------------------------------

def bleu(refs: Sequence[Sequence[str]], hyps: Sequence[Optional[str]], n: int = BLEU_N) -> list[float]:
    """Corpus BLEU-1..n (pycocoevalcap's Bleu: clipped n-gram counts summed over the corpus, the brevity
    penalty on the summed lengths with each hypothesis's closest reference length, its 1e-15 / 1e-9
    smoothing). refs[i]: the reference captions of sample i; hyps[i]: its generated caption."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} reference sets for {len(hyps)} captions")
    small, tiny = 1e-9, 1e-15
    guess, correct, testlen, reflen = [0] * n, [0] * n, 0, 0
    for rs, h in zip(refs, hyps):
        hw = words(h)
        maxref: Counter = Counter()
        lens = []
        for r in rs:
            rw = words(r)
            lens.append(len(rw))
            for g, c in _ngrams(rw, n).items():
                maxref[g] = max(maxref[g], c)
        testlen += len(hw)
        reflen += min((abs(length - len(hw)), length) for length in lens)[1]
        for k in range(n):
            guess[k] += max(0, len(hw) - k)
        for g, c in _ngrams(hw, n).items():
            correct[len(g) - 1] += min(maxref[g], c)
    out, prod = [], 1.0
    for k in range(n):
        prod *= (correct[k] + tiny) / (guess[k] + small)
        out.append(prod ** (1.0 / (k + 1)))
    ratio = (testlen + tiny) / (reflen + small)
    if ratio < 1:
        out = [b * math.exp(1 - 1 / ratio) for b in out]
    return out


def bleu4(refs: Sequence[Sequence[str]], hyps: Sequence[Optional[str]]) -> float:
    return bleu(refs, hyps, 4)[3]


# -- CIDEr-D ------------------------------------------------------------------------------------

def cider_d(refs: Sequence[Sequence[str]], hyps: Sequence[Optional[str]], n: int = CIDER_N,
            sigma: float = CIDER_SIGMA) -> tuple[float, list[float]]:
    """(corpus CIDEr-D, per-sample scores) as pycocoevalcap's Cider computes them: tf-idf n-gram vectors
    (1..4), idf from the references of this set, the hypothesis's weights clipped at the reference's, a
    Gaussian penalty on the length difference, the mean over n and references, x 10."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} reference sets for {len(hyps)} captions")
    crefs = [[_ngrams(words(r), n) for r in rs] for rs in refs]
    df: Counter = Counter()
    for rs in crefs:
        df.update({g for r in rs for g in r})
    log_n = math.log(float(len(crefs))) if crefs else 0.0

    def vec(cnts: Counter):
        v: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in cnts.items():
            k = len(g) - 1
            v[k][g] = float(tf) * (log_n - math.log(max(1.0, df[g])))
            norm[k] += v[k][g] ** 2
            if k == 1:  # the reference code counts bigrams as the length (one less than the words): kept
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    scores = []
    for h, rs in zip(hyps, crefs):
        vh, nh, lh = vec(_ngrams(words(h), n))
        total = np.zeros(n)
        for r in rs:
            vr, nr, lr = vec(r)
            pen = math.exp(-float(lh - lr) ** 2 / (2 * sigma ** 2))
            for k in range(n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total[k] += val * pen
        scores.append(float(total.mean() / len(rs) * 10.0))
    return (float(np.mean(scores)) if scores else float("nan")), scores


def caption_metrics(refs: Sequence[Sequence[str]], hyps: Sequence[Optional[str]]) -> dict:
    """{n, bleu4, cider_d} of generated captions against their references."""
    if not hyps:
        return {"n": 0, "bleu4": float("nan"), "cider_d": float("nan")}
    return {"n": len(hyps), "bleu4": bleu4(refs, hyps), "cider_d": cider_d(refs, hyps)[0]}


# -- CLIP metrics -------------------------------------------------------------------------------

def clip_score(image_emb: np.ndarray, text_emb: np.ndarray) -> float:
    """100 x mean over pairs of max(cos(image_i, text_i), 0)."""
    a, b = np.asarray(image_emb, np.float64), np.asarray(text_emb, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"image embeddings {a.shape} and text embeddings {b.shape} must pair row by row")
    if not len(a):
        return float("nan")
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)).clip(1e-12)
    return float(100.0 * np.maximum(cos, 0.0).mean())


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) of two feature sets (rows: samples). The trace of
    the matrix root is that of the symmetric S_a^1/2 S_b S_a^1/2 (same eigenvalues), from eigenvalues: no
    complex round-off, and a singular covariance (fewer samples than dimensions) is fine."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"feature sets {a.shape} and {b.shape}: need >= 2 rows each of the same width")
    d = a.mean(0) - b.mean(0)
    sa, sb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    ra = _sqrt_psd(sa)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(ra @ sb @ ra), 0.0, None)).sum()
    return float(max(d @ d + np.trace(sa) + np.trace(sb) - 2.0 * cross, 0.0))


def t2i_metrics(clip, generated: list[Optional[np.ndarray]], real: list[Optional[np.ndarray]], captions: list[str],
                partners: list[int]) -> dict:
    """CLIPScore of generated images with their own captions (and with a swapped sample's caption: what a
    caption-blind model would score), of the real images with theirs (the reference), and the Fréchet
    distance between generated and real image embeddings. Images: uint8 arrays as the codec decodes them;
    None (not decodable) is left out and counted."""
    from PIL import Image

    from ..runtime import torch_threads

    kg = [i for i, x in enumerate(generated) if x is not None]
    kr = [i for i, x in enumerate(real) if x is not None]

    def embed(ims: list) -> np.ndarray:
        return clip.embed_images([clip.pixels(Image.fromarray(np.asarray(x, np.uint8)), "t2i") for x in ims])

    with torch_threads(1):  # a fixed thread count: the same floats every run
        g, r = embed([generated[i] for i in kg]), embed([real[i] for i in kr])
        t = clip.embed_texts(captions)
    return {"clip": clip.name, "n": len(generated), "undecodable": len(generated) - len(kg),
            "clipscore": {"generated": clip_score(g, t[kg]),
                          "generated_swapped_caption": clip_score(g, t[[partners[i] for i in kg]]),
                          "real": clip_score(r, t[kr])},
            "frechet_clip": frechet_distance(g, r) if len(kg) >= 2 and len(kr) >= 2 else float("nan")}
