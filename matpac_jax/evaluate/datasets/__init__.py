"""Dataset adapters for the linear-probe evaluation harness (the MATPAC downstream protocol).

Each adapter reads a dataset's *official* metadata from a local folder (nothing is downloaded) and returns a
:class:`Task`: one absolute audio path per clip, its labels, the class names and the evaluation protocol (k-fold
ids or a fixed train / valid / test split). Adapters only read metadata and list directories; audio is never
decoded here. One module per adapter, whose docstring gives the expected layout: ``esc50``, ``us8k``, ``gtzan``,
``nsynth``, ``openmic``, ``fsd50k``, ``mtt``, ``folder``; the shared behaviour (missing metadata / audio) is
described in ``common``. Names ``tfds:NAME`` read a labelled tfds dataset prepared in ArrayRecord format, ``root``
being its data_dir (``tfds_task``).

Use :func:`load_task` (``load_task("esc50", "/data/ESC-50-master")``, ``load_task("tfds:my_set", "/data/tfds")``)
or the :data:`ADAPTERS` registry.
"""

from __future__ import annotations

from collections.abc import Callable

from matpac_jax.evaluate.datasets.common import SPLITS, Task
from matpac_jax.evaluate.datasets.esc50 import esc50
from matpac_jax.evaluate.datasets.folder import folder
from matpac_jax.evaluate.datasets.fsd50k import fsd50k
from matpac_jax.evaluate.datasets.gtzan import gtzan
from matpac_jax.evaluate.datasets.mtt import mtt
from matpac_jax.evaluate.datasets.nsynth import NSYNTH_FAMILIES, nsynth
from matpac_jax.evaluate.datasets.openmic import openmic
from matpac_jax.evaluate.datasets.tfds_task import PREFIX as TFDS_PREFIX
from matpac_jax.evaluate.datasets.tfds_task import tfds_task
from matpac_jax.evaluate.datasets.us8k import us8k

__all__ = [
    "ADAPTERS",
    "NSYNTH_FAMILIES",
    "SPLITS",
    "Task",
    "esc50",
    "folder",
    "fsd50k",
    "gtzan",
    "load_task",
    "mtt",
    "nsynth",
    "openmic",
    "tfds_task",
    "us8k",
]

ADAPTERS: dict[str, Callable[[str], Task]] = {
    "esc50": esc50,
    "us8k": us8k,
    "gtzan": gtzan,
    "nsynth": nsynth,
    "openmic": openmic,
    "fsd50k": fsd50k,
    "mtt": mtt,
    "folder": folder,
}


def load_task(name: str, root: str) -> Task:
    """Load the task ``name`` (a key of :data:`ADAPTERS`, or ``tfds:NAME``) from the local dataset folder ``root``
    (for ``tfds:NAME``, the tfds data_dir)."""
    if name.startswith(TFDS_PREFIX):
        return tfds_task(name, root)
    adapter = ADAPTERS.get(name)
    if adapter is None:
        known = ", ".join([*sorted(ADAPTERS), f"{TFDS_PREFIX}NAME"])
        raise ValueError(f"unknown dataset adapter {name!r}; available: {known}")
    return adapter(root)
