"""Checkpoints with an orbax CheckpointManager under ``WORKDIR/checkpoints/<step>/``.

One checkpoint holds three items:

- ``state``: the whole TrainState (step, student, EMA teachers, center, optimizer moments). The step's random key is
  ``fold_in(key(seed), step)``, a function of the config and the step, so no RNG state needs saving;
- ``config``: the run's config as JSON (what produced the checkpoint);
- ``data``: the grain iterator state of every process (``process_<i>-of-<n>.json``), for ``records`` input. The demo
  input is indexed by step and needs none.

Saves are asynchronous (``config.checkpoint.async_save``): ``save`` returns once the state is copied off the devices
and the files are written in the background; the next save, ``wait`` and ``close`` wait for it. They are atomic:
orbax writes into a temporary directory and renames it when complete, so a crash mid-save leaves the previous
checkpoint as the latest (leftover temporary directories are removed at the next start). The last
``checkpoint.keep`` are kept, plus every multiple of ``checkpoint.keep_period`` when that is > 0.

What may change between save and restore: the mesh, the device count and the sharding rules (arrays are restored
into the target's shardings); the process count only with ``checkpoint.reset_data=True``, because grain's iterator
state is per process (each process reads its own slice): the state is restored and the data pipeline restarts from
the beginning of its order, so the data order differs from an uninterrupted run.
"""

from __future__ import annotations

import os

import grain
import orbax.checkpoint as ocp


def _is_grain_iterator(it) -> bool:
    return it is not None and hasattr(it, "get_state") and hasattr(it, "set_state")


def _remove_unfinished(directory: str) -> None:
    """Delete leftovers of saves that never finished (``<step>.orbax-checkpoint-tmp-*``) before the manager starts.
    Orbax's own clean-up runs in a background future that close() does not wait for, so it is done here, at once."""
    import shutil

    import jax

    if jax.process_index() != 0 or not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if ".orbax-checkpoint-tmp" in name:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3, keep_period: int = 0, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        _remove_unfinished(self.directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                keep_period=keep_period or None,
                create=True,
                cleanup_tmp_directories=True,
                enable_async_checkpointing=async_save,
            ),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
            },
        )

    @classmethod
    def from_config(cls, workdir: str, config) -> Checkpointer:
        c = config.checkpoint
        return cls(workdir, keep=c.keep, keep_period=c.keep_period, async_save=c.async_save)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, abstract_state, step: int | None = None, data_iter=None):
        """Restore into the shapes, dtypes and shardings of ``abstract_state`` (``jax.ShapeDtypeStruct`` leaves); a
        grain iterator passed as ``data_iter`` is moved to the saved position of this process."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if _is_grain_iterator(data_iter):
            import jax

            name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
            if not os.path.exists(os.path.join(self.directory, str(step), "data", name)):
                raise ValueError(
                    f"checkpoint {step} in {self.directory} holds no data-iterator state for this process ({name}): "
                    "it was saved with another process count or another input. Restore the train state with a fresh "
                    "data order by setting --config.checkpoint.reset_data=True"
                )
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self.manager.restore(step, args=ocp.args.Composite(**items)).state

    def save(self, step: int, state, config, data_iter=None, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config.to_dict())}
        if _is_grain_iterator(data_iter):
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
