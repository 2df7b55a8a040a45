"""Checkpoints with an orbax CheckpointManager: the train state and the config, saved asynchronously and atomically
(orbax writes to a temporary directory and renames it when complete)."""

from __future__ import annotations

import os

import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, abstract_state, step: int | None = None):
        """Restore into the shapes, dtypes and shardings of `abstract_state` (jax.ShapeDtypeStruct leaves)."""
        step = self.latest_step() if step is None else step
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return out.state

    def save(self, step: int, state, config, force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict()))
        return self.manager.save(step, args=args, force=force)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
