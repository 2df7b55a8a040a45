#!/usr/bin/env bash
# N processes of one job on this machine, as on N hosts (tests, debugging multi-host code): process i runs
# python -m matpac_jax.main --coordinator=localhost:PORT --num_processes=N --process_id=i ARGS...
#   bash launch/local_multiprocess.sh N [--cpu-devices=D] ARGS...
# --cpu-devices=D gives every process D simulated CPU devices (no accelerator needed). If one process fails, the
# script names it, sends the others SIGTERM and exits with the first failing status (launch/README.md, "When a process
# fails": the others stop within the heartbeat timeout at most). PYTHON (default: python) is the interpreter to run.
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
  rc=0
  wait -n -p ended || rc=$?
  if ((rc != 0 && status == 0)); then
    status=$rc
    case $rc in
      4) why=" (a collective with another process failed)" ;;
      134) why=" (SIGABRT: JAX's coordination service stopped it, another process was lost or stalled)" ;;
      137) why=" (SIGKILL)" ;;
      *) why="" ;;
    esac
    for ((j = 0; j < N; j++)); do
      if [[ "${pids[j]}" == "$ended" ]]; then
        echo "local_multiprocess.sh: process $j (pid $ended) exited with status $rc$why; stopping the others" >&2
      fi
    done
    if [[ -n "$why" ]]; then
      echo "local_multiprocess.sh: rerun the same command: it resumes from the last committed checkpoint" >&2
    fi
    kill "${pids[@]}" 2>/dev/null || true
  fi
done
exit $status
