"""A trained S-SONDO student outside the trainer: ``save_student`` (called at the end of distillation) writes
``WORKDIR/student/{student.json, variables.msgpack}``; ``Student.load(directory).embed(wave, sample_rate)`` gives its
embeddings; distill.export turns it into ONNX."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from matpac_jax.audio.frontend import LogMelConfig, log_mel, num_frames
from matpac_jax.audio.io import resample
from matpac_jax.distill.students import make_student
from matpac_jax.fileio import atomic_write_bytes, atomic_write_json

STUDENT_FILE, VARIABLES_FILE = "student.json", "variables.msgpack"
_FIX = "save the student again (a distillation run writes WORKDIR/student at its end) or restore the directory"


def _check_leaf(template: np.ndarray, value) -> None:
    if np.shape(value) != template.shape:
        raise ValueError(f"an array of shape {np.shape(value)} where the student has {template.shape}")


def save_student(directory: str, config, state) -> str:
    """``student.json`` (the student and front-end config) and ``variables.msgpack`` (backbone params and BatchNorm
    statistics, float32) of a trained student, each written atomically; the projection head is dropped (SPEC §6)."""
    os.makedirs(directory, exist_ok=True)
    host = jax.device_get({"params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]})
    atomic_write_bytes(os.path.join(directory, VARIABLES_FILE), serialization.to_bytes(host))
    meta = {"student": config.student.to_dict(), "audio": config.audio.to_dict(), "step": int(state.step)}
    atomic_write_json(os.path.join(directory, STUDENT_FILE), meta)
    return directory


class Student:
    """A student backbone with its front-end: ``embed(wave, sample_rate)`` -> embeddings [B, d] (any rate: resampled
    to the student's, soxr HQ; the whole clip is pooled). ``Student.load(WORKDIR/student)`` for a trained one."""

    def __init__(self, config, variables: dict):
        self.config = config  # {'student', 'audio'}
        self.backbone = make_student(config.student).backbone
        self.frontend = LogMelConfig.from_audio_config(config.audio)
        self.variables = jax.tree.map(jnp.asarray, variables)
        self._embed = jax.jit(lambda v, w: self.backbone.apply(v, log_mel(w, self.frontend)))

    @classmethod
    def load(cls, directory: str) -> Student:
        """ValueError naming the file and the fix for a missing, truncated or malformed ``student.json`` /
        ``variables.msgpack``."""
        import ml_collections as mlc

        meta_path, variables_path = os.path.join(directory, STUDENT_FILE), os.path.join(directory, VARIABLES_FILE)
        bad_variables = f"{variables_path} is missing, truncated or not this student's"
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            if not isinstance(meta, dict) or not {"student", "audio"} <= set(meta):
                raise ValueError("no 'student' and 'audio' sections")
        except (OSError, ValueError) as e:
            raise ValueError(f"{meta_path} is missing or malformed ({type(e).__name__}: {e}): {_FIX}") from None
        try:
            with open(variables_path, "rb") as f:
                state = serialization.msgpack_restore(f.read())  # a truncated file fails here, before any tracing
        except Exception as e:  # msgpack's errors have no common base but Exception
            raise ValueError(f"{bad_variables} ({type(e).__name__}: {e}): {_FIX}") from None
        try:
            config = mlc.ConfigDict(meta)
            shapes = jax.eval_shape(cls._init_fn(config), jax.random.key(0))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{meta_path} does not describe a student ({type(e).__name__}: {e}): {_FIX}") from None
        template = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
        try:
            variables = serialization.from_state_dict(template, state)
            jax.tree.map(_check_leaf, template, variables)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{bad_variables} ({type(e).__name__}: {e}): {_FIX}") from None
        return cls(config, variables)

    @staticmethod
    def _init_fn(config):
        """key -> the backbone's variables as the distillation state initialises them (the whole model's init with
        that key: parameters are drawn per module path, so the head's size does not change the backbone's)."""
        model = make_student(config.student)
        fe = LogMelConfig.from_audio_config(config.audio)
        mel = jnp.zeros((1, fe.n_mels, num_frames(int(config.audio.seconds * fe.sample_rate), fe)))

        def init(key):
            v = model.init({"params": key, "dropout": key}, mel)
            return {"params": v["params"]["backbone"], "batch_stats": v["batch_stats"]["backbone"]}

        return init

    @staticmethod
    def initial_variables(config, seed: int) -> dict:
        """The backbone's initial variables for ``seed`` (``DistillState`` starts from ``key(config.seed)``)."""
        return jax.device_get(jax.jit(Student._init_fn(config))(jax.random.key(seed)))

    @property
    def sample_rate(self) -> int:
        return self.frontend.sample_rate

    def embed(self, wave, sample_rate: int | None = None, batch_size: int = 64) -> np.ndarray:
        wave = np.atleast_2d(np.asarray(wave, np.float32))
        if sample_rate is not None and sample_rate != self.sample_rate:
            wave = np.stack([resample(w, sample_rate, self.sample_rate) for w in wave])
        out = [
            np.asarray(self._embed(self.variables, wave[i : i + batch_size])) for i in range(0, len(wave), batch_size)
        ]
        return np.concatenate(out)
