"""The methods the trainer runs, by ``config.task``: each is a package of its own (model, objective, step, task) that
implements ``train.task.Task``. A new method adds its task class here."""

from __future__ import annotations

from matpac_jax.config_lib import ConfigError
from matpac_jax.distill.task import DistillTask
from matpac_jax.finetune.task import FinetuneTask
from matpac_jax.matpac.task import PretrainTask

TASKS = {"pretrain": PretrainTask, "distill": DistillTask, "finetune": FinetuneTask}


def make_task(config, workdir: str):
    try:
        cls = TASKS[config.task]
    except KeyError:
        raise ConfigError(f"config.task={config.task!r}: the trainer runs one of {', '.join(TASKS)}") from None
    return cls(config, workdir)
