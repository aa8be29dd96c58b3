#!/usr/bin/env bash
# Compatibility matrix of ditaccel (docs/compatibility.md).
#
#   bench/compat_matrix.sh versions   # default: the two ends of the declared diffusers range
#   bench/compat_matrix.sh perf       # CPU timings: eager / torchao int8 / torch.compile (inductor)
#
# versions: the upper end runs in the project venv (.venv, diffusers 0.42.x); the lower end in a
# throwaway venv (default /tmp/ditaccel-diffusers035) with torch 2.13.0 (CPU), diffusers 0.35.*,
# transformers < 5, accelerate < 1.12, peft < 0.18, pytest, hypothesis, with this checkout on
# PYTHONPATH (not installed). Both run the core tests (tests/test_api.py, tests/hooks/,
# tests/adapters/) and tests/compat/. On 0.35 the Qwen-Image family tests are deselected: the tiny
# helper pads its text mask, which 0.35's QwenImagePipeline cannot take (a diffusers bug fixed
# later); tests/compat/test_compat_diffusers_api.py::test_qwenimage_with_unpadded_text_mask runs
# Qwen-Image on both ends instead.
#
# Environment: PYTHON (interpreter to build the venv, default python3), VENV035 (its path),
# DIFFUSERS_LOW (default "0.35.*"), PYTEST_ARGS (extra pytest arguments).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MODE="${1:-versions}"
PY_MAIN="$ROOT/.venv/bin/python"
VENV035="${VENV035:-/tmp/ditaccel-diffusers035}"
DIFFUSERS_LOW="${DIFFUSERS_LOW:-0.35.*}"
CORE=(tests/test_api.py tests/hooks tests/adapters tests/compat)
LOG_DIR="${LOG_DIR:-/tmp/ditaccel-compat-matrix}"
FAILED=0
mkdir -p "$LOG_DIR"
export OMP_NUM_THREADS=1

run_tests() {  # $1 python, $2 label, rest: extra pytest args
  local py="$1" label="$2"; shift 2
  local version
  version="$("$py" -c 'import diffusers; print(diffusers.__version__)' 2>/dev/null | tail -1)"
  echo "=== $label: diffusers $version"
  local status=0
  (cd "$ROOT" && PYTHONPATH="$ROOT" "$py" -m pytest -q -p no:cacheprovider "${CORE[@]}" "$@" ${PYTEST_ARGS:-}) \
    > "$LOG_DIR/pytest-$version.log" 2>&1 || status=$?
  tail -n 15 "$LOG_DIR/pytest-$version.log"
  echo "=== $label: pytest exit status $status (full log: $LOG_DIR/pytest-$version.log)"
  [[ $status -eq 0 ]] || FAILED=1
}

if [[ "$MODE" == "versions" ]]; then
  if [[ ! -x "$VENV035/bin/python" ]]; then
    "${PYTHON:-python3}" -m venv "$VENV035"
    "$VENV035/bin/pip" install -q torch==2.13.0
    "$VENV035/bin/pip" install -q "diffusers==$DIFFUSERS_LOW" "transformers>=4.45,<5" "accelerate<1.12" "peft<0.18" \
      pytest hypothesis numpy safetensors tqdm packaging
  fi
  run_tests "$PY_MAIN" "upper end (project venv)"
  run_tests "$VENV035/bin/python" "lower end ($VENV035)" -k "not qwenimage or unpadded"
  exit "$FAILED"
fi

if [[ "$MODE" != "perf" ]]; then
  echo "usage: $0 [versions|perf]" >&2
  exit 2
fi

# perf: a small random FLUX (hidden 256 = 4 heads x 64, 2 double + 4 single blocks, 64x64 px ->
# 256 image tokens, 16 text tokens, 8 steps), one CPU thread, process CPU time per generation;
# one warm-up round ("first call": includes compilation, CPU time of this process only, not of
# inductor's compile workers), then REPS interleaved rounds. One process per variant.
REPS="${REPS:-5}"
for variant in eager torchao-int8 inductor-regional inductor-whole; do
  (cd "$ROOT" && "$PY_MAIN" - "$variant" "$REPS" <<'EOF'
import statistics, sys, time
import torch
torch.set_num_threads(1)
import diffusers as d
import ditaccel
from torch._dynamo.utils import counters

variant, reps = sys.argv[1], int(sys.argv[2])
CONFIGS = {
    "StepCache i=2": ditaccel.StepCacheConfig(interval=2, warmup_steps=2, final_steps=1),
    "StepCache i=3": ditaccel.StepCacheConfig(interval=3, warmup_steps=2, final_steps=1),
    "preset balanced": "balanced",
}

def build():
    torch.manual_seed(0)
    tr = d.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4,
        attention_head_dim=64, num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32,
        guidance_embeds=True, axes_dims_rope=(16, 24, 24)).eval()
    vae = d.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=64)
    pipe = d.FluxPipeline(scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    return pipe

PE = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(1))
PP = torch.randn(1, 32, generator=torch.Generator().manual_seed(2))

def gen(pipe):
    with torch.no_grad():
        return pipe(prompt_embeds=PE, pooled_prompt_embeds=PP, num_inference_steps=8, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images

def cpu_gen(pipe):
    # CPU time of this process (one thread), not wall time: the machines this ran on are shared
    t = time.process_time(); out = gen(pipe); return time.process_time() - t, out

def rel(a, b):
    return float((a - b).double().norm() / b.double().norm())

pipe = build()
eager_ref = gen(pipe)
if variant == "inductor-regional":
    for b in list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks):
        b.compile()
elif variant == "inductor-whole":
    pipe.transformer = torch.compile(pipe.transformer)
elif variant == "torchao-int8":
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    quantize_(pipe.transformer, Int8WeightOnlyConfig())

# First round: warm-up (compilation) of each setting, outputs and stats. Then REPS interleaved
# rounds (none, then each config, enabled and removed in turn): the load of a shared machine
# drifts, so each config's time is compared with the un-accelerated time of the same round and
# the median of those ratios is reported.
names = ["none", *CONFIGS]
first, outs, stats, graphs, breaks = {}, {}, {}, {}, {}
times = {n: [] for n in names}
for r in range(reps + 1):
    for name in names:
        # FLOPs are profiled in the warm-up round only (the profiler runs inside the first call)
        handle = (ditaccel.enable_acceleration(pipe, CONFIGS[name], count_flops=(r == 0))
                  if name != "none" else None)
        if r == 0:
            counters.clear()
        t, out = cpu_gen(pipe)
        if r == 0:
            first[name], outs[name] = t, out
            graphs[name] = counters["stats"].get("unique_graphs", 0)
            breaks[name] = sum(counters["graph_break"].values())
            stats[name] = handle.stats() if handle else None
        else:
            times[name].append(t)
        if handle:
            handle.remove()
ref = outs["none"]
base = statistics.median(times["none"])
for name in names:
    ratios = [b / t for b, t in zip(times["none"], times[name])]
    skipped = stats[name]["flops_skipped_fraction"] if stats[name] else 0.0
    err = rel(outs[name], ref) if name != "none" else rel(ref, eager_ref)
    label = "err" if name != "none" else "err vs eager"
    print(f"{variant:18s} {name:16s} {statistics.median(times[name]) * 1000:7.0f} ms CPU"
          f"  speedup {statistics.median(ratios):.2f}x  {label} {err:.4f}  flops skipped {skipped:.2f}"
          f"  first call {first[name]:.1f}s CPU, graphs {graphs[name]}, breaks {breaks[name]}", flush=True)
EOF
  ) 2>&1 | grep -E "^(eager|torchao|inductor)|Error" || true
done
