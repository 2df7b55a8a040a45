"""S-SONDO distillation as a task of the trainer (train.loop): a student learns to map its own log-mel of a clip to
the teacher's clip embedding of the same clip (SPEC §6).

Input: distill.data (the teacher pass's corpus and embeddings, cluster-balanced). State: distill.step.DistillState
(params, BatchNorm statistics, optimizer). After training, ``closing`` writes the student (backbone only: the
projection head is dropped) to ``WORKDIR/student/`` and, with ``config.probe.enabled``, probes the student's and the
teacher's embeddings side by side on the demo's labelled split (evaluate.harness, ``config.probe.seeds`` seeds).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from matpac_jax.audio.frontend import LogMelConfig, num_frames
from matpac_jax.config_lib import NON_NEGATIVE, POSITIVE, UNIT_HALF_OPEN, ConfigError, check_numbers
from matpac_jax.data.demo import demo_embeddings, demo_splits
from matpac_jax.distill.corpus import target_stats
from matpac_jax.distill.data import distill_dataset
from matpac_jax.distill.published import initialise_from
from matpac_jax.distill.step import COMPUTE_DTYPES, make_program
from matpac_jax.evaluate.harness import probe_with_ci
from matpac_jax.load import load_model
from matpac_jax.models.student import Student, save_student
from matpac_jax.models.students import count_params, make_student
from matpac_jax.train.task import State, StepProgram, TaskInput

SCRATCH = "none"  # config.student.init_from: start a student that has ImageNet weights from scratch on purpose
IMAGENET_START = {"mobilenet": "mn", "dymn": "dymn"}  # EfficientAT's {prefix}{width x 10:02d}_im.pt


DISTILL_CHECKS = {
    "distill.temperature": POSITIVE,
    "distill.mixup": NON_NEGATIVE,
    "student.width": POSITIVE,
    "student.dropout": UNIT_HALF_OPEN,
    "audio.seconds": POSITIVE,
}


def check_distill(config: ConfigDict) -> None:
    """ConfigError naming the key: the loss and student settings, the input (the teacher pass's record shards), the
    student's start."""
    check_numbers(config, DISTILL_CHECKS)
    if config.data.source != "records":
        raise ConfigError(
            f"config.data.source={config.data.source!r}: distillation reads the teacher pass's record shards "
            "(data.source='records')"
        )
    if config.student.dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"config.student.dtype={config.student.dtype!r}: choose one of {', '.join(COMPUTE_DTYPES)}")
    check_start(config.student)


def check_start(student: ConfigDict) -> None:
    """mn / dymn students start from EfficientAT's ImageNet weights, as every published S-SONDO run (configs/ssondo.py
    docstring): refuse, before anything is computed, a run that names neither them nor ``none``."""
    if student.arch in IMAGENET_START and not student.init_from:
        name = f"{IMAGENET_START[student.arch]}{round(10 * student.width):02d}_im.pt"
        raise ConfigError(
            f"config.student.init_from is empty for a {student.arch} student: the published runs start it from "
            f"EfficientAT's ImageNet weights. Download https://github.com/fschmid56/EfficientAT/releases/download/"
            f"v0.0.1/{name} and pass --config.student.init_from={name}, or --config.student.init_from={SCRATCH} to "
            "train from scratch on purpose"
        )


class DistillTask:
    """S-SONDO distillation as a trainer task (train.task.Task)."""

    console_metrics = (("cos_to_teacher", "cos to teacher"),)
    resume_may_change = ("teacher.checkpoint", "teacher.embeddings")  # where they are, not what they hold

    def __init__(self, config: ConfigDict, workdir: str) -> None:
        self.config, self.workdir = config, workdir

    @property
    def tokens_per_sample(self) -> int:
        """Log-mel frames per clip."""
        a = self.config.audio
        return num_frames(int(round(a.seconds * a.sample_rate)), LogMelConfig.from_audio_config(a))

    def check(self) -> None:
        check_distill(self.config)

    def make_input(self) -> TaskInput:
        c = self.config
        if not c.teacher.embeddings or not c.data.train:
            raise ValueError(
                "distillation needs --config.teacher.embeddings=DIR (a teacher-pass workdir) and "
                "--config.data.train='GLOB' (the corpus that pass read)"
            )
        ds = distill_dataset(
            c.data.train, c.teacher.embeddings, global_batch=c.data.batch_size, sample_rate=c.audio.sample_rate,
            seconds=c.audio.seconds, seed=c.seed, balanced=c.distill.balanced, workers=c.data.workers,
        )  # fmt: skip
        emb = np.load(os.path.join(c.teacher.embeddings, "embeddings.npy"), mmap_mode="r")
        return TaskInput(ds, {"target_dim": emb.shape[1]})

    def periodic_probe(self) -> Callable[[int, State, Any], None]:
        if self.config.probe.every:
            raise ConfigError("config.probe.every: periodic probes are for pretraining; distillation probes at the end")
        return lambda step, state, tb: None

    def build(self, data: TaskInput) -> StepProgram:
        c = self.config
        self.model = make_student(c.student, data.info["target_dim"])
        stats = None if c.distill.targets == "raw" else target_stats(c.teacher.embeddings)
        program = make_program(self.model, c, (1, c.audio.n_mels, self.tokens_per_sample), stats)
        if c.student.init_from in ("", SCRATCH):
            return program
        source = f"config.student.init_from={c.student.init_from}"  # published weights (EfficientAT / S-SONDO)
        weights = lambda abstract: initialise_from(c.student, abstract)  # noqa: E731
        return dataclasses.replace(program, initial_weights=weights, init_from=source)

    def closing(self, state: State) -> dict | None:
        directory = os.path.join(self.workdir, "student")
        if jax.process_index() == 0:
            save_student(directory, self.config, state)
            print(f"student (backbone, {count_params(state.params['backbone']):,} parameters) written to {directory}")
        if not self.config.probe.enabled:
            return None
        return probe_side_by_side(self.config, Student.load(directory))


def probe_side_by_side(config: ConfigDict, student: Student) -> dict:
    """Linear probes of the student's, the initial student's and the teacher's clip embeddings on the demo's
    labelled split (the harness, ``config.probe.seeds`` seeds): {'student', 'init', 'teacher'} and their '_ci95'.
    All three are loaded models (``load_model``'s interface), embedded by the same path as the probe CLI's."""
    d, c = config.data.demo, config
    splits = demo_splits(d.num_train, d.num_test, d.seconds, d.seed, sample_rate=d.sample_rate)
    train = splits[0]
    initial = Student(student.config, Student.initial_variables(student.config, c.seed))
    models: dict[str, Any] = {"student": student, "init": initial, "teacher": load_model(c.teacher.checkpoint)}
    x: dict[str, np.ndarray] = {}
    labels: np.ndarray | None = None
    for name, m in models.items():
        x[name], labels, _ = demo_embeddings(m, splits, d.sample_rate)
    assert labels is not None  # set by the first model
    params = {name: count_params(m.variables["params"] if name != "teacher" else m.params)
              for name, m in models.items()}  # fmt: skip
    seeds = tuple(range(c.seed, c.seed + c.probe.seeds))
    out = {name: probe_with_ci(v, labels, len(train["labels"]), len(train["class_names"]), seeds, c.probe.steps)
           for name, v in x.items()}  # fmt: skip
    if jax.process_index() == 0:
        print("| model | parameters | embedding | demo probe accuracy (mean ± 95 % CI over seeds) |\n|---|---|---|---|")
        for name, r in out.items():
            print(f"| {name} | {params[name]:,} | {x[name].shape[1]} | {100 * r['mean']:.2f} ± {100 * r['ci95']:.2f} |")
    return {name: r["mean"] for name, r in out.items()} | {f"{name}_ci95": r["ci95"] for name, r in out.items()}
