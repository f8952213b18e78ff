"""The VLM part of `lumo demo`: train the tiny VLM (Ray Train, 2 CPU workers) on a LLaVA-format
image-caption folder and run the visual-token ablation gate."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from ...config import LumoConfig
from ...config.vlm import VLMConfig


# The demo's VLM data: 224 training images and 224 held out (demo.vlm_images = 448; a split holds out
# at most half). The gate's shuffled comparison wins on only ~70 % of samples even for a connector that
# reads the image (a shuffled synthetic image often shares colour, shape or count with the true one),
# so it needs a held-out set near the gate's largest (64-256) for p < 0.01; 64 left seed 2 at p 0.05
# (docs/stage1_vlm.md).
EVAL_SIZE = 224


def demo_config(out_dir: Path, llava_dir: Path) -> VLMConfig:
    """Settings sized for <= 1 minute on 2 CPUs (docs/stage1_vlm.md, "The demo's settings")."""
    cfg = VLMConfig()  # the defaults' recipe (lr 3e-3, 224 held out and gated), at half its steps
    cfg.data.path = str(llava_dir)
    cfg.data.eval_size = cfg.ablation.n = EVAL_SIZE
    cfg.train.out = str(Path(out_dir) / "vlm_run")
    cfg.train.steps = 200  # the demo's time budget; passes at demo seeds 0-2, not at every data seed
    cfg.train.ckpt_every = 100
    cfg.train.eval_every = 50
    cfg.train.log_every = 50
    return cfg


def run_vlm_demo(out_dir: Path, llava_dir: Path, log: Callable[[str], None] = print,
                 cfg: Optional[VLMConfig] = None, address: Optional[str] = None) -> dict:
    """Returns {"pass", "metrics", "run_dir", "ablation", "ablation_path"}."""
    from trainers.vlm import train_vlm

    from ...eval.vlm_ablation import ablation_from_export, ablation_table, write_ablation

    cfg = cfg or demo_config(Path(out_dir), Path(llava_dir))
    res = train_vlm(LumoConfig(vlm=cfg), address=address, log=log)
    run = Path(res["run_dir"])
    rep = ablation_from_export(run / "export", run / "splits.json", n=cfg.ablation.n, seed=cfg.ablation.seed)
    path = write_ablation(rep, Path(out_dir) / "vlm_ablation")
    for line in ablation_table(rep).splitlines():
        log(line)
    fin = res["metrics"].get("final", {})
    return {"pass": rep["pass"], "run_dir": str(run), "ablation_path": str(path), "ablation": rep,
            "metrics": {"eval_loss": fin.get("eval_loss"), "train_loss": fin.get("train_loss"),
                        "steps": fin.get("step"), "ablation_mean_loss": rep["mean_loss"],
                        "ablation_delta": rep["delta"], "ablation_win_rate": rep["win_rate"]}}
