"""Shared test utilities: tiny configs."""

import os

from matpac_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str = "pp.py", arg: str | None = "smoke"):
    return config_lib.load_config_file(os.path.join(ROOT, "configs", name), name, arg)
