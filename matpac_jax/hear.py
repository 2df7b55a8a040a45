"""The HEAR 2021 API (https://hearbenchmark.com/hear-api.html) over ``matpac_jax.load.load_model``: any trained model.

    import matpac_jax.hear as hear
    model = hear.load_model("models/pp")                     # model directory, training workdir or checkpoint
    scene = hear.get_scene_embeddings(audio, model)          # audio [n_sounds, n_samples] at 16 kHz -> [n, 3840]
    emb, ts = hear.get_timestamp_embeddings(audio, model)    # [n, T, 3840], timestamps [n, T] in milliseconds

Scene embeddings are the clip embeddings of SPEC §5 (time-mean of the last layer's frame features); timestamp
embeddings are its frame features, one every 160 ms, stamped at the centre of the 16 log-mel frames they cover:
``160 * i + 87.5`` ms (frame j of the front-end is centred on sample ``160 j + 200``). A model reads audio at its own
rate (``model.sample_rate``: 16 kHz for the ViT encoders, 32 kHz for S-SONDO students); students pool the whole clip,
so they give scene embeddings only (``get_timestamp_embeddings`` raises a ValueError saying so).

``audio`` may be a numpy array, a JAX array, or a torch / TensorFlow tensor; the outputs are of the same kind
(torch tensors for torch input, which the HEAR validator checks). With ``torch`` installed, ``load_model`` returns a
``torch.nn.Module`` wrapper (the validator requires one) that only holds the JAX encoder; without it, the encoder's
own ``HearModel``.

Validate (needs ``pip install hearvalidator`` and its torch + tensorflow requirements):
    hear-validator matpac_jax.hear --model models/pp
"""

from __future__ import annotations

import numpy as np

from matpac_jax import load

SAMPLE_RATE = 16_000  # the ViT encoders' front-end
HOP_MS = 10.0  # 160 samples at 16 kHz


class HearModel:
    """The attributes HEAR asks for, around any loaded model (``load.Model``)."""

    def __init__(self, encoder):
        if encoder.frame_rate is not None and encoder.sample_rate != SAMPLE_RATE:
            raise ValueError(f"HEAR timestamps here assume {SAMPLE_RATE} Hz front-ends, got {encoder.sample_rate} Hz")
        self.encoder = encoder
        self.sample_rate = int(encoder.sample_rate)
        self.scene_embedding_size = int(encoder.embedding_dim)
        self.timestamp_embedding_size = int(encoder.embedding_dim)


def _make_torch_module(model: HearModel):
    import torch

    class HearTorchModule(torch.nn.Module):
        """The validator requires a torch Module: this one only carries the JAX encoder and the HEAR attributes."""

        def __init__(self, inner: HearModel):
            super().__init__()
            self.inner = inner
            self.sample_rate = inner.sample_rate
            self.scene_embedding_size = inner.scene_embedding_size
            self.timestamp_embedding_size = inner.timestamp_embedding_size

    return HearTorchModule(model)


def load_model(model_file_path: str = ""):
    """``model_file_path``: a model directory, a training workdir or a checkpoint (required)."""
    if not model_file_path:
        raise ValueError("matpac_jax.hear.load_model needs a model path (a model directory or a training workdir)")
    model = HearModel(load.load_model(model_file_path))
    try:
        import torch  # noqa: F401
    except ImportError:
        return model
    return _make_torch_module(model)


def _to_numpy(audio) -> tuple[np.ndarray, str]:
    kind = type(audio).__module__.split(".")[0]
    if kind == "torch":
        return audio.detach().cpu().numpy().astype(np.float32), "torch"
    if kind == "tensorflow":
        return audio.numpy().astype(np.float32), "tensorflow"
    return np.asarray(audio, np.float32), "numpy"


def _like(x: np.ndarray, kind: str):
    if kind == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(x))
    if kind == "tensorflow":
        import tensorflow as tf

        return tf.convert_to_tensor(x)
    return x


def _inner(model) -> HearModel:
    return model.inner if hasattr(model, "inner") else model


def timestamps_ms(num_frames: int, patch: int) -> np.ndarray:
    """Centre, in ms, of each output frame: the mean centre of the ``patch`` front-end frames it covers."""
    i = np.arange(num_frames, dtype=np.float64)
    return (i * patch + (patch - 1) / 2) * HOP_MS + 12.5  # window centre: 200 samples = 12.5 ms


def get_timestamp_embeddings(audio, model):
    """audio [n_sounds, n_samples] (16 kHz) -> (embeddings [n, T, D] float32, timestamps [n, T] ms)."""
    inner = _inner(model)
    x, kind = _to_numpy(audio)
    if x.ndim != 2:
        raise ValueError(f"HEAR audio is [n_sounds, n_samples], got shape {x.shape}")
    if inner.encoder.frame_rate is None:
        raise ValueError("this model pools the whole clip: it has scene embeddings only (get_scene_embeddings)")
    frames = inner.encoder.embed(x, SAMPLE_RATE)["frames"].astype(np.float32)
    ts = np.broadcast_to(timestamps_ms(frames.shape[1], inner.encoder.spec.patch), frames.shape[:2]).astype(np.float32)
    return _like(frames, kind), _like(np.ascontiguousarray(ts), kind)


def get_scene_embeddings(audio, model):
    """audio [n_sounds, n_samples] (16 kHz) -> [n, D] float32: the clip embeddings."""
    inner = _inner(model)
    x, kind = _to_numpy(audio)
    if x.ndim != 2:
        raise ValueError(f"HEAR audio is [n_sounds, n_samples], got shape {x.shape}")
    return _like(inner.encoder.embed(x, inner.sample_rate)["clip"].astype(np.float32), kind)
