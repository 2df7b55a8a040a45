"""Checkpoints with an orbax CheckpointManager under ``WORKDIR/checkpoints/<step>/``.

One checkpoint holds three items:

- ``state``: the whole TrainState (step, student, EMA teachers, center, optimizer moments). The step's random key is
  ``fold_in(key(seed), step)``, a function of the config and the step, so no RNG state needs saving;
- ``config``: the run's config as JSON (what produced the checkpoint);
- ``data``: the grain iterator state of every process (``process_<i>-of-<n>.json``), for ``records`` input. The demo
  input is indexed by step and needs none.
- ``task``: a task's evaluation state as JSON (train.task.CheckpointedEvaluation: its evaluation history, the best
  score and step), when it has one.

Saves are asynchronous (``config.checkpoint.async_save``): ``save`` returns once the state is copied off the devices
and the files are written in the background; the next save, ``wait`` and ``close`` wait for it
(``async_save=False``: ``save`` waits at once). They are atomic: orbax writes into a temporary directory and renames
it when complete, so a crash mid-save leaves the previous checkpoint as the latest (leftover temporary directories are
removed at the next start). The last ``checkpoint.keep`` are kept, plus every multiple of ``checkpoint.keep_period``
when that is > 0.

Integrity: when every process has written its files, and before the rename that commits the checkpoint, process 0
writes ``<step>/checksums.json`` (``checksums``: the step, and the size and sha256 of every file but orbax's two
commit markers). A committed checkpoint therefore always has its manifest, whatever the moment of a kill.
``resume_step`` verifies the latest checkpoint against it (``config.checkpoint.verify``); a corrupt or unverifiable
one (a flipped bit, a truncated or missing file, no manifest) is named with the reason, moved to
``WORKDIR/checkpoints-rejected/`` (nothing is deleted) and the previous one is tried, process 0 deciding for the job
(``distributed.agree``); ``CheckpointError`` (exit 2) names every step and the fix when none is left. A checkpoint
directory whose manifest names another step (a renamed directory) is refused with both numbers.

What may change between save and restore: the mesh, the device count and the sharding rules (arrays are restored
into the target's shardings); the process count only with ``checkpoint.reset_data=True``, because grain's iterator
state is per process (each process reads its own slice): the state is restored and the data pipeline restarts from
the beginning of its order, so the data order differs from an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import grain
import jax
import orbax.checkpoint as ocp

from matpac_jax import checksums, distributed
from matpac_jax.config_lib import ConfigError

REJECTED = "checkpoints-rejected"  # WORKDIR/checkpoints-rejected/<step>: checkpoints that failed verification


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed (corrupt, unverifiable, renamed, another config); the message names the
    step, the reason and the fix. ``python -m matpac_jax.main`` prints it and exits 2."""


def _is_grain_iterator(it) -> bool:
    return it is not None and hasattr(it, "get_state") and hasattr(it, "set_state")


def _remove_unfinished(directory: str) -> None:
    """Delete leftovers of saves that never finished (``<step>.orbax-checkpoint-tmp-*``) before the manager starts.
    Orbax's own clean-up runs in a background future that close() does not wait for, so it is done here, at once."""
    if jax.process_index() != 0 or not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if ".orbax-checkpoint-tmp" in name:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3, keep_period: int = 0, async_save: bool = True, verify: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.async_save, self.verify = async_save, verify
        self._to_seal: list[int] = []  # steps whose saves are under way, in order
        self._verified: set[int] = set()
        _remove_unfinished(self.directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                keep_period=keep_period or None,
                create=True,
                cleanup_tmp_directories=True,
                enable_async_checkpointing=True,  # always: the manifest is written by the commit's callback
                async_options=ocp.AsyncOptions(post_finalization_callback=self._seal),
            ),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "task": ocp.JsonCheckpointHandler(),
            },
        )

    @classmethod
    def from_config(cls, workdir: str, config) -> Checkpointer:
        c = config.checkpoint
        return cls(workdir, keep=c.keep, keep_period=c.keep_period, async_save=c.async_save, verify=c.verify)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    # --- Verification.

    def _renamed(self, step: int, named: int) -> str:
        return (
            f"{self.step_dir(step)} holds the checkpoint of step {named}, not of step {step} (a renamed or copied "
            f"directory): rename it back to {named}, or move it out of {self.directory}"
        )

    def check(self, step: int) -> None:
        """Raise ``CheckpointError`` unless checkpoint ``step`` matches its manifest (no-op with verify=False)."""
        if not self.verify or step in self._verified:
            return
        named, problem = checksums.verify(self.step_dir(step))
        if named is not None and named != step:
            raise CheckpointError(self._renamed(step, named))
        if problem:
            raise CheckpointError(f"checkpoint {step} in {self.directory} is corrupt or unverifiable: {problem}")
        self._verified.add(step)

    def resume_step(self) -> int | None:
        """The latest checkpoint that verifies, or None when there is none at all.

        Newer checkpoints that fail are named (with the reason), moved to ``WORKDIR/checkpoints-rejected/`` and the
        previous one is tried; ``CheckpointError`` names every step and the fix when none verifies (nothing is moved
        then), or names both steps for a directory whose manifest names another step. Process 0 decides for the
        job."""
        decision, error = distributed.agree(self._decide_resume_step, "resume_step")
        if error:
            raise CheckpointError(error)
        step, moved = decision
        if moved:
            self.manager.reload()  # on every process: their managers listed the moved steps at start
        if step is not None and self.verify:
            self._verified.add(step)  # by process 0, for the job
        return step

    def _decide_resume_step(self) -> tuple[tuple[int | None, bool], str | None]:
        """((step, whether checkpoints were moved), error message or None), on process 0."""
        steps = self.all_steps()
        if not steps or not self.verify:
            return ((steps[-1] if steps else None), False), None
        rejected = []
        for step in reversed(steps):
            named, problem = checksums.verify(self.step_dir(step))
            if named is not None and named != step:
                return None, self._renamed(step, named)
            if problem:
                rejected.append((step, problem))
                continue
            self._verified.add(step)
            for bad, reason in rejected:
                moved = self._reject(bad)
                note = f"checkpoint {bad} is corrupt or unverifiable: {reason}"
                fallback = f"moved to {moved}. Resuming from the previous verified checkpoint, step {step}"
                print(f"{note}; {fallback}", file=sys.stderr, flush=True)
            return (step, bool(rejected)), None
        detail = "; ".join(f"step {s}: {reason}" for s, reason in rejected)
        return None, (
            f"no checkpoint in {self.directory} can be verified ({detail}). If they were written by an older version "
            f"(no {checksums.MANIFEST}), resume unverified with --config.checkpoint.verify=False; otherwise restore "
            "them from a backup, or move the directory aside to start over"
        )

    def _reject(self, step: int) -> str:
        """Move checkpoint ``step`` to WORKDIR/checkpoints-rejected/<step>[-n] (kept for inspection)."""
        root = os.path.join(self.workdir, REJECTED)
        os.makedirs(root, exist_ok=True)
        target, n = os.path.join(root, str(step)), 1
        while os.path.exists(target):
            target, n = os.path.join(root, f"{step}-{n}"), n + 1
        os.replace(self.step_dir(step), target)
        return target

    # --- Restore and save.

    def saved_config(self, step: int) -> dict | None:
        """The config that saved checkpoint ``step`` (JSON), or None when it cannot be read."""
        return _read_json(os.path.join(self.step_dir(step), "config", "metadata"))

    def saved_task_state(self, step: int) -> dict | None:
        """The task's evaluation state saved with checkpoint ``step`` (JSON; verified with the checkpoint), or None
        when it holds none (a task without one, or a checkpoint from before the item existed)."""
        return _read_json(os.path.join(self.step_dir(step), "task", "metadata"))

    def restore(self, abstract_state, step: int | None = None, data_iter=None):
        """Restore into the shapes, dtypes and shardings of ``abstract_state`` (``jax.ShapeDtypeStruct`` leaves); a
        grain iterator passed as ``data_iter`` is moved to the saved position of this process. The checkpoint is
        verified first (``CheckpointError``), and must hold the state of its own step."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        self.check(step)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if _is_grain_iterator(data_iter):
            name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
            if not os.path.exists(os.path.join(self.step_dir(step), "data", name)):
                raise ValueError(
                    f"checkpoint {step} in {self.directory} holds no data-iterator state for this process ({name}): "
                    "it was saved with another process count or another input. Restore the train state with a fresh "
                    "data order by setting --config.checkpoint.reset_data=True"
                )
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            state = self.manager.restore(step, args=ocp.args.Composite(**items)).state
        except (ValueError, KeyError, TypeError, OSError) as e:
            if isinstance(e, ValueError) and "reset_data=True" in str(e):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} does not restore into this run's state ({first[:300]}): "
                "resume with the config that saved it, or give a new --workdir"
            ) from e
        saved = getattr(state, "step", None)
        if saved is not None and int(saved) != step:
            raise CheckpointError(
                f"{self.step_dir(step)} holds the state of step {int(saved)}, not of step {step} (a renamed or "
                f"copied directory): rename it to {int(saved)}, or move it out of {self.directory}"
            )
        return state

    def save(
        self, step: int, state, config, data_iter=None, force: bool = False, task_state: dict | None = None
    ) -> bool:
        items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config.to_dict())}
        if _is_grain_iterator(data_iter):
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        if task_state is not None:
            items["task"] = ocp.args.JsonSave(json.loads(json.dumps(task_state)))
        sealer = jax.process_index() == 0  # orbax runs the commit callback on the primary process only
        if sealer:
            self._to_seal.append(step)
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        if not saved and sealer:
            self._to_seal.remove(step)
        elif not self.async_save:
            self.manager.wait_until_finished()
        return saved

    def _seal(self) -> None:
        """Orbax's post-finalization callback (process 0, every process's files written, before the commit rename):
        the manifest of the oldest save under way."""
        step = self._to_seal.pop(0)
        prefix = f"{step}.orbax-checkpoint-tmp"
        pending = [n for n in os.listdir(self.directory) if n.startswith(prefix)]
        step_dir = os.path.join(self.directory, pending[0]) if len(pending) == 1 else self.step_dir(step)
        checksums.write_manifest(step_dir, step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
