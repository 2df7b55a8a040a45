#!/usr/bin/env bash
# The S-SONDO chain on the demo, CPU, minutes: pretrain a teacher -> demo corpus as records (32 kHz) -> teacher pass
# + k-means -> distil a tiny student -> linear probes of student, initial student and teacher side by side -> ONNX
# export (front-end included) checked against JAX with onnxruntime.
#   bash launch/ssondo_demo.sh [WORKDIR=/tmp/ssondo_demo] [VARIANT=demo|smoke]
# Every step is resumable: rerunning the script continues where it stopped. 'smoke' is the tests' tiny version.
# PYTHON (default: python) is the interpreter to run.
set -euo pipefail
W=${1:-/tmp/ssondo_demo}
V=${2:-demo}
PYTHON=${PYTHON:-python}
if [ "$V" = smoke ]; then
  SIZES=(--num-train=32 --num-test=16); EXPORT=(--seconds=1 --repeats=2); PRETRAIN=(--config.probe.enabled=False)
else
  SIZES=(); EXPORT=(); PRETRAIN=()
fi
mkdir -p "$W"
"$PYTHON" -m matpac_jax.main --config=configs/pp.py:"$V" --workdir="$W/teacher" "${PRETRAIN[@]}"
[ -f "$W/corpus/clips-00001-of-00002.arrayrecord" ] || "$PYTHON" -m matpac_jax.data.demo --output="$W/corpus" "${SIZES[@]}"
COMMON=(--config.teacher.checkpoint="$W/teacher" --config.data.train="$W/corpus/*.arrayrecord")
"$PYTHON" -m matpac_jax.main --config=configs/ssondo.py:"$V" --config.task=teacher_pass --workdir="$W/teacher_pass" \
    "${COMMON[@]}"
"$PYTHON" -m matpac_jax.main --config=configs/ssondo.py:"$V" --workdir="$W/student" \
    --config.teacher.embeddings="$W/teacher_pass" "${COMMON[@]}"
"$PYTHON" -m matpac_jax.distill.export "$W/student/student" "$W/student.onnx" "${EXPORT[@]}"
