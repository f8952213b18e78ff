"""UTI audit (docs/gates.md): determinism (in-process and across processes), ranges, audio phase, shapes,
decode checks, reconstruction metrics on aligned signals, and baseline regression.

Nothing non-finite is dropped: a decoded sample with NaN / inf fails the decode check naming the
input, and a metric mean over inputs is NaN (a FAIL) when any input's metric is. Regression runs
against `--baseline FILE`, or by default against the baseline committed for the configuration
(lumo_ray/assets/audit_baselines/<token-space hash>.json, applied when the audit inputs encode to
the same ids as when it was written); `--baseline none` skips it and the report says so. A metric
the baseline has and the run lacks fails.

With the trained tiny VQ image preset (uti.image = vq / tiny / seed 0 / codebook 256, the shipped
weights) the audit also gates its reconstruction of held-out synthetic shape images (drawn like
lumo_ray.data.synth, seed SYNTH_EVAL_SEED) at the preset resolution: PSNR >= TINY_VQ_PSNR_FLOOR dB
and SSIM >= TINY_VQ_SSIM_FLOOR; real-image PSNR / SSIM are reported without a floor. Likewise with the
fitted tiny EnCodec preset (uti.audio = tiny-24k / seed 0, the shipped weights): held-out synthetic beep
clips (seed SYNTH_EVAL_SEED) encoded and decoded at the configured bandwidth must keep SNR >=
TINY_AUDIO_SNR_FLOOR dB, log-mel L1 <= TINY_AUDIO_LOG_MEL_CEILING, and the waveform probe
(lumo_ray.eval.beep_probe) must read count, length and pitch back at >= TINY_AUDIO_PROBE_FLOOR each;
real-clip SNR / log-mel L1 are reported without a floor."""
from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..codecs.base import uses_tiny_audio_weights, uses_tiny_vq_weights
from ..config import LumoConfig, dump_config, load_config
from ..packaged import ASSETS
from ..runtime import torch_threads
from ..storage import write_file
from ..uti import Adapters, build_adapters, build_token_space
from . import metrics

AUDIO_EXT = (".wav", ".flac", ".ogg")
TEXTS = ["a bike greeting card", "Three short high beeps.", "Wind blowing, bird chirping in a distance!",
         "unicode: café — ok", ""]

# Regression rules of the audit (docs/stage3_uti.md): metric -> (direction, tolerance kind, tolerance)
RULES = {"audio_snr_db": ("min", "abs", 1.0), "audio_log_mel_l1": ("max", "rel", 1.05),
         "image_psnr": ("min", "abs", 0.5), "image_ssim": ("min", "abs", 0.02)}


# Floors of the trained tiny VQ preset on synthetic shape images (the audit, the tiny codec's contract)
TINY_VQ_PSNR_FLOOR = 22.0    # dB, mean over the synthetic eval images
TINY_VQ_SSIM_FLOOR = 0.70    # mean SSIM (7x7 window on luma)
TINY_VQ_RESOLUTION = 32      # the floors hold at the preset resolution
SYNTH_EVAL_SEED = 2000       # held out: training draws seed 1000, the demo seeds 0-2
SYNTH_EVAL_IMAGES = 32
# Floors of the fitted tiny EnCodec preset on synthetic beeps (measured on the shipped weights, 48 clips
# seed 2000: 19.0 dB / log-mel L1 2.60 at 1.5 kbps, 19.3 dB / 2.18 at 3 kbps, probe 1.00 on every
# attribute; the random init: -7.3 dB / 5.47, probe count 0.00 length 0.00 pitch 0.50)
TINY_AUDIO_SNR_FLOOR = 15.0         # dB, mean over the synthetic eval clips (16 kHz mono, aligned)
TINY_AUDIO_LOG_MEL_CEILING = 3.0    # mean log-mel L1 (the audit's: 16 kHz, 64 mels)
TINY_AUDIO_PROBE_FLOOR = 0.95       # waveform-probe accuracy on each of count, length, pitch
SYNTH_EVAL_CLIPS = 24
# committed baselines, one per token space: a `--write-baseline` run's baseline.json saved as <hash>.json
BASELINES = ASSETS / "audit_baselines"


def tiny_vq_floor_check(adapter: Any, n: int = SYNTH_EVAL_IMAGES, seed: int = SYNTH_EVAL_SEED) -> dict:
    """Reconstruction of n synthetic shape images through the adapter (encode -> decode, compared
    with the preprocessed input) against the tiny preset's floors."""
    from ..data.synth import synthetic_shape_images

    r = metrics.reconstruction_metrics(adapter, synthetic_shape_images(n, seed, adapter))
    psnr_ok = r["psnr"] is not None and math.isfinite(r["psnr"]) and r["psnr"] >= TINY_VQ_PSNR_FLOOR
    ssim_ok = r["ssim"] is not None and math.isfinite(r["ssim"]) and r["ssim"] >= TINY_VQ_SSIM_FLOOR
    return {"psnr": r["psnr"], "ssim": r["ssim"], "n": r["n"], "seed": seed, "codes_used": r["codes_used"],
            "psnr_floor": TINY_VQ_PSNR_FLOOR, "ssim_floor": TINY_VQ_SSIM_FLOOR,
            "psnr_pass": bool(psnr_ok), "ssim_pass": bool(ssim_ok)}


def tiny_audio_floor_check(adapter: Any, n: int = SYNTH_EVAL_CLIPS, seed: int = SYNTH_EVAL_SEED) -> dict:
    """Reconstruction of n synthetic beep clips through the adapter (encode -> decode at its bandwidth):
    SNR, log-mel L1 and what the waveform probe reads, against the tiny audio preset's floors."""
    from ..data.synth import synthetic_beeps
    from .beep_probe import probe_codec

    wavs, truths = synthetic_beeps(n, seed)
    r = probe_codec(adapter, wavs, truths)
    snr, lm, acc = r["snr_db"], r["log_mel_l1"], r["accuracy"]
    return {"snr_db": snr, "log_mel_l1": lm, "probe": acc, "n": r["n"], "seed": seed,
            "bandwidth": float(adapter.bandwidth), "snr_floor": TINY_AUDIO_SNR_FLOOR,
            "log_mel_ceiling": TINY_AUDIO_LOG_MEL_CEILING, "probe_floor": TINY_AUDIO_PROBE_FLOOR,
            "snr_pass": bool(math.isfinite(snr) and snr >= TINY_AUDIO_SNR_FLOOR),
            "log_mel_pass": bool(math.isfinite(lm) and lm <= TINY_AUDIO_LOG_MEL_CEILING),
            "probe_pass": all(v >= TINY_AUDIO_PROBE_FLOOR for v in acc.values())}


def _sha(a: np.ndarray | list) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(a, dtype=np.int64)).tobytes()).hexdigest()


def audit_inputs(cfg: LumoConfig, adapters: Adapters) -> dict[str, list]:
    """Real clips/images from the data folder plus generated signals: (name, payload) lists."""
    from ..packaged import real_data_dir

    real = real_data_dir(cfg.audit.real_data)
    out: dict[str, list] = {"audio": [], "image": []}
    if adapters.audio is not None:
        files = sorted(p for p in real.rglob("*") if p.suffix.lower() in AUDIO_EXT)[: cfg.audit.max_real_audio]
        out["audio"] += [(f"real:{p.relative_to(real)}", str(p)) for p in files]
        sr, n = 24000, int(24000 * 1.5)
        t = np.arange(n) / sr
        rng = np.random.default_rng(cfg.audit.seed)
        sweep = 0.5 * np.sin(2 * np.pi * (100 * t + (4000 - 100) / (2 * t[-1]) * t ** 2))
        out["audio"] += [("gen:sine_sweep", (sweep.astype(np.float32)[None], sr)),
                         ("gen:silence", (np.zeros((1, n), np.float32), sr)),
                         ("gen:noise", ((0.3 * rng.standard_normal(n)).astype(np.float32)[None], sr))]
    if adapters.image is not None:
        files = sorted((real / "llava_pretrain" / "images").glob("*.png"))[: cfg.audit.max_real_images]
        out["image"] += [(f"real:{p.relative_to(real)}", str(p)) for p in files]
        g = np.linspace(0, 255, 96, dtype=np.float64)
        grad = np.stack([np.tile(g, (96, 1)), np.tile(g[:, None], (1, 96)), np.full((96, 96), 128.0)], -1)
        out["image"] += [("gen:solid", Image.new("RGB", (96, 96), (200, 40, 60))),
                         ("gen:gradient", Image.fromarray(grad.astype(np.uint8)))]
    return out


def _prep_audio(a, name, payload):
    return a.load(payload) if isinstance(payload, str) else a.prepare(payload[0], payload[1], name)


def _prep_image(a, name, payload):
    return a.load(payload) if isinstance(payload, str) else a.prepare(payload, name)


def token_hashes(cfg: LumoConfig) -> dict[str, str]:
    """sha256 of the global ids of every audit input (what the cross-process check compares)."""
    adapters = build_adapters(cfg.uti)
    ts = build_token_space(cfg.uti, adapters)
    inputs = audit_inputs(cfg, adapters)
    out = {"token_space": ts.hash}
    if adapters.text is not None:
        for i, t in enumerate(TEXTS):
            out[f"text:{i}"] = _sha(adapters.text.encode(t))
    if inputs["audio"]:
        clips = [_prep_audio(adapters.audio, n, p) for n, p in inputs["audio"]]
        for (n, _), c in zip(inputs["audio"], adapters.audio.encode_batch(clips)):
            out[n] = _sha(ts.audio_to_global(c.codes))
    if inputs["image"]:
        imgs = [_prep_image(adapters.image, n, p) for n, p in inputs["image"]]
        for (n, _), c in zip(inputs["image"], adapters.image.encode_batch(imgs)):
            out[n] = _sha(ts.image_to_global(c))
    return out


def _mean(xs: list[float | None]) -> float | None:
    """Mean over the inputs that have the metric (None: undefined, e.g. SNR of a silent input); NaN when
    any of them is non-finite, never dropped."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return float(np.mean(xs)) if all(math.isfinite(x) for x in xs) else float("nan")


def inputs_digest(hashes: dict[str, str]) -> str:
    """Digest of the audit inputs as encoded (names -> id hashes, with the token-space hash)."""
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def committed_baseline(ts_hash: str) -> Path:
    return BASELINES / f"{ts_hash}.json"


def run_audit(cfg: LumoConfig, out_dir: str | Path, baseline: str | None = None,
              write_baseline: bool = False, log=print) -> dict:
    """baseline: a baseline.json path, None = the committed one for this configuration, 'none' = skip."""
    with torch_threads(cfg.uti.runtime.threads):
        return _run_audit(cfg, out_dir, baseline, write_baseline, log)


def _run_audit(cfg: LumoConfig, out_dir: str | Path, baseline: str | None, write_baseline: bool, log) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = dump_config(cfg, out)
    log("[audit] building adapters")
    adapters = build_adapters(cfg.uti)
    ts = build_token_space(cfg.uti, adapters)
    ts.save(out)
    inputs = audit_inputs(cfg, adapters)
    checks: dict[str, bool] = {}
    details: dict[str, Any] = {}
    per_input: dict[str, dict] = {}
    m: dict[str, list] = {k: [] for k in RULES}
    non_finite: list[str] = []  # "input: what" for every non-finite decode or metric
    extra: dict[str, float | None] = {}  # reported metrics outside the regression rules

    if adapters.text is not None:
        tx = adapters.text
        ids = [tx.encode(t) for t in TEXTS]
        checks["text_determinism"] = all(tx.encode(t) == i for t, i in zip(TEXTS, ids))
        checks["text_range"] = all(ts.check_ids(np.asarray(i, np.int64), "text") == [] for i in ids)
        checks["text_roundtrip"] = all(tx.decode(i) == t for t, i in zip(TEXTS, ids))

    if inputs["audio"]:
        log(f"[audit] audio: {len(inputs['audio'])} inputs")
        a = adapters.audio
        clips = [_prep_audio(a, n, p) for n, p in inputs["audio"]]
        codes1 = a.encode_batch(clips)
        codes2 = a.encode_batch(clips)
        checks["audio_determinism"] = all(np.array_equal(x.codes, y.codes) for x, y in zip(codes1, codes2))
        rng_ok = phase_ok = shape_ok = dec_ok = True
        for (name, _), clip, c in zip(inputs["audio"], clips, codes1):
            frames = clip.wav.shape[1] // a.samples_per_frame  # clip frames; 48 kHz chunking gives more code frames
            shape_ok &= c.codes.shape == (a.num_codebooks, a.code_frames(frames))
            rng_ok &= bool(c.codes.min() >= 0 and c.codes.max() < a.codebook_size)
            flat = ts.audio_to_global(c.codes)
            phase_ok &= ts.audio_phase_errors(flat) == [] and np.array_equal(ts.global_to_audio(flat), c.codes)
            wav = a.decode(c)
            ok = wav.shape == (a.channels, frames * a.samples_per_frame) and wav.dtype == np.float32
            dec_ok &= bool(ok)
            if not np.isfinite(wav).all():
                non_finite.append(f"{name}: decoded audio has {int((~np.isfinite(wav)).sum())} non-finite samples")
            ref, est = metrics.align_audio(clip.wav, a.sample_rate, wav, a.sample_rate, 16000)
            silent = float(np.max(np.abs(ref))) == 0.0
            snr = None if silent else metrics.snr_db(ref, est)
            lm = metrics.log_mel_l1(ref, est, 16000)
            per_input[name] = {"frames": int(c.codes.shape[1]), "tokens_sha256": _sha(flat), "snr_db": snr,
                               "log_mel_l1": lm, "decoded_shape": list(wav.shape), "record": clip.record}
            m["audio_snr_db"].append(snr)
            m["audio_log_mel_l1"].append(lm)
        import soundfile as sf
        sf.write(out / "recon.wav", wav.T, a.sample_rate, subtype="FLOAT")
        checks.update(audio_range=rng_ok, audio_phase=phase_ok, audio_shape=shape_ok,
                      audio_decode_rate_channels_length=dec_ok)
        real = [v for k, v in per_input.items() if k.startswith("real:")]
        extra["audio_real_snr_db"] = _mean([v["snr_db"] for v in real])
        extra["audio_real_log_mel_l1"] = _mean([v["log_mel_l1"] for v in real])
        if uses_tiny_audio_weights(cfg.uti.audio):
            fl = tiny_audio_floor_check(a)
            extra.update(audio_synth_snr_db=fl["snr_db"], audio_synth_log_mel_l1=fl["log_mel_l1"],
                         **{f"audio_synth_probe_{k}": v for k, v in fl["probe"].items()})
            checks["audio_tiny_synth_snr_floor"] = fl["snr_pass"]
            checks["audio_tiny_synth_log_mel_ceiling"] = fl["log_mel_pass"]
            checks["audio_tiny_synth_probe_floor"] = fl["probe_pass"]
            details["audio_tiny_synth"] = fl
            log(f"[audit] tiny audio synthetic reconstruction at {fl['bandwidth']:g} kbps: SNR {fl['snr_db']:.2f} dB "
                f"(floor {TINY_AUDIO_SNR_FLOOR}), log-mel L1 {fl['log_mel_l1']:.3f} "
                f"(ceiling {TINY_AUDIO_LOG_MEL_CEILING}), probe count {fl['probe']['count']:.2f} length "
                f"{fl['probe']['length']:.2f} pitch {fl['probe']['pitch']:.2f} (floor {TINY_AUDIO_PROBE_FLOOR}) "
                f"on {fl['n']} clips")

    if inputs["image"]:
        log(f"[audit] image: {len(inputs['image'])} inputs")
        im = adapters.image
        imgs = [_prep_image(im, n, p) for n, p in inputs["image"]]
        c1 = im.encode_batch(imgs)
        c2 = im.encode_batch(imgs)
        checks["image_determinism"] = all(np.array_equal(x, y) for x, y in zip(c1, c2))
        checks["image_range"] = all(ts.check_ids(ts.image_to_global(c), "image") == [] for c in c1)
        checks["image_shape"] = all(c.shape == (im.tokens_per_image,) for c in c1)
        if not getattr(im, "decodable", True):  # clip_kmeans: semantic tokens, no pixels to compare
            for (name, _), x, c in zip(inputs["image"], imgs, c1):
                per_input[name] = {"tokens_sha256": _sha(c), "record": x.record}
            details["image_decode"] = "none (encode-only image tokenizer)"
        else:
            size_ok = True
            for (name, _), x, c in zip(inputs["image"], imgs, c1):
                dec = im.decode(c, seed=cfg.audit.seed)
                size_ok &= dec.shape == (im.image_size, im.image_size, 3) and dec.dtype == np.uint8
                rec = {"tokens_sha256": _sha(c), "decoded_shape": list(dec.shape), "record": x.record}
                if im.deterministic_decode:
                    ref = (np.transpose(x.pixels, (1, 2, 0)) * 255.0).round().clip(0, 255)
                    rec.update(psnr=metrics.psnr(ref, dec), ssim=metrics.ssim(ref, dec))
                    m["image_psnr"].append(rec["psnr"])
                    m["image_ssim"].append(rec["ssim"])
                per_input[name] = rec
                if not np.isfinite(np.asarray(dec, np.float64)).all():
                    non_finite.append(f"{name}: decoded image has non-finite pixels")
            Image.fromarray(dec).save(out / "recon.png")
            checks["image_decode_size"] = bool(size_ok)
            if im.deterministic_decode:
                checks["image_decode_repeatable"] = np.array_equal(im.decode(c1[0], seed=0), im.decode(c1[0], seed=0))
                details["image_decode"] = "deterministic"
                real = [v for k, v in per_input.items() if k.startswith("real:") and "psnr" in v]
                extra["image_real_psnr"] = _mean([v["psnr"] for v in real])
                extra["image_real_ssim"] = _mean([v["ssim"] for v in real])
            if uses_tiny_vq_weights(cfg.uti.image):
                fl = tiny_vq_floor_check(im)
                extra.update(image_synth_psnr=fl["psnr"], image_synth_ssim=fl["ssim"])
                if im.image_size == TINY_VQ_RESOLUTION:
                    checks["image_tiny_synth_psnr_floor"] = fl["psnr_pass"]
                    checks["image_tiny_synth_ssim_floor"] = fl["ssim_pass"]
                    log(f"[audit] tiny VQ synthetic reconstruction: PSNR {fl['psnr']:.2f} dB (floor {TINY_VQ_PSNR_FLOOR}), "
                        f"SSIM {fl['ssim']:.3f} (floor {TINY_VQ_SSIM_FLOOR}) on {fl['n']} images")
                else:
                    fl["note"] = f"floors apply at resolution {TINY_VQ_RESOLUTION}; reported only"
                details["image_tiny_synth"] = fl
            else:
                # Diffusion decoding is stochastic: repeatable for a seed, different across seeds; no PSNR/SSIM.
                checks["image_decode_repeatable_for_seed"] = np.array_equal(im.decode(c1[0], seed=1), im.decode(c1[0], seed=1))
                details["image_decode"] = "stochastic (seeded diffusion); PSNR/SSIM not computed"

    log("[audit] cross-process determinism")
    here = token_hashes(cfg)
    proc = subprocess.run([sys.executable, "-m", "lumo_ray.eval.audit", str(cfg_path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        checks["determinism_across_processes"] = False
        details["child_error"] = proc.stderr[-2000:]
    else:
        there = json.loads(proc.stdout.strip().splitlines()[-1])
        diff = sorted(k for k in set(here) | set(there) if here.get(k) != there.get(k))
        checks["determinism_across_processes"] = not diff
        details["cross_process_differences"] = diff
    checks["token_space_hash_stable"] = here["token_space"] == ts.hash

    summary = {**{k: _mean(v) for k, v in m.items()}, **extra}
    for name, rec in per_input.items():
        non_finite += [f"{name}: {k} = {rec[k]}" for k in ("snr_db", "log_mel_l1", "psnr", "ssim")
                       if rec.get(k) is not None and not math.isfinite(rec[k])]
    non_finite += [f"{k} = {v}" for k, v in extra.items() if v is not None and not math.isfinite(v)]
    checks["finite_decodes_and_metrics"] = not non_finite
    details["non_finite"] = non_finite
    digest = inputs_digest(here)
    base_path, base_note = _pick_baseline(baseline, ts.hash)
    base = json.loads(Path(base_path).read_text()) if base_path else None
    if base is not None and baseline is None and base.get("inputs_sha256") != digest:
        base_path, base = None, None  # the committed baseline measured other inputs
        base_note = f"committed baseline for token space {ts.hash[:12]} measured other inputs (audit.real_data); not applied"
    regression: dict[str, Any] = {}
    if base is not None:
        regression = compare_to_baseline(summary, base.get("metrics", {}))
        checks["baseline_regression"] = all(r["pass"] for r in regression.values())
        if base.get("token_space_hash") and base["token_space_hash"] != ts.hash:
            checks["baseline_token_space_hash"] = False
            details["baseline_hash_mismatch"] = {"baseline": base["token_space_hash"], "run": ts.hash}
    details["baseline"] = base_note
    log(f"[audit] baseline: {base_note}")

    report = {"pass": all(checks.values()), "token_space_hash": ts.hash, "checks": checks,
              "metrics": summary, "per_input": per_input, "regression": regression, "details": details,
              "baseline": str(base_path) if base_path else None, "inputs_sha256": digest}
    write_file(out / "report.json", json.dumps(report, indent=2, default=float) + "\n")
    if write_baseline:
        write_file(out / "baseline.json", json.dumps(
            {"token_space_hash": ts.hash, "inputs_sha256": digest, "metrics": summary}, indent=2) + "\n")
    return report


def _pick_baseline(baseline: str | None, ts_hash: str) -> tuple[str | None, str]:
    """(path or None, what the report says about it)."""
    if baseline is not None and str(baseline).lower() == "none":
        return None, "skipped (--baseline none): reconstruction regression not gated"
    if baseline:
        return str(baseline), f"applied: {baseline}"
    committed = committed_baseline(ts_hash)
    if committed.exists():
        return str(committed), f"applied: committed baseline {committed.name}"
    return None, (f"none committed for token space {ts_hash[:12]}: reconstruction regression not gated "
                  "(pass --baseline FILE from an earlier `--write-baseline` run)")


def compare_to_baseline(run: dict, base: dict) -> dict:
    """Apply the audit's regression rules metric by metric. A metric the baseline lacks is skipped; one
    the baseline has and the run lacks (or has as NaN) fails."""
    res = {}
    for k, (direction, kind, tol) in RULES.items():
        if base.get(k) is None:
            continue
        b = base[k]
        if run.get(k) is None:
            res[k] = {"run": None, "baseline": b, "bound": None, "rule": "missing in this run", "pass": False}
            continue
        bound = (b - tol if kind == "abs" else b * tol) if direction == "min" else (b + tol if kind == "abs" else b * tol)
        ok = run[k] >= bound if direction == "min" else run[k] <= bound
        res[k] = {"run": run[k], "baseline": b, "bound": bound, "rule": f"{'>=' if direction == 'min' else '<='} {bound:.6g}",
                  "pass": bool(ok)}
    return res


if __name__ == "__main__":  # child of the cross-process determinism check
    _cfg = load_config(LumoConfig, sys.argv[1])
    with torch_threads(_cfg.uti.runtime.threads):
        print(json.dumps(token_hashes(_cfg)))
