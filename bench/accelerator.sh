#!/usr/bin/env bash
# The accelerator checks in one run (an offline machine: carry the wheels of ../shared/tools/accelerator_wheels.sh in
# .whl/): install, the pretraining step ladder of ViT-B at batch 256 (bench/train_step.py --ladder), and the S-SONDO
# distillation step at the recipe's batch 120 (bench/distill_step.py). Prints everything; copies it to $OUT if set.
set -uo pipefail
out=${OUT:-/tmp/accelerator}
mkdir -p "$out"
PY=${PYTHON:-python}
$PY -m pip install -q --no-index --find-links=.whl --no-build-isolation -e . 2>&1 | tail -2
export JAX_COMPILATION_CACHE_DIR=$PWD/.jax_cache
$PY -c "import jax; print(jax.__version__, jax.devices())" | tee "$out/devices.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null | tee -a "$out/devices.txt"
timeout "${LADDER_S:-330}" $PY bench/train_step.py --config=configs/pp.py --batch=256 --steps=10 --ladder 2>&1 \
  | grep -v "^WARNING\|^I0000\|^W0000" | tee "$out/ladder.txt"
timeout "${DISTILL_S:-150}" $PY bench/distill_step.py --students=mn10 --batch=120 --steps=10 --warmup=2 2>&1 \
  | grep -v "^WARNING\|^I0000\|^W0000" | tee "$out/distill.txt"
