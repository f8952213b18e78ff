#!/usr/bin/env bash
# GPU checks (not run in CI: CI has no GPU). On a CUDA machine, from the repository root:
#     bash benchmarks/gpu_check.sh > gpu_check.txt
# What it measures, each printed beside its baseline:
#  1. the token-LM training step (bf16 autocast, AdamW) of the qwen3-0.6b preset on the reference
#     program's 164,032-row vocabulary: tokens/s, model TFLOP/s, MFU against the GPU's bf16 peak, and
#     the peak memory beside `lumo plan`'s estimate; freeze full and new_rows, checkpointing off and on;
#  2. the serve load sweep with its replica on the GPU (python -m benchmarks.serve --gpus-per-replica 1),
#     the same table as on CPU (1, 4, 16, 64 clients);
#  3. EnCodec-24k encode speed as a multiple of real time, when LUMO_ENCODEC points at a local
#     facebook/encodec_24khz directory (nothing is downloaded);
#  4. CLIP embeddings per second per actor on the GPU (`lumo data embed`, num_gpus_per_actor 1), when
#     LUMO_CLIP points at a local transformers CLIPModel directory (else the tiny preset), beside the
#     CPU table of benchmarks/README.md (python -m benchmarks.curation);
#  5. the tiny pipeline with every job on GPUs, each printing its wall time and where it computed:
#     tokenize (GPU codec actors), token-LM training (Ray Train, use_gpu), batch generation (samples/s,
#     generate.num_gpus_per_actor), a prompt study of 4 trials sharing the GPU (0.25 each).
#     LUMO_GPU=0 runs the same commands on CPU (what CI-like machines can check; no timings to report).
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
$PY -m benchmarks.serve --clients 1,4,16,64 --requests 8 --gpus-per-replica 1
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
G=${LUMO_GPU:-1}  # GPUs per unit; 0 = the same commands on CPU
UG=$([ "$G" = 0 ] && echo false || echo true)
W=$(mktemp -d)
# timed CMD: runs it (exit 1 is a gate's verdict, kept; 2 and up stop the script), prints where it computed
# and its wall seconds on the last line
timed() { local t=$(date +%s.%N) rc=0; "$@" > "$W/last.log" 2>&1 || rc=$?
          [ "$rc" -le 1 ] || { tail -20 "$W/last.log" >&2; exit "$rc"; }
          grep -h "computed on\|trials (of" "$W/last.log" | head -2 | sed 's/^/    /' >&2
          python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$t" "$(date +%s.%N)"; }
$PY -m lumo_ray.cli data synth --out "$W/synth" --images 256 --audio 0 --seed 0 > /dev/null
$PY -m lumo_ray.cli data normalize --source llava_pretrain --input "$W/synth/llava_pretrain" --out "$W/norm" > /dev/null
echo "tokenize (1 codec actor, $G GPU): $(timed $PY -m lumo_ray.cli data tokenize --manifest "$W/norm/manifest.jsonl" --out "$W/shards" --set data.tokenize.num_gpus_per_actor=$G) s"
echo "token-LM training (1 worker, use_gpu $UG, 200 steps): $(timed $PY -m lumo_ray.cli train token-lm --shards "$W/shards" --out "$W/tlm" --set token_lm.train.use_gpu=$UG) s"
head -64 "$W/norm/manifest.jsonl" > "$W/gen.jsonl"
t=$(timed $PY -m lumo_ray.cli generate --run "$W/tlm" --task t2i --manifest "$W/gen.jsonl" --out "$W/gen" --set generate.num_gpus_per_actor=$G | tail -1)
echo "batch generation t2i (1 actor, $G GPU): 64 samples in $t s = $(python3 -c "print(f'{64 / $t:.1f}')") samples/s"
echo "prompt study (4 trials, $([ "$G" = 0 ] && echo 0 || echo 0.25) GPU each, 20 steps): $(timed $PY -m lumo_ray.cli tune prompts --out "$W/tune" --set token_lm.shards="$W/shards" --set token_lm.prompt_study.num_samples=4 --set token_lm.prompt_study.steps=20 --set token_lm.prompt_study.report_every=10 --set token_lm.prompt_study.gpus_per_trial=$([ "$G" = 0 ] && echo 0 || echo 0.25)) s"
