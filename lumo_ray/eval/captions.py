"""Caption accuracy of a token LM (i2t / a2t): does a generated caption say what its input shows?

Grammar checks (decode compliance) only say a caption is well-formed. Here each generated caption is
parsed with the synthetic grammar (parse_caption below, built from lumo_ray.data.synth's words; the
fidelity gate parses the shards' captions with it too) into attributes (image: colour, shape, count,
position; audio: pitch, count, length) and scored per attribute against the input sample's attributes:

- generated: the caption of sample i against sample i's attributes;
- swapped (the floor): the same caption against another eval sample's attributes (a sample with
  another caption where there is one): a model that ignores its input scores there as it does at home;
- chance: the majority-class rate of the eval labels; ceiling: 1 (the reference captions parse to
  their own attributes by construction).

A caption outside the grammar (or one that does not decode) is wrong for every attribute, and counted.
Every attribute gets the fidelity gate's verdict (attribute_gate.gate: generated >= chance + fraction x
(ceiling - chance), above swapped, paired one-sided sign test p < max_p); FidelityConfig.gate_captions
decides whether the verdicts count in the fidelity verdict.

No Ray here.
"""
from __future__ import annotations

import re
from typing import Optional

import numpy as np

from ..config.lm import FidelityConfig
from ..data import synth
from .attribute_gate import attribute_row, gate

ATTRIBUTES = {"image": ("colour", "shape", "count", "position"), "audio": ("pitch", "count", "length")}
"""What a synthetic caption states, per modality."""
TASK = {"image": "i2t", "audio": "a2t"}
CEILING = 1.0
"""Reference captions read right on every attribute: they are the grammar's own sentences."""


# -- the grammar: lumo_ray.data.synth's words, as its image_caption / audio_caption put them ------

class CaptionError(ValueError):
    """A caption outside the synthetic vocabulary (the fidelity gate is for synthetic data)."""


def _alt(words) -> str:
    return "|".join(re.escape(w) for w in words)


_IMAGE_RE = re.compile(rf"^({_alt(synth.COUNT_WORDS)}) ({_alt(synth.COLOURS)}) ({_alt(synth.SHAPES)})(s?) "
                       rf"({_alt(synth.POSITION_WORDS.values())})$")
_AUDIO_RE = re.compile(rf"^({_alt(synth.COUNT_WORDS)}) ({_alt(synth.LENGTHS)}) ({_alt(synth.PITCHES)}) beep(s?)$")
_POSITION_OF = {v: k for k, v in synth.POSITION_WORDS.items()}


def parse_caption(modality: str, caption: str, sid: str = "?") -> dict:
    """Attributes of a synthetic caption: image {colour, shape, count, position}, audio {pitch, count,
    length}. Raises CaptionError naming the sample for anything else (number agreement included)."""
    text = " ".join(str(caption).strip().lower().rstrip(".").split())
    if modality == "image":
        m = _IMAGE_RE.match(text)
        if m:
            count = synth.COUNT_WORDS.index(m.group(1)) + 1
            if (m.group(4) == "s") == (count > 1):
                return {"colour": m.group(2), "shape": m.group(3), "count": count, "position": _POSITION_OF[m.group(5)]}
    elif modality == "audio":
        m = _AUDIO_RE.match(text)
        if m:
            count = synth.COUNT_WORDS.index(m.group(1)) + 1
            if (m.group(4) == "s") == (count > 1):
                return {"pitch": m.group(3), "count": count, "length": m.group(2)}
    else:
        raise ValueError(f"unknown modality {modality!r}: image or audio")
    raise CaptionError(f"sample {sid}: {modality} caption {caption!r} is not a synthetic caption "
                       f"(e.g. {synth.image_caption('circle', 'red', 2, 'left')!r} / "
                       f"{synth.audio_caption(3, 'short', 'high')!r}); the fidelity gate needs synthetic data")


# -- caption accuracy ---------------------------------------------------------------------------


def read_caption(modality: str, caption: Optional[str]) -> Optional[dict]:
    """The attributes a caption states, or None when it is not a sentence of the synthetic grammar."""
    if caption is None:
        return None
    try:
        return parse_caption(modality, caption)
    except CaptionError:
        return None


def swap_partners(items: list, seed: int, modality: str) -> list[int]:
    """For each item another item, with a different reference caption where there is one (seeded)."""
    from .gates import _swap_partners

    return _swap_partners([[it.caption] for it in items], np.random.default_rng([seed, len(modality), 31]))


def score_captions(modality: str, items: list, captions: list[Optional[str]], partners: list[int],
                   cfg: FidelityConfig) -> dict:
    """Per attribute: chance, ceiling (1), generated and swapped accuracy, the paired comparison and the gate's
    verdict; `pass` is every attribute's verdict and `gating` whether it counts (cfg.gate_captions).
    captions[i]: the text generated for items[i]'s input (None: not decodable); partners[i]: the item whose
    attributes give the floor."""
    n = len(items)
    if not (len(captions) == len(partners) == n):
        raise ValueError(f"{modality}: {n} items but {len(captions)} captions / {len(partners)} partners")
    read = [read_caption(modality, c) for c in captions]
    rep: dict = {"task": TASK[modality], "n": n, "unparseable": sum(r is None for r in read),
                 "gating": bool(cfg.gate_captions), "attributes": {}}
    ok = n > 0
    right: dict[str, list[bool]] = {}
    for a in ATTRIBUTES[modality]:
        truth = [it.attrs[a] for it in items]
        hit = np.array([r is not None and r[a] == t for r, t in zip(read, truth)], bool)
        floor = np.array([r is not None and r[a] == items[j].attrs[a] for r, j in zip(read, partners)], bool)
        row = attribute_row(truth, hit, floor, CEILING if n else float("nan"), True, cfg)
        row.update(gate(row, n, cfg))
        ok = ok and row["pass"]
        rep["attributes"][a] = row
        right[a] = hit.tolist()
    rep["pass"] = bool(ok)
    if n == 0:
        rep["reason"] = f"no {modality} eval samples"
    rep["samples"] = [{"id": it.id, "generated": c, "reference": it.caption, "read": r,
                       "right": {a: right[a][i] for a in ATTRIBUTES[modality]}, "swap_partner": items[j].id}
                      for i, (it, c, r, j) in enumerate(zip(items, captions, read, partners))]
    return rep


def generate_captions(run, modality: str, items: list, opts) -> list[Optional[str]]:
    """i2t / a2t captions of the items' media (their real eval codes), sampled with `opts` (no guidance: it
    is for t2x); a span that does not decode to text gives None."""
    from dataclasses import replace

    from ..generate import build_prompt, check_and_decode, generate_spans, task_spec

    task = TASK[modality]
    opts = replace(opts, guidance_scale=1.0)
    prompts = [build_prompt(run, task, media_ids=it.ids, sid=it.id) for it in items]
    spans = generate_spans(run, task, prompts, opts)
    spec = task_spec(run, task, opts)
    out = []
    for p, g in zip(prompts, spans):
        _, text = check_and_decode(run, spec, p, g)
        out.append(None if text is None else str(text))
    return out


def summary_lines(caps: dict) -> list[str]:
    lines = []
    for m, r in caps.items():
        if not r.get("attributes"):
            lines.append(f"  {r.get('task', m):5s} caption: {r.get('reason', 'no samples')}")
            continue
        for a, x in r["attributes"].items():
            verdict = ("PASS" if x["pass"] else f"FAIL ({x['reason']})") + ("" if r["gating"] else ", reported")
            lines.append(f"  {r['task']:5s} {a:8s} n={r['n']:3d} chance {x['chance']:.2f} generated {x['generated']:.2f} "
                         f"swapped {x['swapped']:.2f} (p {x['paired']['p']:.3g}; {r['unparseable']} unparseable)  {verdict}")
    return lines
