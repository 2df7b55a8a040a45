"""Entry point: python -m matpac_jax.main --config=configs/pp.py[:variant,key=value] --workdir=DIR

Flags only; the work is in train.loop.train_and_evaluate (one trainer for every task).
"""

from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/pp.py:demo", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics (a local or mounted path).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.getcwd(), ".jax_cache"))
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    from matpac_jax.train.loop import train_and_evaluate

    if config.task != "pretrain":
        raise app.UsageError(f"config.task={config.task!r}: only 'pretrain' is available")
    result = train_and_evaluate(config, _WORKDIR.value)
    if "probe" in result:
        p = result["probe"]
        print(f"probe: learned={p['learned']:.4f} init={p['init']:.4f}", flush=True)


if __name__ == "__main__":
    app.run(main)
