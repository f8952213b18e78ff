"""Classifier-free guidance, measured: per-attribute generation fidelity (lumo_ray/eval/fidelity.py) of a
stage-4 run at several guidance scales. The table in docs/stage4_mmpt.md comes from this script.

  # fidelity at guidance 1 (none) and 3 on a stage-4 run
  python -m benchmarks.cfg_fidelity --run runs/demo/mmpt/mmpt --out runs/cfg_fidelity --scales 1 3

  # first train a stage-4 run as `lumo demo` does (its DEMO_MMPT settings, --set items last) from a demo's
  # stage-3.3 directory (runs/demo/lm: token_lm/, data/shards, lm/export), with the demo's stage-4 and
  # generate gates (modality ablation, fidelity, decode compliance, prompt ablation), then the scales
  python -m benchmarks.cfg_fidelity --train-from runs/demo/lm --out runs/cfg --scales 1 3 \\
      --set token_lm.seq.caption_dropout=0.1

Writes <out>/scale_<s>/ (each fidelity report) and <out>/cfg_fidelity.{json,md}; prints the table.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path


def train_stage4(lm_dir: Path, out: Path, sets: list[str]) -> tuple[Path, dict]:
    """The demo's stage 4 (mmpt + generate stages) from a demo's lm directory; returns (run, gates)."""
    from lumo_ray.config.recipes import DEMO_DATA
    from lumo_ray.cli.demo.mmpt import mmpt_demo_config, run_mmpt_demo
    from lumo_ray.cli.demo.run import stage_generate

    shards = lm_dir / "data" / "shards"
    cfg = mmpt_demo_config(DEMO_DATA, None, sets)
    t0 = time.time()
    res = run_mmpt_demo(out, shards, lm_dir / "token_lm", lm_dir / "lm" / "export", cfg)
    gates = {"mmpt": {k: v.get("pass") for k, v in res["stages"].items()}, "mmpt_seconds": round(time.time() - t0, 1)}
    gen = stage_generate(cfg, out / "generate", print, res["run"], str(shards))
    gates["generate"] = gen
    gates["pass"] = bool(res["pass"] and gen["pass"])
    print(f"stage 4 + generate gates: {'PASS' if gates['pass'] else 'FAIL'} {json.dumps(gates)}")
    return Path(res["run"]), gates


def measure(run_dir: Path, out: Path, scales: list[float], n: int | None, seed: int | None,
            reuse: bool = False) -> dict:
    """Fidelity per scale; per attribute also `hits` (generated read right, per eval sample) for the paired
    comparison with the first scale. reuse: read <out>/scale_<s>/report.json where it exists."""
    from lumo_ray.data.mix import primary
    from lumo_ray.eval.fidelity import load_items, run_fidelity
    from lumo_ray.generate import load_run

    run = load_run(run_dir)
    reps = {}
    truth = None
    for s in scales:
        fc = copy.deepcopy(run.cfg.token_lm.fidelity)
        fc.guidance_scale = float(s)
        if n is not None:
            fc.n = n
        if seed is not None:
            fc.seed = seed
        if truth is None:
            ev = load_items(primary(run.cfg.token_lm.shards), run.ts, fc.split, run.adapters.text.decode)
            truth = {m: {it.id: it.attrs for it in items} for m, items in ev.items()}
        t0 = time.time()
        f = out / f"scale_{s:g}" / "report.json"
        rep = (json.loads(f.read_text()) if reuse and f.exists()
               else run_fidelity(run, out / f"scale_{s:g}", fc, log=lambda *a, **k: None))
        reps[s] = {"pass": rep["pass"], "seconds": round(time.time() - t0, 1),
                   "hits": {f"{m}.{a}": [int(pv == str(truth[m][i][a])) for pv, i in zip(pr, r["ids"])]
                            for m, r in rep["modalities"].items()
                            for a, pr in r.get("predictions", {}).get("generated", {}).items()},
                   "attributes": {f"{m}.{a}": {k: x.get(k) for k in ("chance", "ceiling", "generated", "swapped",
                                                                     "gated", "pass")} | {"p": x["paired"]["p"]}
                                  for m, r in rep["modalities"].items() for a, x in r.get("attributes", {}).items()},
                   "n": rep["n"]}
        print(f"guidance {s:g}: fidelity gate {'PASS' if rep['pass'] else 'FAIL'} ({reps[s]['seconds']} s)")
    return {"run": str(run_dir), "scales": reps}


def paired_table(res: dict) -> str:
    """Each scale against the first on the same eval captions: the accuracy change, samples read right
    only at that scale (wins) / only at the first (losses), and one-sided sign-test p-values both ways."""
    from lumo_ray.eval.stats import sign_test_p

    scales = list(res["scales"])
    base = res["scales"][scales[0]]["hits"]
    head = ["attribute"] + [f"@ {s:g} vs @ {scales[0]:g}" for s in scales[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, b in base.items():
        row = [key]
        for s in scales[1:]:
            h = res["scales"][s]["hits"][key]
            w = sum(x and not y for x, y in zip(h, b))
            lo = sum(y and not x for x, y in zip(h, b))
            row.append(f"{(sum(h) - sum(b)) / len(b):+.2f} ({w}/{lo}; p up {sign_test_p(w, lo):.2g}, "
                       f"down {sign_test_p(lo, w):.2g})")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def table(res: dict) -> str:
    scales = list(res["scales"])
    first = res["scales"][scales[0]]
    head = (["attribute", "n", "chance", "ceiling"] + [f"generated @ {s:g}" for s in scales]
            + [f"swapped @ {s:g}" for s in scales])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, x in first["attributes"].items():
        m = key.split(".")[0]
        gated = " (gated)" if x["gated"] else ""
        row = [key + gated, str(first["n"][m]), f"{x['chance']:.2f}", f"{x['ceiling']:.2f}"]
        row += [f"{res['scales'][s]['attributes'][key]['generated']:.2f}" for s in scales]
        row += [f"{res['scales'][s]['attributes'][key]['swapped']:.2f}" for s in scales]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("| fidelity gate | | | | " + " | ".join("PASS" if res["scales"][s]["pass"] else "FAIL" for s in scales)
                 + " |" + " |" * len(scales))
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="a stage-4 run directory (config.yaml + export/)")
    ap.add_argument("--train-from", help="a demo's lm directory: train a stage-4 run into <out>/mmpt first")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE over the demo's stage-4 settings (--train-from)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0])
    ap.add_argument("--n", type=int, default=None, help="eval captions per modality (default the run's token_lm.fidelity.n)")
    ap.add_argument("--seed", type=int, default=None, help="default the run's token_lm.fidelity.seed")
    ap.add_argument("--reuse", action="store_true", help="read the reports already in <out>/scale_<s>/ (tables only)")
    a = ap.parse_args()
    if bool(a.run) == bool(a.train_from):
        ap.error("give one of --run or --train-from")
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    gates = None
    run = Path(a.run).resolve() if a.run else None
    if a.train_from:
        run, gates = train_stage4(Path(a.train_from).resolve(), out, a.set)
    res = measure(run, out, a.scales, a.n, a.seed, a.reuse)
    res["training_gates"] = gates
    (out / "cfg_fidelity.json").write_text(json.dumps(res, indent=2) + "\n")
    md = table(res) + "\n" + paired_table(res)
    (out / "cfg_fidelity.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
