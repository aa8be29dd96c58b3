#!/usr/bin/env bash
# Every GPU check of the project in one call, sized for a 10-minute device command.
#
#   bash bench/gpu_all.sh OUTDIR [--train-wan]
#
# Needs CUDA, torch, Triton and pytest; packages the image lacks (diffusers, importlib_metadata,
# pytorch-msssim) travel as wheels in .whl/ (see docs/gpu.md).  Writes at most 8 files to OUTDIR:
#   tests.log     environment (nvidia-smi, versions) + GPU tests (compiled Triton kernel vs fp64,
#                 CUDA extension, sparse methods on CUDA, AOT compile, nvcc)
#   wan_tiny.tgz  with --train-wan: the Wan video reference model trained on the GPU (with its train
#                 log), if it finished (that is how the shipped wan_tiny was made)
#   kernels.json, kernels.md, kernels.log
#                 block-sparse kernel vs dense SDPA, 4k-75k tokens, d 64/128, densities 5-100 %,
#                 SVG2 stage breakdown, k-means assignment (fused Triton kernel vs torch)
#   e2e.json, e2e.log
#                 `ditaccel bench` on flux_tiny at 65536 image tokens in bf16: the fast preset, each sparse
#                 attention (defaults, and Re-ttention's long-sequence setting) and RAS against full
#                 compute (speed + PSNR/SSIM); SVG2 also with reuse_steps 2 and 4 (k-means on 1 step in 3 / 5)
# Stages that time things run alone on the GPU; training overlaps only the (untimed) tests.
set -u
OUT=${1:?usage: bash bench/gpu_all.sh OUTDIR [--train-wan]}
TRAIN_WAN=0
if [ "${2:-}" = "--train-wan" ]; then TRAIN_WAN=1; fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=python3
T0=$(date +%s)
stamp() { echo "[gpu_all] $1 at +$(( $(date +%s) - T0 ))s"; }

{
  stamp "start"
  nvidia-smi
  $PY -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())"
  nvcc --version | tail -2
} > "$OUT/tests.log" 2>&1

# 1. GPU tests; with --train-wan, the Wan reference model trains (GPU) alongside them.
(
  [ "$TRAIN_WAN" = 1 ] || exit 0
  timeout 240 $PY -m ditaccel.reference.train_wan --device cuda --out /tmp/wan_tiny --seed 0 \
    --vae-steps 1200 --vae-batch 16 --dit-steps 2500 --dit-batch 32 --minutes 3.6 > /tmp/train_wan.log 2>&1
  echo "train_wan exit $?" >> /tmp/train_wan.log
  if [ -f /tmp/wan_tiny/model_index.json ]; then cp /tmp/train_wan.log /tmp/wan_tiny/; fi
  cp /tmp/train_wan.log "$OUT/train_wan_console.log" 2>/dev/null
  tar czf "$OUT/wan_tiny.tgz" -C /tmp wan_tiny train_wan.log 2>/dev/null || tar czf "$OUT/wan_tiny.tgz" -C /tmp train_wan.log
  rm -f "$OUT/train_wan_console.log"
) &
TRAIN=$!
{
  stamp "tests"
  timeout 200 $PY -m pytest tests/kernels -q -p no:cacheprovider -rs 2>&1
  echo "pytest exit $?"
  stamp "tests done"
} >> "$OUT/tests.log" 2>&1
wait $TRAIN
echo "[gpu_all] training done at +$(( $(date +%s) - T0 ))s" >> "$OUT/tests.log"

# 2. Kernel benchmark (GPU alone).
{
  stamp "kernels"
  timeout 160 $PY bench/kernels.py --device cuda --out "$OUT" --repeats 10 --heads 24 \
    --lengths 4096 16384 32768 75600 --head-dims 64 128 --densities 0.05 0.1 0.2 0.5 1.0 \
    --svg2 --svg2-lengths 32768 75600 --kmeans
  echo "kernels exit $?"
  stamp "kernels done"
} > "$OUT/kernels.log" 2>&1

# 3. End to end on the trained FLUX reference model at a video-size token count.
{
  stamp "e2e"
  timeout 200 $PY -m ditaccel.cli.main bench --device cuda --dtype bfloat16 --model flux_tiny --tokens 65536 \
    --batch 1 --steps 28 --repeats 3 --presets fast \
    --methods "SVG2" "SVG2:reuse_steps=2" "SVG2:reuse_steps=4" "CLEAR:radius=16,mode=blocks" "Rettention" \
              "Rettention:keep_fraction=0.01,refresh_interval=12,dense_steps_fraction=0.15" \
              "RAS:active_fraction=0.25" \
    --no-progress --json "$OUT/e2e.json"
  echo "e2e exit $?"
  stamp "e2e done"
} > "$OUT/e2e.log" 2>&1
stamp "all done" >> "$OUT/e2e.log"
