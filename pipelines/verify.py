"""`lumo data verify`: the data gate. Every shard is checked in full on Ray Data (one task per shard);
re-tokenize consistency, decode spot checks, leakage, length statistics and drift run on the driver.
`--shards`, `--out`, `--manifest` and `--baseline` may be local paths or object-store URIs."""
from __future__ import annotations

import json
import tarfile

import numpy as np
import ray

from lumo_ray.codecs.base import AudioCodes
from lumo_ray.config import LumoConfig, dump_config, load_config
from lumo_ray.data.manifest import read_manifest
from lumo_ray.data.shards import load_index, read_verified, sample_key
from lumo_ray.data.tokenize import SampleTokenizer, plan_shards, plan_units
from lumo_ray.data.verify import MAX_LISTED, check_shard, drift, leakage, length_stats
from lumo_ray.resources import task_resources
from lumo_ray.runtime import Progress
from lumo_ray.storage import PathLike, local_file, locate
from lumo_ray.token_space import TokenSpace

from .ray_env import init_ray
from .status import require_fit


def _check_row(row: dict) -> dict:
    r = check_shard(row["path"], json.loads(row["ts"]), row["sha256"], int(row["samples"]))
    return {"result": json.dumps(r)}


def _raw_members(path: PathLike) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with locate(path).open_read() as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
        for m in tar:
            if m.isfile():
                out.setdefault(m.name.partition(".")[0], {})[m.name] = tar.extractfile(m).read()
    return out


def _decode_problem(tok: SampleTokenizer, ts: TokenSpace, smp: dict, m: str, seed: int) -> str | None:
    """Decode one stored span; a description of what went wrong, or None."""
    try:
        if m == "audio":
            a = tok.adapters.audio
            codes = ts.global_to_audio(smp["audio"].astype(np.int64))
            wav = a.decode(AudioCodes(codes, smp["json"].get("side_info", {}).get("audio", {})))
            if wav.shape != (a.channels, a.clip_frames(codes.shape[1]) * a.samples_per_frame) or not np.isfinite(wav).all():
                return f"audio decoded to {wav.shape}"
        else:
            im = tok.adapters.image
            img = im.decode(ts.global_to_image(smp["image"].astype(np.int64)), seed=seed)
            if img.shape != (im.image_size, im.image_size, 3):
                return f"image decoded to {img.shape}"
    except Exception as e:  # a failed decode is the finding, not a crash of the gate
        return f"{m} decode failed: {type(e).__name__}: {e}"
    return None


def _check(ok: bool, summary: str, **details) -> dict:
    return {"pass": bool(ok), "summary": summary, **details}


def spot_check_choice(results: list[dict], n: int, seed: int, modalities: list[str]) -> dict[str, dict[str, list]]:
    """{shard: {sample id: [modality, ...]}}: per modality n records drawn by seed (all when fewer) from
    the shards without problems (check_shard results: ids and lengths are parallel lists)."""
    out: dict[str, dict[str, list]] = {}
    for k, m in enumerate(modalities):
        cands = sorted((r["shard"], str(ident[0])) for r in results if not r["problems"]
                       for ident, lengths in zip(r["ids"], r["lengths"]) if m in lengths[1])
        for i in sorted(np.random.default_rng([seed, 5, k]).permutation(len(cands))[:n]):
            shard, sid = cands[i]
            out.setdefault(shard, {}).setdefault(sid, []).append(m)
    return out


def run_verify(shards_dir: PathLike, cfg: LumoConfig, out_dir: PathLike, manifest: str | None = None,
               baseline: str | None = None, write_baseline: bool = False, address: str | None = None,
               log=print) -> dict:
    shards_dir, out = locate(shards_dir), locate(out_dir)
    dump_config(cfg, out)
    vcfg = cfg.data.verify
    checks: dict[str, dict] = {}
    index = load_index(shards_dir)
    tok = SampleTokenizer(cfg.uti)
    ts = tok.ts
    ts_shards = TokenSpace.from_json(json.loads((shards_dir / "token_space.json").read_text()))
    hash_ok = index["token_space_hash"] == ts.hash == ts_shards.hash
    checks["token_space"] = _check(hash_ok, "index, token_space.json and config agree" if hash_ok else
                                   f"run {ts.hash} vs index {index['token_space_hash']} vs shards {ts_shards.hash}")

    # 1. Every record of every shard (Ray Data: one task per shard).
    init_ray(address)
    require_fit([task_resources("verify", vcfg)])
    rows = [{"path": str(shards_dir / s["name"]), "sha256": s["sha256"], "samples": s["samples"],
             "ts": json.dumps(ts_shards.to_json())} for s in index["shards"]]
    log(f"[verify] checking {len(rows)} shards, {index['totals']['samples']} records")
    results = []
    bar = Progress(len(rows), "[verify] shards", "shards", log)
    for r in ray.data.from_items(rows, override_num_blocks=max(1, len(rows))).map(
            _check_row, **task_resources("verify", vcfg).ray_options()).iter_rows():
        results.append(json.loads(r["result"]))
        n_done = len(results)
        bar.update(n_done, lambda: f"[verify] {n_done}/{len(rows)} shards checked "
                                   f"({bar.rate(n_done)})")
    bar.close()
    results.sort(key=lambda r: r["shard"])
    problems = [p for r in results for p in r["problems"]]
    n = sum(r["samples"] for r in results)
    checks["records"] = _check(not problems, f"{n} records checked, {len(problems)} problem(s)",
                               records=n, problems=problems[:MAX_LISTED])
    ids = [tuple(x) for r in results for x in r["ids"]]
    leak = leakage(ids)
    checks["leakage"] = _check(not any(leak.values()), "no id or group in both splits" if not any(leak.values())
                               else f"{len(leak['ids_in_both'])} ids, {len(leak['groups_in_both'])} groups in both splits",
                               **leak)

    # 2. Re-tokenize a seeded sample from the raw files.
    manifest = manifest or (json.loads((shards_dir / "source.json").read_text())["manifest"]
                            if (shards_dir / "source.json").exists() else None)
    if manifest:
        all_recs, _ = read_manifest(manifest)
        stored = {sid for sid, _, _ in ids}
        recs = [r for r in all_recs if r.id in stored]
        # The shard plan and batch cut of the run that wrote these shards (its resolved config).
        tcfg = cfg.data.tokenize
        if (shards_dir / "config.yaml").exists():
            with local_file(shards_dir / "config.yaml") as p:
                tcfg = load_config(LumoConfig, p).data.tokenize
        rng = np.random.default_rng(vcfg.seed)
        pick = sorted(rng.choice(len(recs), size=min(vcfg.retokenize_n, len(recs)), replace=False).tolist()) if recs else []
        raw = {}
        for s in index["shards"]:
            try:
                raw.update(_raw_members(shards_dir / s["name"]))
            except (tarfile.TarError, OSError) as e:  # already a records problem; its samples count as mismatches
                log(f"[verify] {s['name']} unreadable: {e}")
        # Re-run each picked record inside its original model batch (shard plan + unit cut), as tokenize did.
        picked = {recs[i].id for i in pick}
        mism = []
        for shard_recs in plan_shards(all_recs, tcfg.shard_size).values():
            for unit in plan_units(shard_recs, tcfg.batch_size):
                if picked.isdisjoint(r.id for r in unit):
                    continue
                for r, res in zip(unit, tok.tokenize([tok.load(x.to_dict()) for x in unit])):
                    if r.id in picked and res.get("members") != raw.get(sample_key(r.id)):
                        mism.append(r.id)
        sel = sorted(picked)
        log(f"[verify] re-tokenized {len(sel)} records from the raw files")
        rate = len(mism) / len(sel) if sel else 0.0
        checks["retokenize"] = _check(bool(sel) and rate <= vcfg.max_mismatch,
                                      f"{len(sel)} re-tokenized, {len(mism)} mismatched ({rate:.2%})",
                                      n=len(sel), mismatched=mism[:MAX_LISTED], rate=rate)
    else:
        checks["retokenize"] = _check(False, "no manifest given (and no source.json beside the shards)")

    # 3. Decode spot checks: N audio and N image spans chosen by vcfg.seed over every record of the
    #    shards that read cleanly (not the first N, which would always be the same few sources). An
    #    encode-only image tokenizer (clip_kmeans) has nothing to decode: its spans are not drawn.
    dec_probs, n_dec = [], 0
    chosen = spot_check_choice(results, vcfg.decode_spot_checks, vcfg.seed,
                               [m for m in ("audio", "image") if getattr(tok.adapters, m) is not None
                                and (m != "image" or ts.image_decodable)])
    entries = {str(shards_dir / s["name"]): s for s in index["shards"]}
    for shard, picks in sorted(chosen.items()):
        for smp in read_verified(shards_dir, entries[shard]):
            sid = (smp.get("json") or {}).get("id", smp["__key__"])
            for m in picks.get(sid, ()):
                n_dec += 1
                problem = _decode_problem(tok, ts, smp, m, vcfg.seed)
                if problem:
                    dec_probs.append(f"{sid}: {problem}")
    checks["decode"] = _check(not dec_probs, f"{n_dec} decoded, {len(dec_probs)} failed", problems=dec_probs,
                              ids=sorted({sid for p in chosen.values() for sid in p})[:MAX_LISTED])

    # 4. Length statistics and drift.
    stats = length_stats([tuple(x) for r in results for x in r["lengths"]])
    if baseline:
        d = drift(stats, json.loads(locate(baseline).read_text())["length_stats"], vcfg.drift_tolerance)
        checks["drift"] = _check(not d, f"{len(d)} length statistic(s) drifted beyond {vcfg.drift_tolerance:.0%}",
                                 drifted=d)
    report = {"pass": all(c["pass"] for c in checks.values()), "token_space_hash": ts.hash, "checks": checks,
              "length_stats": stats, "shards": len(rows), "records": n}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if write_baseline:
        (out / "baseline.json").write_text(json.dumps({"length_stats": stats}, indent=2) + "\n")
    return report
