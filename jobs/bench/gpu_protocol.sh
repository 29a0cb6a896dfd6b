#!/usr/bin/env bash
# The accuracy protocol on one GPU, from random weights, in one short run (about 8 minutes on
# an H200), without Ray (every run trains in-process with `jobs.compare --local`):
#   (a) the GPU config (jobs/configs/gpu_scratch.toml, Xception + BiLSTM at 192x144), 3 seeds;
#   (b) beside it, the recipe ablation at CPU proxy scale (jobs/configs/cpu_proxy.toml, 96x72):
#       the recipe as configured, EMA off, a constant rate instead of warm-up and cosine,
#       128x96 input, and the paper's protocol from random weights, 3 seeds each, seed-major
#       (every variant's seed 0 first), so a run cut short by the budget still compares them;
# each scored on the dataset's validation split (split by source cell) per image, per cell and
# cell-balanced, with and without test-time augmentation, at each run's last epoch (nothing
# chosen on the split). Checkpoints go to $RUNS (default a RAM disk); the figures, histories
# and reports are packed into OUTDIR/results.tar.gz.
# `timeout` signals its whole process group, the pool workers of `jobs.compare` included.
#   bash jobs/bench/gpu_protocol.sh SHARDS OUTDIR [SECONDS]
# SHARDS: crops stored at 0.6 scale (192x144), e.g. `python -m jobs.ingest ... --scale 0.6`.
set -u
DATA=${1:?shard dataset (crops stored at 192x144)}
OUTDIR=${2:?output folder}
BUDGET=${3:-470}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${THREADS:-2} MKL_NUM_THREADS=${THREADS:-2}
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
RUNS=${RUNS:-/dev/shm/cellmodel-runs}
# shellcheck disable=SC2206
common=("data.uri=$DATA" "run.storage=$RUNS" ${EXTRA:-})
off_colour="augment.brightness=0 augment.contrast=0 augment.saturation=0 augment.stain=0"
off_geom="augment.flips=false augment.scale=[1,1] augment.translate=0"
paper="phase1.epochs=15 phase1.freeze_cnn=true phase1.feature_cache=true phase1.optimizer=rmsprop"
paper+=" phase1.lr=1e-3 phase1.weight_decay=0 phase1.schedule=constant phase1.warmup_epochs=0"
paper+=" phase2.epochs=5 phase2.optimizer=adam phase2.lr=1e-3 phase2.weight_decay=0"
paper+=" phase2.ema_decay=0 $off_colour $off_geom"
start=$(date +%s)
timeout -k 10 "$BUDGET" python3 -m jobs.compare --config jobs/configs/gpu_scratch.toml --local \
  --parallel "${GPU_PARALLEL:-3}" --seeds 0 1 2 --tta --epoch last --out "$RUNS/gpu" \
  --variant gpu_scratch= \
  scaling.use_gpu=true "${common[@]}" ${GPU_EXTRA:-} > "$OUTDIR/gpu.log" 2>&1 &
G=$!
timeout -k 10 "$BUDGET" python3 -m jobs.compare --config jobs/configs/cpu_proxy.toml --local \
  --parallel "${ABLATION_PARALLEL:-5}" --seeds 0 1 2 --tta --epoch last --out "$RUNS/ablation" \
  --variant recipe= \
  --variant "no_ema=phase2.ema_decay=0" \
  --variant "constant_lr=phase1.schedule=constant phase1.warmup_epochs=0" \
  --variant "res128x96=model.overrides.input_size=[3,96,128]" \
  --variant "paper_protocol=$paper" \
  scaling.use_gpu=true "${common[@]}" ${ABLATION_EXTRA:-} > "$OUTDIR/ablation.log" 2>&1 &
A=$!
wait $G $A
echo "wall: $(( $(date +%s) - start )) s"
for d in gpu ablation; do
  cat "$RUNS/$d/comparison.md" 2>/dev/null
done
# Figures, logs, histories and reports; no weights or pictures.
tar -czf "$OUTDIR/results.tar.gz" -C "$RUNS" --exclude='*.safetensors' --exclude='*.pt' \
  --exclude='*.npy' --exclude='*.png' --exclude='features*' . 2>/dev/null
ls -la "$OUTDIR"
