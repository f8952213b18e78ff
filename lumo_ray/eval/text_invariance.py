"""Text invariance (docs/gates.md): training only new-vocabulary rows must leave text untouched.

Checks, against the base LM the run warm-started from:
- text-only prompts give logits over the original vocabulary (ids < TEXT size) with max abs diff 0
  (fp32, same prompts, same positions);
- every frozen weight is bit-identical: all non-vocabulary parameters, and the TEXT rows of the
  embedding and head matrices.
Reported, not gated: how much probability text prompts put on the new rows (ids >= TEXT size).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch

from ..storage import write_file
from ..token_space import TokenSpace


def _vocab_names(model: torch.nn.Module) -> set[str]:
    ids = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        ids.add(id(head.weight))
    return {n for n, p in model.named_parameters() if id(p) in ids}


def text_invariance(model: torch.nn.Module, base: torch.nn.Module, ts: TokenSpace, prompts: list[str],
                    encode: Callable[[str], list[int]], freeze: str = "new_rows") -> dict:
    """Compare a trained token LM with its base LM; returns the report dict (with 'pass')."""
    t = ts.text_vocab
    model, base = model.float().eval(), base.float().eval()
    bp = dict(base.named_parameters())
    vocab = _vocab_names(model)
    changed, missing = [], []
    for n, p in model.named_parameters():
        if n not in bp:
            missing.append(n)
            continue
        # an FSDP-sharded parameter is gathered whole (every rank runs this in step); compared on the base's device
        p, q = (p.full_tensor() if hasattr(p, "full_tensor") else p).to(bp[n].device), bp[n]
        same = torch.equal(p[:t], q[:t]) if n in vocab else (p.shape == q.shape and torch.equal(p, q))
        if not same:
            changed.append(n)
    max_diff, mass = 0.0, []
    with torch.no_grad():
        for text in prompts:
            ids = torch.tensor([encode(text)], dtype=torch.long)
            b = base(input_ids=ids.to(next(base.parameters()).device)).logits.float().cpu()
            a = model(input_ids=ids.to(next(model.parameters()).device)).logits.float().cpu()
            max_diff = max(max_diff, float((a[..., :t] - b[..., :t]).abs().max()))
            mass.append(float(torch.softmax(a, -1)[..., t:].sum(-1).mean()))
    applicable = freeze == "new_rows"
    ok = applicable and max_diff == 0.0 and not changed and not missing
    return {"pass": bool(ok), "applicable": applicable, "freeze": freeze, "max_abs_logit_diff": max_diff,
            "changed_frozen_params": changed, "params_missing_in_base": missing, "prompts": len(prompts),
            "text_vocab": t, "new_row_prob_mass": {"mean": sum(mass) / max(1, len(mass)),
                                                   "max": max(mass) if mass else 0.0}}


def run_text_invariance(run_dir: str | Path, base: str, out_dir: str | Path, cfg=None,
                        prompts: Optional[list[str]] = None) -> dict:
    """`lumo eval text-invariance --run DIR --base BASE`: the run's export against its base LM."""
    from ..codecs.text import build_text_adapter
    from ..config import LumoConfig, load_config
    from ..models.token_lm import load_causal_lm, load_token_lm
    from ..storage import fetch_run

    run = fetch_run(run_dir)  # a path, or the local cache of a URI
    cfg = cfg or load_config(LumoConfig, run / "config.yaml")
    model, ts, meta = load_token_lm(run / "export")
    base_model = load_causal_lm(base, ts.text_vocab, seed=int(meta.get("seed", cfg.token_lm.train.seed)))
    encode = build_text_adapter(cfg.uti.text).encode
    rep = text_invariance(model, base_model, ts, prompts or cfg.token_lm.invariance.prompts, encode,
                          meta.get("freeze", cfg.token_lm.freeze))
    rep.update({"run": str(run_dir), "base": base})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_file(out / "report.json", json.dumps(rep, indent=2) + "\n")
    md = [f"# Text invariance: {'PASS' if rep['pass'] else 'FAIL'}", "",
          f"- freeze mode: {rep['freeze']} (gate applies to new_rows)",
          f"- max |logit diff| over the original vocabulary: {rep['max_abs_logit_diff']:.3g}",
          f"- frozen params changed: {len(rep['changed_frozen_params'])} {rep['changed_frozen_params'][:5]}",
          f"- probability mass text prompts put on new rows: mean {rep['new_row_prob_mass']['mean']:.4g}, "
          f"max {rep['new_row_prob_mass']['max']:.4g}"]
    write_file(out / "report.md", "\n".join(md) + "\n")
    return rep
