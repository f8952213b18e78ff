#!/usr/bin/env bash
# GPU checks (not run in CI: CI has no GPU). On a CUDA machine, from the repository root:
#     bash benchmarks/gpu_check.sh > gpu_check.txt
# What it measures, each printed beside its baseline:
#  1. the token-LM training step (bf16 autocast, AdamW) of the qwen3-0.6b preset on the reference
#     program's 164,032-row vocabulary: tokens/s, model TFLOP/s, MFU against the GPU's bf16 peak, and
#     the peak memory beside `lumo plan`'s estimate; freeze full and new_rows, checkpointing off and on;
#  2. the serve load sweep on the GPU (python -m benchmarks.serve), the same table as on CPU;
#  3. EnCodec-24k encode speed as a multiple of real time, when LUMO_ENCODEC points at a local
#     facebook/encodec_24khz directory (nothing is downloaded);
#  4. CLIP embeddings per second per actor on the GPU (`lumo data embed`, num_gpus_per_actor 1), when
#     LUMO_CLIP points at a local transformers CLIPModel directory (else the tiny preset), beside the
#     CPU table of benchmarks/README.md (python -m benchmarks.curation).
# Write what it printed, with the machine and the commit, into benchmarks/README.md.
set -euo pipefail
PY=${PYTHON:-python}
git log --oneline -1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for freeze in full new_rows; do
  for ck in "" "--checkpointing"; do
    $PY -m benchmarks.train_throughput --preset qwen3-0.6b --freeze "$freeze" --micro-batch 4 --seq 2048 --steps 20 $ck
  done
done
$PY -m benchmarks.serve --clients 1,4,16,64 --requests 8
if [ -n "${LUMO_ENCODEC:-}" ]; then
  $PY - <<'PY'
import os, time, numpy as np, torch
from transformers import EncodecModel
m = EncodecModel.from_pretrained(os.environ["LUMO_ENCODEC"]).cuda().eval()
x = torch.from_numpy(np.random.default_rng(0).standard_normal((16, 1, 24000 * 10)).astype(np.float32) * 0.1).cuda()
with torch.no_grad():
    m.encode(x[:2]); torch.cuda.synchronize(); t = time.perf_counter(); m.encode(x); torch.cuda.synchronize()
print(f"EnCodec-24k encode: {16 * 10 / (time.perf_counter() - t):.0f}x real time (16 clips of 10 s, one batch)")
PY
else
  echo "EnCodec-24k encode: skipped (set LUMO_ENCODEC to a local facebook/encodec_24khz directory)"
fi
CLIP=${LUMO_CLIP:-tiny}
$PY - "$CLIP" <<'PY'
import sys, tempfile, time
from pathlib import Path
from benchmarks.curation import synth_manifest
from lumo_ray.config import LumoConfig, load_config
from pipelines.embed import run_embed
root = Path(tempfile.mkdtemp())
m = synth_manifest(root, 4096)
cfg = load_config(LumoConfig, None, [f"data.embed.model={sys.argv[1]}", "data.embed.num_gpus_per_actor=1",
                                     "data.embed.batch_size=256", "data.embed.loaders=4"])
t = time.time(); run_embed(m, cfg, root / "emb", actors=1, log=lambda *a, **k: None)
print(f"CLIP {sys.argv[1]} embeddings on 1 GPU actor: {4096 / (time.time() - t):,.0f} images/s (4,096 images, whole command)")
PY
