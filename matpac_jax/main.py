"""Entry point: python -m matpac_jax.main --config=configs/pp.py[:variant,key=value] --workdir=DIR

Flags only; the work is in train.loop.train_and_evaluate (one trainer for every task). Exit status: 0 when the run
finished or was preempted (SIGTERM: it saved and says where it resumes), 3 when it stopped on a non-finite loss or
gradient (WORKDIR/nonfinite_report.json), 2 for a config error found before any compute (the message names the key
and the fix), 1 for anything else.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/pp.py:demo", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics (a local or mounted path).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax / grain log every save at INFO; -v 0 shows them
    config = _CONFIG.value
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.getcwd(), ".jax_cache"))
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    from matpac_jax.config_lib import ConfigError
    from matpac_jax.train.loop import train_and_evaluate
    from matpac_jax.train.metrics_log import NonFiniteError

    if config.task != "pretrain":
        raise app.UsageError(f"config.task={config.task!r}: only 'pretrain' is available")
    try:
        result = train_and_evaluate(config, _WORKDIR.value)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    if "probe" in result:
        p = result["probe"]
        print(f"probe: learned={p['learned']:.4f} init={p['init']:.4f}", flush=True)


if __name__ == "__main__":
    app.run(main)
