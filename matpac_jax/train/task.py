"""What a method gives the trainer (``train.loop.run``): the ``Task`` protocol and the two values it hands over.

The loop calls a task in this order, each call once:

1. ``make_input()`` -> ``TaskInput``: opens the training data (a step-indexed callable, or a grain dataset whose
   iterator the checkpoints save) and reports what the model needs to know about it (``info``: e.g. the teacher
   embeddings' size); a ``ValueError`` here is a configuration error, reported before anything is compiled;
2. ``periodic_probe()`` -> ``(step, state, tensorboard writer) -> None``, called after every step;
3. ``build(data)`` -> ``StepProgram``: the pure functions of the method (``data`` is what ``make_input`` returned,
   so that the order is explicit); the trainer jits them with the mesh's shardings, buffer donation and the
   non-finite guard (``train.program``), restores or initialises the state, and runs the steps;
4. ``closing(state)`` -> a result dict or None, after the last step (not after a preemption).

A task also declares ``tokens_per_sample`` (what ``tokens_per_s`` counts) and ``console_metrics``: the
``(metric, short name)`` pairs of its console line, which are also checked and named when a step is non-finite.

A task whose periodic evaluation keeps state from one evaluation to the next (its history, the best score and its
step) also implements ``CheckpointedEvaluation``: that state then rides in the checkpoints with the train state, so a
resumed run's evaluation outputs are those of an uninterrupted run whatever the moment of a kill.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax

State = Any  # a flax struct dataclass with an int32 ``step`` field and float leaves


@dataclasses.dataclass(frozen=True)
class TaskInput:
    source: Any  # a callable step -> host batch, or an iterable of host batches (a grain dataset)
    info: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StepProgram:
    """``init(rng) -> state`` and ``step(state, batch, rng) -> (state, metrics)``, pure: the step's metrics hold at
    least 'loss', 'grad_norm' and 'lr'. ``initial_weights``, when set, maps the jitted ``init`` and the sharded
    abstract state to an ``init`` that replaces part of the initial state by stored weights (read on the host)."""

    init: Callable[[jax.Array], State]
    step: Callable[[State, dict, jax.Array], tuple[State, dict]]
    initial_weights: Callable[[Callable, State], Callable] | None = None


class Task(Protocol):
    tokens_per_sample: int
    console_metrics: tuple[tuple[str, str], ...]

    def make_input(self) -> TaskInput: ...

    def periodic_probe(self) -> Callable[[int, State, Any], None]: ...

    def build(self, data: TaskInput) -> StepProgram: ...

    def closing(self, state: State) -> dict | None: ...


@runtime_checkable
class CheckpointedEvaluation(Protocol):
    """Optional, beside ``Task``: an evaluation whose state the checkpoints carry (``checkpoint.py``'s 'task' item).

    The trainer's order, which makes every kill resume to the outputs of an uninterrupted run:

    1. at the start, ``restore_evaluation(saved, step, state)``: ``saved`` is what checkpoint ``step`` holds (None on
       a fresh run, step 0, or for a checkpoint written before this item existed), ``state`` the restored or initial
       train state of that step. The task rewrites its outputs from ``saved`` (lines written after the checkpoint
       are dropped; an output the checkpoint disagrees with is rebuilt);
    2. after the periodic probe of step N, when ``evaluation_state()`` changed, checkpoint N is saved with it and
       committed, whatever ``config.checkpoint.every``: an evaluation is never lost to a kill after it, nor
       counted twice after one before its checkpoint;
    3. then ``evaluation_committed(N, state)``: the outputs that must never run ahead of the checkpoints (a best
       model, which could not be rebuilt from an older one) are written.

    ``evaluation_state()`` is small and JSON-able (it is saved as JSON).
    """

    def evaluation_state(self) -> dict: ...

    def restore_evaluation(self, saved: dict | None, step: int, state: State) -> None: ...

    def evaluation_committed(self, step: int, state: State) -> None: ...
