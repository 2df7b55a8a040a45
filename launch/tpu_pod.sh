#!/usr/bin/env bash
# MATPAC++ on a Cloud TPU VM slice: the same command on every worker (jax.distributed detects the slice).
#   TPU=my-v5p-64 ZONE=us-east5-a bash launch/tpu_pod.sh configs/pp.py /mnt/gcs/runs/pp '/mnt/gcs/audioset/*.arrayrecord'
# First run per worker: clones nothing; it expects this repository at ~/matpac_jax (copy it with
# `gcloud compute tpus tpu-vm scp --recurse . $TPU:~/matpac_jax --worker=all`), creates ~/venv and installs into it.
# /mnt/gcs must be mounted on every worker (gcsfuse); the workdir and shards are filesystem paths.
set -euo pipefail
: "${TPU:?TPU name}" "${ZONE:?TPU zone}"
CONFIG=${1:-configs/pp.py}
WORKDIR=${2:?workdir under a shared mount}
TRAIN=${3:?glob of training shards}
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command "
  set -e
  cd ~/matpac_jax
  [ -x ~/venv/bin/python ] || { python3 -m venv ~/venv && ~/venv/bin/pip install -q -U pip \
    && ~/venv/bin/pip install -q -e . 'jax[tpu]'; }
  ~/venv/bin/python -m matpac_jax.main --config=$CONFIG --workdir=$WORKDIR --config.data.train='$TRAIN'
"
