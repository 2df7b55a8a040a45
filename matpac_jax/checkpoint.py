"""Checkpoints with an orbax CheckpointManager: the train state, the config and (for grain input) the data iterator
state of every process, saved asynchronously and atomically (orbax writes to a temporary directory and renames it
when complete)."""

from __future__ import annotations

import os

import grain
import orbax.checkpoint as ocp


def _is_grain_iterator(it) -> bool:
    return it is not None and hasattr(it, "get_state") and hasattr(it, "set_state")


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, abstract_state, step: int | None = None, data_iter=None):
        """Restore into the shapes, dtypes and shardings of `abstract_state` (jax.ShapeDtypeStruct leaves); a grain
        iterator passed as `data_iter` is moved to the saved position of this process."""
        step = self.latest_step() if step is None else step
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if _is_grain_iterator(data_iter):
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self.manager.restore(step, args=ocp.args.Composite(**items)).state

    def save(self, step: int, state, config, data_iter=None, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config.to_dict())}
        if _is_grain_iterator(data_iter):
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
