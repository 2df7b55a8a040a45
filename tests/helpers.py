"""Shared test utilities: tiny configs."""

import os

from matpac_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str = "pp.py", arg: str | None = "smoke"):
    return config_lib.load_config_file(os.path.join(ROOT, "configs", name), name, arg)


def assert_close_to_scale(actual, desired, rtol: float = 1e-5) -> None:
    """|actual - desired| <= rtol * max|desired| elementwise: float32 results computed in another process, batch shape
    or on another CPU differ by a few ulps of the values' scale, not of each element (an element near zero can differ
    by far more than its own ulp)."""
    import numpy as np

    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    assert actual.shape == desired.shape, (actual.shape, desired.shape)
    scale = float(np.max(np.abs(desired))) if desired.size else 0.0
    np.testing.assert_allclose(actual, desired, rtol=0, atol=rtol * max(scale, np.finfo(np.float32).tiny))


def smoke_config(steps: int, **overrides):
    """The smoke pretraining config on one device without its closing probe, ``total_steps=steps``, top-level keys
    overridden."""
    config = load_config()
    config.probe.enabled = False
    config.total_steps = steps
    config.mesh.data = 1
    for key, value in overrides.items():
        config[key] = value
    return config
