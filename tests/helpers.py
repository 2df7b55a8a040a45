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


def write_tone_folder(root, count: int, rate: int, first: int, step: int, high_hz: float, column: str, value) -> None:
    """A `folder` dataset under ``root``: ``count`` clips of ``first + step·i`` samples at ``rate`` Hz, alternately a
    ``high_hz`` tone ('high') and a 300 Hz one ('low') with a little noise, and ``labels.csv`` whose third column
    ``column`` holds ``value(i)``."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        t = np.arange(first + step * i) / rate
        wave = 0.3 * np.sin(2 * np.pi * (300 if i % 2 else high_hz) * t) + 0.01 * rng.standard_normal(t.size)
        sf.write(root / f"{i}.wav", wave.astype(np.float32), rate, subtype="FLOAT")
        rows.append(f"{i}.wav,{'low' if i % 2 else 'high'},{value(i)}")
    (root / "labels.csv").write_text(f"path,labels,{column}\n" + "\n".join(rows) + "\n")


def assert_resumes_from_iterator_state(ds, first: list) -> None:
    """A grain dataset of indices: an iterator moved 25 elements, saved, read 15 more; a fresh iterator restored from
    the saved state gives the same 15, which are ``first[25:40]``."""
    it = iter(ds.to_iter_dataset())
    for _ in range(25):
        next(it)
    state = it.get_state()
    rest = [next(it) for _ in range(15)]
    fresh = iter(ds.to_iter_dataset())
    fresh.set_state(state)
    assert [next(fresh) for _ in range(15)] == rest == first[25:40]
