#!/usr/bin/env bash
# N processes of one job on this machine, as on N hosts (tests, debugging multi-host code): process i runs
# python -m matpac_jax.main --coordinator=localhost:PORT --num_processes=N --process_id=i ARGS...
#   bash launch/local_multiprocess.sh N [--cpu-devices=D] ARGS...
# --cpu-devices=D gives every process D simulated CPU devices (no accelerator needed). If one process fails, the
# others are stopped and the script exits with its status. PYTHON (default: python) is the interpreter to run.
set -euo pipefail
N=$1
shift
if [[ "${1:-}" == --cpu-devices=* ]]; then
  export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${1#--cpu-devices=}"
  shift
fi
PYTHON=${PYTHON:-python}
PORT=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < N; i++)); do
  "$PYTHON" -m matpac_jax.main --coordinator="localhost:$PORT" --num_processes="$N" --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for ((i = 0; i < N; i++)); do
  if ! wait -n; then
    status=1
    kill "${pids[@]}" 2>/dev/null || true
  fi
done
exit $status
