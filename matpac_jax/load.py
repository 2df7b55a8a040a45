"""``load_model(path)``: every kind of trained model behind one interface.

    from matpac_jax import load_model
    model = load_model("runs/pp")              # a MATPAC / MATPAC++ training workdir, or one of its checkpoints/<step>
    model = load_model("models/pp")            # a model directory: converted published weights (convert), an
                                               # AudioSet-fine-tuned encoder (``tag``), a distilled student
    model = load_model("runs/student")         # an S-SONDO distillation workdir (its student)
    out = model.embed(wave, sample_rate=44_100)
    out["clip"]                                # [B, embedding_dim]; 'frames' [B, T, d] too for ViT encoders

Every model has ``embed(wave, sample_rate)``, ``embed_clips(waves, sample_rate)`` (clips of any lengths), and tells
``sample_rate`` (the rate it reads; other rates are resampled), ``min_samples``, ``embedding_dim``, ``frame_rate``
(frame embeddings per second, None when the model pools the whole clip), ``describe()`` and ``weights_digest()``
(what caches of its embeddings are keyed on), and ``save(directory)`` (matpac_jax.saved_model's format). The probe,
``embed``, ``hear``, the S-SONDO teacher pass and the demo probes all take any of them.
"""

from __future__ import annotations

import os
from typing import Protocol

import jax
import ml_collections as mlc
import numpy as np

from matpac_jax.inference import Encoder, EncoderSpec
from matpac_jax.models.student import Student
from matpac_jax.saved_model import MODEL_FILE, is_model_dir, read_model_dir
from matpac_jax.trained_state import is_training_run, read_trained_state


class Model(Protocol):
    sample_rate: int
    min_samples: int
    embedding_dim: int
    frame_rate: float | None

    def embed(self, wave, sample_rate: int) -> dict: ...

    def embed_clips(self, waves, sample_rate: int) -> list[dict]: ...

    def describe(self) -> dict: ...

    def weights_digest(self) -> str: ...

    def save(self, directory: str) -> str: ...


def _from_dir(path: str) -> Model:
    kind, spec, weights = read_model_dir(path)
    if kind == "vit":
        return Encoder.from_saved(spec, weights, where=path)
    if kind == "student":
        return Student.from_saved(spec, weights, where=path)
    raise ValueError(f"{path}/{MODEL_FILE}: unknown model kind {kind!r} (this version reads 'vit' and 'student')")


def _from_training_run(path: str) -> Model:
    """The trained model of a workdir's latest checkpoint (or of one checkpoint): the student encoder of a
    pretraining run, with its EMA teacher and center kept so that ``convert --to-torch`` writes the full published
    layout; the student backbone of a distillation run."""
    config, state = read_trained_state(path)
    host = lambda tree: jax.tree.map(np.asarray, tree)  # noqa: E731
    task = config["task"]
    if task == "pretrain":
        params = {**host(state["student"]), "teacher": host(state["teacher"]), "center": host(state["center"])}
        return Encoder(EncoderSpec.from_config(mlc.ConfigDict(config)), params)
    if task == "distill":
        weights = {"params": host(state["params"]["backbone"]), "batch_stats": host(state["batch_stats"]["backbone"])}
        return Student.from_saved(config, weights, where=path)
    raise ValueError(f"{path}: a '{task}' run has no model to load")


def load_model(path: str | os.PathLike, chunk_batch: int = 16) -> Model:
    """A trained model from a model directory, a training workdir or one of its checkpoints (module docstring).
    ``chunk_batch``: chunks per device call for ViT encoders (memory bound of ``embed``)."""
    path = os.fspath(path)
    if is_model_dir(path):
        model = _from_dir(path)
    elif is_training_run(path):
        model = _from_training_run(path)
    elif os.path.isfile(os.path.join(path, "student", MODEL_FILE)):  # a distillation workdir after its end
        model = _from_dir(os.path.join(path, "student"))
    else:
        raise FileNotFoundError(
            f"{path}: neither a model directory ({MODEL_FILE}) nor a training workdir / checkpoint; convert a "
            "published PyTorch checkpoint with `python -m matpac_jax.convert --torch-checkpoint=FILE --output=DIR`, "
            "a published student with `python -m matpac_jax.distill.published`"
        )
    if isinstance(model, Encoder):
        model.chunk_batch = chunk_batch
    return model


def load_encoder(path: str | os.PathLike, chunk_batch: int = 16) -> Encoder:
    """``load_model`` for callers that need a ViT encoder (its layers, ``tag``, ``convert --to-torch``): a
    ValueError names what else the path holds."""
    model = load_model(path, chunk_batch)
    if not isinstance(model, Encoder):
        raise ValueError(f"{os.fspath(path)} holds a {model.describe()['kind']} model, not a ViT encoder")
    return model
