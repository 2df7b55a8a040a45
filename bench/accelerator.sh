#!/usr/bin/env bash
# The accelerator checks, prepared for an offline GPU machine lent for a few minutes (carry the wheels of
# ../shared/tools/accelerator_wheels.sh in .whl/). Three parts, each one device call of at most 600 s, in order of
# what is most needed; every section has its own time limit, so a slow one costs its row, not the run. Parts 1 and 2
# fit one 15-minute device session with its start; part 3 is the next session's. Everything printed is also written
# to $OUT (summary.md and one NAME.txt per section).
#
#   bash bench/accelerator.sh 1   # <= 6 min: where the recipe step's time goes (profile), the ladder
#   bash bench/accelerator.sh 2   # <= 6 min: the fine-tuning and distillation steps' profiles, mn10 float32 vs
#                                 #   bfloat16, the recipe step's profile with XLA's attention
#   bash bench/accelerator.sh 3   # <= 9 min: the real data path (prepare -> grain -> step: data wait, host cores),
#                                 #   the teacher pass against the encoder's forward-only rate, XLA GPU flags
#   CPU=1 bash bench/accelerator.sh 1   # the rehearsal on a CPU: the same commands on the smoke configs
set -uo pipefail
part=${1:-1}
out=${OUT:-/tmp/accelerator}
mkdir -p "$out"
PY=${PYTHON:-python}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --find-links=.whl --no-build-isolation -e . 2>&1 | tail -2
fi
export JAX_COMPILATION_CACHE_DIR=$PWD/.jax_cache
quiet() { grep -v "^WARNING\|^I0000\|^W0000\|^E0000"; }
section() { echo; echo "## $1" | tee -a "$out/summary.md"; }
run() {  # run LIMIT_S NAME COMMAND...: prints and keeps the output as $out/NAME.txt
  local limit=$1 name=$2; shift 2
  echo "\$ $*" | tee "$out/$name.txt"
  timeout "$limit" "$@" 2>&1 | quiet | tee -a "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || echo "(exit $rc: timeout or failure after ${limit}s limit)" | tee -a "$out/$name.txt"
}
$PY -c "import jax; print(jax.__version__, jax.devices())" | tee "$out/devices.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null | tee -a "$out/devices.txt"
nproc | sed 's/^/host cores: /' | tee -a "$out/devices.txt"

if [ -n "${CPU:-}" ]; then  # rehearsal sizes
  PP=configs/pp.py:smoke; B=8; FT=configs/finetune_as.py:smoke; FB=8; SS=configs/ssondo.py:smoke; SB=4; STEPS=3; SEC=1
else
  PP=configs/pp.py; B=256; FT=configs/finetune_as.py; FB=64; SS=configs/ssondo.py; SB=120; STEPS=10; SEC=10
fi

if [ "$part" = 1 ]; then
  section "profile: the recipe step, default (attn_impl=auto)"
  run 120 profile_pp $PY bench/profile_step.py --config=$PP --batch=$B --steps=5 --out="$out/profile_pp"
  section "ladder: the recipe step"
  run 240 ladder $PY bench/train_step.py --config=$PP --batch=$B --steps=$STEPS --ladder
elif [ "$part" = 2 ]; then
  section "profile: the fine-tuning step (AS2M batch)"
  run 80 profile_ft $PY bench/profile_step.py --config=$FT --batch=$FB --steps=5 --out="$out/profile_ft"
  section "profile: the distillation step (mn10, the recipe's batch)"
  run 60 profile_distill $PY bench/profile_step.py --config=$SS --batch=$SB --steps=5 --out="$out/profile_distill"
  section "distillation step: mn10 float32 vs bfloat16"
  run 90 distill $PY bench/distill_step.py --students=mn10 --batch=$SB --seconds=$SEC --steps=$STEPS --warmup=2
  section "profile: the recipe step with XLA's attention"
  run 90 profile_pp_xla $PY bench/profile_step.py --config=$PP --batch=$B --steps=5 --set=model.attn_impl=xla
elif [ "$part" = 3 ]; then
  section "end to end: prepare -> grain -> the step (data wait, host cores), the teacher pass"
  if [ -n "${CPU:-}" ]; then
    run 420 end_to_end $PY bench/end_to_end.py --cpu-rehearsal --out="$out/end_to_end.json"
  else
    run 330 end_to_end $PY bench/end_to_end.py --accelerator --out="$out/end_to_end.json"
  fi
  section "XLA GPU flags (one process each; the first row, no flags, is the baseline)"
  for flags in "" "--xla_gpu_enable_latency_hiding_scheduler=true" "--xla_gpu_enable_command_buffer=" \
               "--xla_gpu_enable_triton_gemm=false"; do
    XLA_FLAGS="$flags" run 55 "flags_${flags//[^a-z]/_}" $PY bench/train_step.py --config=$PP --batch=$B \
      --steps=$STEPS --warmup=2
  done
else
  echo "usage: bash bench/accelerator.sh 1|2|3" >&2
  exit 2
fi
echo "figures in $out"
