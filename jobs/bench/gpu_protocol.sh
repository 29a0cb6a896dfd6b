#!/usr/bin/env bash
# The accuracy protocol on one GPU, from random weights, in one short run:
#   (a) the recipe ablation at CPU proxy scale (jobs/configs/cpu_proxy.toml, 96x72): the full
#       recipe, each piece left out (colour jitter, off in the recipe, added), a constant rate
#       instead of warm-up and cosine, a higher resolution, and the paper's protocol, 3 seeds each;
#   (b) the GPU config (jobs/configs/gpu_scratch.toml, 192x144), 3 seeds;
# all trained in-process (jobs.compare --local), several runs at once on the one GPU, scored
# on the dataset's leak-free validation split per image and per source cell, with and
# without test-time augmentation. Then the eager model's latency on CUDA.
#   bash jobs/bench/gpu_protocol.sh SHARDS OUTDIR [SECONDS]
set -u
DATA=${1:?shard dataset (ingested with --scale 0.6)}
OUTDIR=${2:?output folder}
BUDGET=${3:-480}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
RUNS=${RUNS:-/tmp/cellmodel-runs}
# shellcheck disable=SC2206
common=("data.uri=$DATA" "run.storage=$RUNS" "scaling.use_gpu=true" ${EXTRA:-})
with_colour="augment.brightness=0.2 augment.contrast=0.2 augment.saturation=0.2 augment.stain=0.1"
off_colour="augment.brightness=0 augment.contrast=0 augment.saturation=0 augment.stain=0"
off_geom="augment.flips=false augment.scale=[1,1] augment.translate=0"
paper="phase1.epochs=15 phase1.freeze_cnn=true phase1.feature_cache=true phase1.optimizer=rmsprop"
paper+=" phase1.lr=1e-3 phase1.weight_decay=0 phase1.schedule=constant phase1.warmup_epochs=0"
paper+=" phase2.epochs=5 phase2.optimizer=adam phase2.lr=1e-3 phase2.weight_decay=0"
paper+=" phase2.ema_decay=0 $off_colour $off_geom"
timeout "$BUDGET" python3 -m jobs.compare --config jobs/configs/cpu_proxy.toml --local \
  --parallel ${PARALLEL:-11} --seeds 0 1 2 --tta --out "$RUNS/ablation" \
  --variant recipe= \
  --variant "no_ema=phase2.ema_decay=0" \
  --variant "with_colour=$with_colour" \
  --variant "constant_lr=phase1.schedule=constant phase1.warmup_epochs=0" \
  --variant "no_geometry=$off_geom" \
  --variant "res128x96=model.overrides.input_size=[3,96,128]" \
  --variant "paper_protocol=$paper" \
  "${common[@]}" > "$OUTDIR/ablation.log" 2>&1 &
A=$!
timeout "$BUDGET" python3 -m jobs.compare --config jobs/configs/gpu_scratch.toml --local \
  --parallel 3 --seeds 0 1 2 --tta --out "$RUNS/gpu" --variant gpu_scratch= \
  "${common[@]}" > "$OUTDIR/gpu.log" 2>&1 &
G=$!
timeout "$BUDGET" python3 -m jobs.compare --config jobs/configs/gpu_scratch.toml --local \
  --parallel 3 --seeds 0 1 2 --tta --out "$RUNS/compact" --variant compact_bilstm=model.name=compact_bilstm \
  "${common[@]}" > "$OUTDIR/compact.log" 2>&1 &
C=$!
wait $A $G $C
for d in ablation gpu compact; do
  cp "$RUNS/$d/comparison.json" "$OUTDIR/$d.json" 2>/dev/null
done
# The bundled model: the compact variant's seed 0 (a fixed choice, not the best seed).
python3 -m jobs.bundle --checkpoint "$RUNS/gpu_scratch-compact_bilstm-s0/model" --out "$OUTDIR/bundled" \
  --command "python -m jobs.train --local --config jobs/configs/gpu_scratch.toml model.name=compact_bilstm" \
  >> "$OUTDIR/compact.log" 2>&1
tail -n 4 "$OUTDIR"/*.log
timeout 90 python3 - > "$OUTDIR/latency.log" 2>&1 <<'PY'
import time, torch
from cellmodel.infer.predictor import Predictor
from cellmodel.models import build_model, save_checkpoint
save_checkpoint(build_model("xception_bilstm"), "/tmp/xb")
p = Predictor("/tmp/xb", device="cuda" if torch.cuda.is_available() else "cpu")
for bs in (1, 32, 256):
    x = torch.randn(bs, 3, 240, 320).numpy()
    for _ in range(3):
        p.predict_arrays(x)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 2:
        p.predict_arrays(x); n += 1
    dt = (time.perf_counter() - t0) / n
    print(f"xception_bilstm 320x240 eager, batch {bs}: {dt*1e3:.2f} ms/batch, {bs/dt:.0f} img/s")
PY
cat "$OUTDIR/latency.log"
cat "$OUTDIR"/*.md
