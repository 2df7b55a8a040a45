"""The one read of a training state outside a run: what ``load_model`` (and through it ``embed``, ``convert``,
``finetune.init_from``) builds a trained model from. A checkpoint is verified against its ``checksums.json`` exactly
as a resume verifies it (``checksums.verify``); reading never changes a workdir."""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from matpac_jax.checkpoint import CheckpointError
from matpac_jax.checksums import MANIFEST, verify


def is_training_run(path: str) -> bool:
    """A training workdir (``checkpoints/``) or one of its ``checkpoints/<step>`` directories (``state/``)."""
    return os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isdir(os.path.join(path, "state"))


def verified_step_dir(path: str, check: bool = True) -> str:
    """The checkpoint a reader of ``path`` gets, verified against its ``checksums.json`` as a resume verifies it:
    for a workdir, its latest checkpoint that verifies (newer ones that fail are named on stderr and skipped, not
    moved: reading never changes a workdir); for one ``checkpoints/<step>`` directory, that one. ``CheckpointError``
    names the problem and the fix when nothing verifies. ``check=False``: the latest, unverified."""
    root = os.path.join(path, "checkpoints")
    if not os.path.isdir(root):
        candidates = [path]
    else:
        steps = sorted((int(s) for s in os.listdir(root) if s.isdigit()), reverse=True)
        if not steps:
            raise CheckpointError(f"no finished checkpoint in {root}: train first, or give a checkpoint directory")
        candidates = [os.path.join(root, str(s)) for s in steps]
    if not check:
        return candidates[0]
    rejected = []
    for step_dir in candidates:
        named, problem = verify(step_dir)
        name = os.path.basename(os.path.normpath(step_dir))
        if not problem and name.isdigit() and named != int(name):
            problem = f"it holds the checkpoint of step {named}, not of step {name} (a renamed or copied directory)"
        if not problem:
            for bad, reason in rejected:
                message = f"{bad} is corrupt or unverifiable: {reason}; reading the previous verified one, {step_dir}"
                print(message, file=sys.stderr, flush=True)
            return step_dir
        rejected.append((step_dir, problem))
    detail = "; ".join(f"{d}: {reason}" for d, reason in rejected)
    raise CheckpointError(
        f"no checkpoint of {path} can be verified ({detail}): restore it from a backup or read an earlier "
        f"checkpoints/<step>; one written by an older version (no {MANIFEST}) is read unverified with "
        "matpac_jax.trained_state.read_trained_state(path, check=False)"
    )


def read_trained_state(path: str, check: bool = True) -> tuple[dict, dict]:
    """(config as a dict, state as a tree of numpy arrays) of a workdir's latest checkpoint or of one
    ``checkpoints/<step>`` directory, read on the host without the model: what ``load_model`` builds a trained model
    from. The one read of a training state outside a run, verified first as a resume is (``verified_step_dir``)."""
    step_dir = verified_step_dir(path, check)
    with open(os.path.join(step_dir, "config", "metadata")) as f:
        config = json.load(f)
    state_dir = os.path.abspath(os.path.join(step_dir, "state"))
    # Every array is read whole into host memory, whatever devices and processes wrote it: the saved shardings name
    # the writer's devices (a multi-process job's, a pod's), which a reader on one host does not have.
    tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir)).tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    return config, state
