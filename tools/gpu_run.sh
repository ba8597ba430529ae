#!/usr/bin/env bash
# The course's GPU run, as one prepared script (under 10 minutes on one H200 before stage 2 gained the end-to-end
# row and the checkpointing table, which add up to 9 minutes: two torch.compile runs; BENCH=0 skips stage 2):
#   1. a smoke test: the tiny config trains, ships and is evaluated on the GPU (stops here if it fails);
#   2. chapter 05's benchmark table on the GPU (SD 1.5 UNet at 512 px, SD VAE at 512 and 1024 px, training
#      step with and without checkpointing), ours against diffusers with the same weights; then the
#      end-to-end row (the whole 512 px text-to-image call, 50 steps, fp32 / fp16 / compiled) and the
#      checkpointing comparison (time, memory, FLOPs);
#   3. chapter 06's text-to-image training with a wall-clock budget (MINUTES of training loop):
#        gpu:     the `gpu` config (the full course model, 5.6 M UNet), bf16, batch 1024, lr 2e-3: the
#                 shipped checkpoints/course_t2i came from this run (MINUTES=3.5);
#        cpuarch: (with RUNS="gpu cpuarch", side by side) the `cpu` config's model (4.2 M UNet) at batch 256, bf16;
#   4. each shipped model evaluated with evaluate.py (judge, FID) on the GPU.
#
#   bash tools/gpu_run.sh OUTDIR
#
# Knobs (environment): RUNS ("gpu"), DEVICE (cuda), MINUTES (3.5: each training loop's budget), EVAL_N (100 prompts per
# set), TRAIN_SIZE (60000 cached Shapes items), BENCH (1: run the benchmark), FAST (0; 1 = a dry run of the
# whole script in seconds on a CPU: DEVICE=cpu FAST=1 bash tools/gpu_run.sh /tmp/dry).
# OUTDIR receives log.txt, results.tar (logs, tables, samples, model cards) and each shipped model (without
# its VAE, which is checkpoints/vae_shapes) as model_NAME.tar, split into 15 MB parts.
set -u
OUT=${1:?usage: bash tools/gpu_run.sh OUTDIR}
DEVICE=${DEVICE:-cuda}
MINUTES=${MINUTES:-3.5}
RUNS=${RUNS:-gpu}
EVAL_N=${EVAL_N:-100}
TRAIN_SIZE=${TRAIN_SIZE:-60000}
BENCH=${BENCH:-1}
FAST=${FAST:-0}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
W=$(mktemp -d /tmp/gpu_run.XXXX)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export MPLBACKEND=Agg COURSE_CACHE=$W/cache
PY=${PYTHON:-python3}

log() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$OUT/log.txt"; }
pack() { tar -C "$W" -cf "$OUT/results.tar" --exclude=checkpoints --exclude=cache --exclude='ship_*' \
           --exclude='model_*.tar' . 2>/dev/null || true; }
stage() {  # stage NAME TIMEOUT_S COMMAND...: runs COMMAND with its output in $W/NAME.log, returns its status
    local name=$1 limit=$2; shift 2
    log "start $name: $*"
    timeout --signal=INT --kill-after=20 "$limit" "$@" >"$W/$name.log" 2>&1
    local rc=$?
    log "end $name: exit $rc; last lines:"
    tail -n 6 "$W/$name.log" | tee -a "$OUT/log.txt"
    return $rc
}
ship_model() {  # ship_model NAME: the shipped folder without its VAE, as <= 15 MB parts
    [ -f "$W/ship_$1/model_index.json" ] || { log "no shipped model $1"; return 1; }
    tar -C "$W" -cf "$W/model_$1.tar" --exclude=vae "ship_$1"
    split -b 15000000 -d -a 1 "$W/model_$1.tar" "$OUT/model_$1.tar.part"
    log "model $1: $(du -b "$W/model_$1.tar" | cut -f1) bytes -> $(ls "$OUT" | grep -c "model_$1.tar.part") part(s)"
}

log "device run: DEVICE=$DEVICE MINUTES=$MINUTES EVAL_N=$EVAL_N TRAIN_SIZE=$TRAIN_SIZE FAST=$FAST in $W"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; $PY -c "import torch, diffusers, \
accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__, \
'cuda', torch.cuda.is_available())"; nproc; } 2>&1 | tee -a "$OUT/log.txt"

# 1. smoke test
COURSE_FAST=1 stage smoke_train 150 $PY 06_stable_diffusion_architecture/train_text_to_image.py --device "$DEVICE" \
    --config tiny --steps 30 --out "$W/smoke" --ship "$W/ship_smoke" --no-progress \
  && COURSE_FAST=1 stage smoke_eval 100 $PY 06_stable_diffusion_architecture/evaluate.py --device "$DEVICE" \
    --model "$W/ship_smoke" --n 2 --runs ddim:4 --out "$W/smoke_eval" \
  || { log "smoke test failed: stopping"; pack; exit 1; }
rm -rf "$W/ship_smoke"

# 2. chapter 05's table on the GPU, alone on the device (training starts after it)
if [ "$BENCH" = 1 ]; then
  QUICK=""; [ "$FAST" = 1 ] && QUICK="--quick"
  stage bench05 130 $PY 05_memory_efficient_diffusion/benchmark.py --device "$DEVICE" --isolation none $QUICK \
    --out "$W/bench05_$DEVICE" --rows unet_math unet_sdpa unet_sliced unet_chunked_ff unet_channels_last unet_bf16 \
    unet_offload vae_decode_small vae_decode_large vae_decode_large_tiled vae_decode_batch vae_decode_batch_sliced \
    train train_checkpointing
  # the whole text-to-image call, ours against diffusers' StableDiffusionPipeline (same weights, seed, image):
  # 50 DPM-Solver++ steps at 512 px in fp32, fp16, and fp16 + channels_last + torch.compile (compile time apart)
  # (a dry run leaves compile out: compiling on a CPU takes minutes)
  E2E="--steps 50 --repeats 3 --settings fp32 fp16 compile"; [ "$FAST" = 1 ] && E2E="--quick --steps 4 --repeats 2 --settings fp32 fp16"
  stage end_to_end 420 $PY 05_memory_efficient_diffusion/benchmark.py --end-to-end --device "$DEVICE" $E2E \
    --out "$W/bench05_$DEVICE"
  # gradient checkpointing: time, memory and FLOPs of the train rows' step, ours and diffusers interleaved
  CK=""; [ "$FAST" = 1 ] && CK="--ckpt-config tiny --ckpt-latent 8 --ckpt-batch 2 --repeats 2"
  stage checkpointing 120 $PY 05_memory_efficient_diffusion/benchmark.py --checkpointing --device "$DEVICE" \
    --repeats 20 $CK --out "$W/bench05_$DEVICE"
  pack
fi

# 3. the trainings (side by side when RUNS names two)
LIMIT=$($PY -c "print(int($MINUTES * 60 + 150))")
EXTRA=""; [ "$FAST" = 1 ] && EXTRA="--steps 200 --batch-size 32 --train-size 512"  # the last --train-size wins
for name in $RUNS; do
  case $name in
    gpu) ARGS="--config gpu" ;;
    cpuarch) ARGS="--config cpu --batch-size 256 --precision bf16 --ema-decay 0.999 --steps 40000" ;;
    *) log "unknown run $name (expected gpu or cpuarch)"; exit 2 ;;
  esac
  stage "train_$name" "$LIMIT" $PY 06_stable_diffusion_architecture/train_text_to_image.py --device "$DEVICE" $ARGS \
      --minutes "$MINUTES" --train-size "$TRAIN_SIZE" --out "$W/t2i_$name" --ship "$W/ship_$name" --no-progress $EXTRA &
done
wait
for name in $RUNS; do ship_model $name; done
pack

# 4. evaluation of both, side by side
for name in $RUNS; do
  [ -f "$W/ship_$name/model_index.json" ] && stage "eval_$name" 150 $PY 06_stable_diffusion_architecture/evaluate.py \
      --device "$DEVICE" --model "$W/ship_$name" --n "$EVAL_N" --runs ddim:25 dpmpp_2m:20 --out "$W/eval_$name" &
done
wait
pack
log "done"
