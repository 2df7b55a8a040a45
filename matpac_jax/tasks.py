"""The methods the trainer runs, by ``config.task``: each is a package of its own (model, objective, step, task) that
implements ``train.task.Task``. This module sits above every method and the trainer: a new method adds its task class
to ``TASKS``; nothing below (train/, config_lib, parallel, load, checkpoint, inference) imports a method."""

from __future__ import annotations

from collections.abc import Callable

from ml_collections import ConfigDict

from matpac_jax.config_lib import ConfigError
from matpac_jax.distill.task import DistillTask
from matpac_jax.finetune.task import FinetuneTask
from matpac_jax.matpac.task import PretrainTask
from matpac_jax.train import loop
from matpac_jax.train.task import Task

TASKS: dict[str, Callable[[ConfigDict, str], Task]] = {
    "pretrain": PretrainTask,
    "distill": DistillTask,
    "finetune": FinetuneTask,
}


def make_task(config: ConfigDict, workdir: str) -> Task:
    """``config.task``'s task (constructing one reads nothing: its checks run in the trainer, before any data)."""
    try:
        cls = TASKS[config.task]
    except KeyError:
        raise ConfigError(f"config.task={config.task!r}: the trainer runs one of {', '.join(TASKS)}") from None
    return cls(config, workdir)


def check_config(config: ConfigDict) -> None:
    """Every check of a training config, the shared ones and its method's, before anything is read or computed."""
    loop.check_config(config)
    make_task(config, "").check()


def train_and_evaluate(config: ConfigDict, workdir: str) -> dict:
    """``config.task``'s method, trained (or resumed) to ``config.total_steps`` by the one trainer
    (``train.loop.train_and_evaluate``, which documents the result and the errors)."""
    return loop.train_and_evaluate(config, workdir, make_task(config, workdir))
