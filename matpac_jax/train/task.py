"""What a method gives the trainer (``train.loop.train_and_evaluate``): the ``Task`` protocol and the two values it
hands over. ``tests/test_toy_task.py`` is a complete task in ~40 lines (a linear regression): the worked example.

The loop calls a task in this order, each call once:

1. ``check()``: the method's own config errors (``config_lib.ConfigError`` naming the key and the fix), before any
   data is read; the loop has checked what every method shares (sizes, mesh, optimizer, front-end) before;
2. ``make_input()`` -> ``TaskInput``: opens the training data (a step-indexed callable, or a grain dataset whose
   iterator the checkpoints save) and reports what the model needs to know about it (``info``: e.g. the teacher
   embeddings' size); a ``ValueError`` here is a configuration error, reported before anything is compiled;
3. ``periodic_probe()`` -> ``(step, state, tensorboard writer) -> None``, called after every step;
4. ``build(data)`` -> ``StepProgram``: the pure functions of the method (``data`` is what ``make_input`` returned,
   so that the order is explicit); the trainer makes the step of them (``train.program``: the optimizer, gradient
   accumulation, the non-finite guard, the mesh's shardings, buffer donation), restores or initialises the state
   (stored weights through ``train.initial_weights``), and runs the steps;
5. ``closing(state)`` -> a result dict or None, after the last step (not after a preemption).

A task also declares ``tokens_per_sample`` (what ``tokens_per_s`` counts), ``console_metrics``: the
``(metric, short name)`` pairs of its console line, which are also checked and named when a step is non-finite, and
``resume_may_change``: its config keys (or 'prefix.') that may differ when a run resumes, beside those every run may
change (``config_lib.RESUME_MAY_CHANGE``).

A task whose periodic evaluation keeps state from one evaluation to the next (its history, the best score and its
step) also implements ``CheckpointedEvaluation``: that state then rides in the checkpoints with the train state, so a
resumed run's evaluation outputs are those of an uninterrupted run whatever the moment of a kill.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax

# A flax struct dataclass (``replace``) with an int32 ``step`` field, the trained parameters in the field the
# program names (``StepProgram.params_field``) and an ``opt_state`` field; every other field belongs to the method.
State = Any
Params = Any  # a pytree of arrays
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class TaskInput:
    source: Any  # a callable step -> host batch, or an iterable of host batches (a grain dataset)
    info: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StepProgram:
    """The pure functions of one method's step. The trainer composes them (``train.program.make_step``)::

        inputs = prepare(state, batch, rng)           # the whole batch, once: front-end, augmentation, masks
        for each micro-batch m of inputs (config.optim.accum_steps of them, examples i, i + A, ...):
            (loss, aux), grads = value_and_grad(loss)(params, state, m, rng)
        params, opt_state = the optimizer's update with the mean gradient (train.optim, from config.optim)
        state, metrics = finish(state, state with step + 1, params and opt_state, aux)

    - ``init(rng)``: the initial state, ``opt_state`` None (the trainer's optimizer fills it);
    - ``prepare``: every array it returns has the batch on its leading axis;
    - ``loss``: one micro-batch's loss (a mean over its examples) and ``aux``, a dict of arrays averaged over the
      micro-batches, except those under a key ending in ``_sum``, which add up (a nested dict is one entry: e.g.
      the BatchNorm statistics each micro-batch moves);
    - ``finish``: what else moves (EMA teachers, centres, BatchNorm statistics) and the method's metrics; the trainer
      adds 'loss', 'lr' and 'grad_norm'.

    What the optimizer needs from the method: ``params_field`` (the state's field holding the trained parameters),
    ``frozen`` (parameters -> a tree of bools, True where a parameter gets no update at all) and ``layer_ids``
    (parameters -> (a tree of layer ids, depth): ``config.optim.layer_decay`` scales layer i's lr by
    ``layer_decay ** (depth + 1 - i)``). ``sharding_rules``: (path regex, logical axes) pairs tried before
    ``parallel.PARAM_RULES``. ``initial_weights(abstract)``: stored weights to start from, as a nested dict that
    mirrors part of the state (host arrays; ``train.initial_weights`` checks their shapes against ``abstract``, casts
    and places them); it reads its files when called, before anything is compiled.
    """

    init: Callable[[jax.Array], State]
    prepare: Callable[[State, Batch, jax.Array], Batch]
    loss: Callable[[Params, State, Batch, jax.Array], tuple[jax.Array, dict]]
    finish: Callable[[State, State, dict], tuple[State, Metrics]]
    params_field: str = "params"
    frozen: Callable[[Params], Any] | None = None
    layer_ids: Callable[[Params], tuple[Any, int]] | None = None
    sharding_rules: tuple[tuple[str, tuple], ...] = ()
    initial_weights: Callable[[State], dict] | None = None
    init_from: str = ""  # where the stored weights come from, e.g. 'config.finetune.init_from=DIR': errors name it


class Task(Protocol):
    # Read-only: a class attribute or a property fits.
    @property
    def tokens_per_sample(self) -> int: ...

    @property
    def console_metrics(self) -> tuple[tuple[str, str], ...]: ...

    @property
    def resume_may_change(self) -> tuple[str, ...]: ...

    def check(self) -> None: ...

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
