r"""MATPAC pretraining on AudioSet: MATPAC++ (configs/pp.py) with a single prediction head and no MCL.

Launch:
  python -m matpac_jax.main --config=configs/matpac.py --workdir=/mnt/gcs/runs/matpac \
      --config.data.train='/mnt/gcs/audioset/train-*.arrayrecord'

Variants and keys as configs/pp.py (demo, smoke, batch=, steps=).
Expected (published MATPAC, linear-probe average over the 7 tasks of SPEC §7): 75.2.
"""

import ml_collections as mlc

from matpac_jax import config_lib


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    c = config_lib.load_config_file(__file__, "pp.py", arg)
    c.model.mcl_heads = 1  # K = 1: one head, the MCL reduction is the identity
    return c
