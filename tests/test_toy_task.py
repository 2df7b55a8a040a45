"""The ``Task`` protocol (train.task) by example: a linear regression, the whole method in one class, trained by the
one trainer (``train.loop.train_and_evaluate``) with its optimizer, checkpoints and resume. A new method writes the
same calls (check, make_input, periodic_probe, build, closing); the trainer brings the rest.

The regression y = x·w + b (w = (2, -1, 0.5), b = 0.3, no noise) from zero weights: Adam must reach the true
weights; a run that crashed after step 121 and resumed from its checkpoint of step 100 ends where an uninterrupted
one does; four accumulated micro-batches give the update of the whole batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import struct
from helpers import load_config

from matpac_jax.train.loop import train_and_evaluate
from matpac_jax.train.task import StepProgram, TaskInput

TRUE_W, TRUE_B = np.array([2.0, -1.0, 0.5], np.float32), 0.3


@struct.dataclass
class LinearState:
    step: jax.Array  # the trainer's: updates so far
    params: dict  # the trainer's: what the optimizer trains
    opt_state: optax.OptState  # the trainer's: filled by its optimizer


class LinearRegression:
    tokens_per_sample = 1
    console_metrics = (("mse", "mse"),)
    resume_may_change = ()

    def __init__(self, config, crash_at: int = 0):
        self.config, self.crash_at = config, crash_at  # crash_at: a crash after that step, to test resume

    def check(self) -> None:  # the method's own config keys: none here
        pass

    def make_input(self) -> TaskInput:
        def batch(step: int) -> dict:  # step-indexed: a resumed run sees the batches of an uninterrupted one
            x = np.random.default_rng(step).normal(size=(self.config.data.batch_size, 3)).astype(np.float32)
            return {"x": x, "y": x @ TRUE_W + TRUE_B}

        return TaskInput(batch)

    def periodic_probe(self):
        def probe(step, state, tb):
            if step == self.crash_at:
                raise RuntimeError(f"crash after step {step}")

        return probe

    def build(self, data: TaskInput) -> StepProgram:
        def init(rng):
            return LinearState(jnp.zeros((), jnp.int32), {"w": jnp.zeros(3), "b": jnp.zeros(())}, None)

        def loss(params, state, batch, rng):
            mse = jnp.mean((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2)
            return mse, {"mse": mse}

        prepare = lambda state, batch, rng: batch  # noqa: E731 -- no front-end, no augmentation
        return StepProgram(init=init, prepare=prepare, loss=loss, finish=lambda state, new, aux: (new, aux))

    def closing(self, state) -> dict:
        return {"w": np.asarray(state.params["w"]), "b": float(state.params["b"])}


def toy_config(steps: int):
    """The trainer's own keys only: the run, the mesh, the batch, the optimizer and the checkpoints (sections taken
    from the smoke config, whose other sections are its method's)."""
    base = load_config()
    trainer_keys = ("seed", "log_every", "nonfinite", "nonfinite_max_skips", "profile_steps", "checkpoint", "optim")
    config = ml_collections.ConfigDict({k: base[k] for k in trainer_keys})
    config.total_steps, config.mesh = steps, {"data": 1}
    config.data = {"batch_size": 32, "device_prefetch": 1}
    config.optim.update(optimizer="adamw", lr=0.1, warmup_steps=5, weight_decay=0.0, layer_decay=1.0, accum_steps=1)
    config.checkpoint.every = 50
    return config


def test_a_toy_task_trains_resumes_and_accumulates(tmp_path):
    result = train_and_evaluate(toy_config(200), str(tmp_path / "whole"), LinearRegression(toy_config(200)))
    np.testing.assert_allclose(result["probe"]["w"], TRUE_W, atol=2e-2)
    assert result["probe"]["b"] == pytest.approx(TRUE_B, abs=2e-2)
    assert result["final_metrics"]["mse"] < 1e-3

    stopped = tmp_path / "stopped"
    with pytest.raises(RuntimeError, match="crash after step 121"):  # the last checkpoint: step 100
        train_and_evaluate(toy_config(200), str(stopped), LinearRegression(toy_config(200), crash_at=121))
    resumed = train_and_evaluate(toy_config(200), str(stopped), LinearRegression(toy_config(200)))
    np.testing.assert_allclose(resumed["probe"]["w"], result["probe"]["w"], rtol=1e-5, atol=1e-6)

    config = toy_config(200)
    config.optim.accum_steps = 4  # the trainer's accumulation: four micro-batches of 8, the same update
    accumulated = train_and_evaluate(config, str(tmp_path / "accum"), LinearRegression(config))
    np.testing.assert_allclose(accumulated["probe"]["w"], result["probe"]["w"], rtol=1e-4, atol=1e-5)
