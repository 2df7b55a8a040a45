"""Entry point: python -m matpac_jax.main --config=configs/pp.py[:variant,key=value] --workdir=DIR

Flags only. ``--coordinator``, ``--num_processes``, ``--process_id`` start a multi-process job (distributed.py; TPU
pods and SLURM are detected). ``config.task`` picks the work: 'pretrain' (MATPAC / MATPAC++) and 'distill' (S-SONDO
students) run the one trainer, train.loop.train_and_evaluate; 'teacher_pass' runs the S-SONDO teacher-embedding pass
and its k-means into WORKDIR (distill.teacher_pass.run_from_config). Exit status: 0 when the run finished or was
preempted (SIGTERM: it saved and says where it resumes), 3 when it stopped on a non-finite loss or gradient
(WORKDIR/nonfinite_report.json), 2 for a config error found before any compute (the message names the key and the
fix), 1 for anything else.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/pp.py:demo", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics (a local or mounted path).")
_COORDINATOR = flags.DEFINE_string("coordinator", "", "Multi-process: HOST:PORT of process 0 (see distributed.py).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Multi-process: number of processes of the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "Multi-process: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax / grain log every save at INFO; -v 0 shows them
    config = _CONFIG.value
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.getcwd(), ".jax_cache"))
    from matpac_jax import distributed

    try:
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    from matpac_jax.config_lib import ConfigError
    from matpac_jax.train.loop import train_and_evaluate
    from matpac_jax.train.metrics_log import NonFiniteError

    try:
        if config.task == "teacher_pass":
            from matpac_jax.distill.teacher_pass import run_from_config

            sys.exit(run_from_config(config, _WORKDIR.value))
        result = train_and_evaluate(config, _WORKDIR.value)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    if "probe" in result:
        means = {k: v for k, v in result["probe"].items() if not k.endswith("_ci95")}
        print("probe: " + " ".join(f"{k}={v:.4f}" for k, v in means.items()), flush=True)


if __name__ == "__main__":
    app.run(main)
