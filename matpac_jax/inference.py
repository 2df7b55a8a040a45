"""Using a trained encoder: ``load_encoder(path).embed(wave, sample_rate)`` (SPEC §5, "precise" mode).

    from matpac_jax import load_encoder
    enc = load_encoder("runs/pp")                      # a training workdir, one of its checkpoints/<step>, or an
    out = enc.embed(wave, sample_rate=44_100)           # encoder directory written by `python -m matpac_jax.convert`
    out["clip"]    # [B, 3840]       time-mean of the last layer's frame features
    out["frames"]  # [B, T, 3840]    one every 160 ms: the 5 frequency tokens of a time step, concatenated
    enc.embed(wave, 16_000, layers=True)["layers"]  # [B, 12, T, 3840], the last one after the final LayerNorm

Audio at any rate is resampled to 16 kHz (soxr HQ), turned into the log-mel of SPEC §1 on the device, and cut into
chunks of ``crop_frames`` (608) frames; the last chunk is zero-padded to a multiple of 16 frames and sees the
positional table truncated along time. Full chunks of all clips are encoded together in jitted batches of
``chunk_batch`` chunks split over every local device, so the memory needed is bounded whatever the audio length (1 s
to hours) and all devices work. Padding frames of the
last chunk are part of the output, as in the published extractor.

An encoder directory (``encoder.json`` + ``params.npz``) holds the encoder's shape, the front-end and the parameters
(``tokenizer/...``, ``encoder/...``, optionally ``head/...`` for the 527-class AudioSet head and ``probe/...``).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from matpac_jax.audio.frontend import LogMelConfig, log_mel
from matpac_jax.audio.io import resample
from matpac_jax.models.vit import Tokenizer, Transformer

ENCODER_FILE, PARAMS_FILE = "encoder.json", "params.npz"


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """Everything but the weights: the ViT's shape and the audio front-end."""

    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    patch: int = 16
    n_mels: int = 80
    crop_frames: int = 608
    frontend: LogMelConfig = LogMelConfig()

    @classmethod
    def from_config(cls, config) -> EncoderSpec:
        from matpac_jax.train.pretrain import frontend_config

        e = config.model.encoder
        a = config.audio
        return cls(e.dim, e.depth, e.heads, e.mlp_ratio, config.model.patch, a.n_mels, a.crop_frames,
                   frontend_config(config))  # fmt: skip

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> EncoderSpec:
        return cls(**{**d, "frontend": LogMelConfig(**d["frontend"])})


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for key, v in flat.items():
        *parents, leaf = key.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


class Encoder:
    """A loaded encoder; ``params`` = {'tokenizer', 'encoder'[, 'head'][, 'probe']} (see the module docstring)."""

    def __init__(self, spec: EncoderSpec, params: dict, chunk_batch: int = 16, devices=None):
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        self.spec = spec
        devices = list(jax.devices() if devices is None else devices)
        self.mesh = Mesh(np.array(devices), ("data",))
        self.chunk_batch = chunk_batch
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.params = jax.device_put(jax.tree.map(jnp.asarray, params), replicated)
        grid_f = spec.n_mels // spec.patch
        self.tokenizer = Tokenizer(spec.dim, spec.patch, grid_f, spec.crop_frames // spec.patch)
        self.encoder = Transformer(spec.dim, spec.depth, spec.heads, spec.mlp_ratio)
        self._mel = jax.jit(log_mel, static_argnums=1)
        self._chunks = jax.jit(self._encode_chunks, static_argnums=2)
        # Full chunks: a batch split over every device (data parallel), the parameters replicated.
        split = NamedSharding(self.mesh, PartitionSpec("data"))
        self._split_chunks = jax.jit(
            self._encode_chunks, static_argnums=2, in_shardings=(replicated, split), out_shardings=split
        )

    @property
    def chunk_batch(self) -> int:
        return self._chunk_batch

    @chunk_batch.setter
    def chunk_batch(self, value: int) -> None:
        """Chunks per device call, rounded up to a multiple of the device count (each device gets the same share)."""
        n = self.mesh.devices.size
        self._chunk_batch = max(n, -(-int(value) // n) * n)

    def _padded_size(self, n: int) -> int:
        """Chunks per device call for ``n`` chunks: the next power of two, a multiple of the device count, at most
        ``chunk_batch``: a few compiled shapes (log2 of chunk_batch), and one clip is not padded to a full batch."""
        ndev = self.mesh.devices.size
        size = 1 << max(0, (n - 1).bit_length())
        return min(self.chunk_batch, -(-size // ndev) * ndev)

    # --- Saving / loading.

    def save(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, ENCODER_FILE), "w") as f:
            json.dump({"format": "matpac_jax encoder", "version": 1, "spec": self.spec.to_json()}, f, indent=1)
        np.savez(os.path.join(directory, PARAMS_FILE), **flatten(jax.device_get(self.params)))
        return directory

    # --- The forward pass.

    def _encode_chunks(self, params: dict, mel: jax.Array, layers: bool) -> jax.Array:
        """mel chunks [N, F, t] (t a patch multiple) -> [N, L, t/patch, Fp*D] (L = depth, or 1: the last layer)."""
        tokens, cls = self.tokenizer.apply({"params": params["tokenizer"]}, mel)
        x = jnp.concatenate([jnp.broadcast_to(cls, (tokens.shape[0], 1, tokens.shape[2])), tokens], axis=1)
        last, every = self.encoder.apply({"params": params["encoder"]}, x, return_layers=True)
        stack = jnp.stack(every if layers else [last], axis=1)[:, :, 1:]  # drop CLS: [N, L, Fp*Tp, D] freq-major
        n, num, _, d = stack.shape
        fp = self.spec.n_mels // self.spec.patch
        stack = stack.reshape(n, num, fp, -1, d)
        return jnp.transpose(stack, (0, 1, 3, 2, 4)).reshape(n, num, -1, fp * d)

    def _run(self, mel: jax.Array, layers: bool) -> jax.Array:
        """All chunks of mel [B, F, T] -> [B, L, T', Fp*D]."""
        b, f, t = mel.shape
        crop, patch = self.spec.crop_frames, self.spec.patch
        full, rest = divmod(t, crop)
        parts = []
        if full:
            chunks = jnp.transpose(mel[..., : full * crop].reshape(b, f, full, crop), (0, 2, 1, 3)).reshape(-1, f, crop)
            out = []
            for i in range(0, chunks.shape[0], self.chunk_batch):
                part = chunks[i : i + self.chunk_batch]
                n = part.shape[0]
                size = self._padded_size(n)
                if n < size:
                    part = jnp.pad(part, ((0, size - n), (0, 0), (0, 0)))
                out.append(self._split_chunks(self.params, part, layers)[:n])
            feats = jnp.concatenate(out)  # [B*full, L, crop/patch, Fp*D]
            _, num, tp, c = feats.shape
            parts.append(jnp.transpose(feats.reshape(b, full, num, tp, c), (0, 2, 1, 3, 4)).reshape(b, num, -1, c))
        if rest:
            padded = -(-rest // patch) * patch
            last = jnp.pad(mel[..., full * crop :], ((0, 0), (0, 0), (0, padded - rest)))
            parts.append(self._chunks(self.params, last, layers))
        return jnp.concatenate(parts, axis=2)

    def log_mel(self, wave, sample_rate: int = 16_000) -> jax.Array:
        """float waveform(s) [B, samples] or [samples] at any rate -> normalised log-mel [B, F, T] on the device."""
        wave = np.asarray(wave, np.float32)
        if wave.ndim not in (1, 2):
            raise ValueError(f"expected a waveform [samples] or a batch [B, samples], got shape {wave.shape}")
        wave = wave[None] if wave.ndim == 1 else wave
        rate = self.spec.frontend.sample_rate
        if sample_rate != rate:
            wave = np.stack([resample(w, sample_rate, rate) for w in wave])
        if wave.shape[1] < self.spec.frontend.win_length:
            raise ValueError(
                f"audio of {wave.shape[1]} samples at {rate} Hz is shorter than one analysis window "
                f"({self.spec.frontend.win_length} samples)"
            )
        return self._mel(jnp.asarray(wave), self.spec.frontend)

    def embed(self, wave, sample_rate: int = 16_000, layers: bool = False) -> dict:
        """{'clip': [B, Fp*D], 'frames': [B, T, Fp*D]} and, with ``layers``, 'layers': [B, depth, T, Fp*D] (numpy)."""
        feats = self._run(self.log_mel(wave, sample_rate), layers)
        frames = feats[:, -1]
        out = {"clip": np.asarray(jnp.mean(frames, axis=1)), "frames": np.asarray(frames)}
        if layers:
            out["layers"] = np.asarray(feats)
        return out

    def tag(self, wave, sample_rate: int = 16_000) -> np.ndarray:
        """AudioSet class probabilities [B, 527] of a fine-tuned checkpoint with its head (SPEC §5): last-layer tokens
        averaged over frequency, time-mean, BatchNorm (running statistics, no affine, eps 1e-5), linear, softmax."""
        if "head" not in self.params:
            raise ValueError("this encoder has no AudioSet head: tag() needs a fine-tuned checkpoint with head.*")
        mel = self.log_mel(wave, sample_rate)
        frames = self._run(mel, False)[:, -1]  # [B, T, Fp*D]
        b, t, c = frames.shape
        x = frames.reshape(b, t, -1, self.spec.dim).mean(axis=(1, 2))  # freq-average, then time-mean: [B, D]
        h = self.params["head"]
        x = (x - h["norm_mean"]) / jnp.sqrt(h["norm_var"] + 1e-5)
        return np.asarray(jax.nn.softmax(x @ h["kernel"] + h["bias"], axis=-1))


def _read_encoder_dir(path: str) -> Encoder:
    with open(os.path.join(path, ENCODER_FILE)) as f:
        meta = json.load(f)
    if meta.get("format") != "matpac_jax encoder":
        raise ValueError(f"{path}/{ENCODER_FILE} is not a matpac_jax encoder description")
    with np.load(os.path.join(path, PARAMS_FILE)) as data:
        params = unflatten({k: data[k] for k in data.files})
    return Encoder(EncoderSpec.from_json(meta["spec"]), params)


def _read_training_checkpoint(path: str) -> Encoder:
    """A workdir (its latest checkpoint) or one checkpoints/<step> directory of a training run."""
    import ml_collections as mlc
    import orbax.checkpoint as ocp

    step_dir = path
    if os.path.isdir(os.path.join(path, "checkpoints")):
        steps = [int(s) for s in os.listdir(os.path.join(path, "checkpoints")) if s.isdigit()]
        if not steps:
            raise FileNotFoundError(f"no finished checkpoint in {path}/checkpoints")
        step_dir = os.path.join(path, "checkpoints", str(max(steps)))
    with open(os.path.join(step_dir, "config", "metadata")) as f:
        config = mlc.ConfigDict(json.load(f))
    state = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(step_dir, "state")))
    get = (lambda k: state[k]) if isinstance(state, dict) else (lambda k: getattr(state, k))
    # the encoder, plus the training-only parts, so that `convert --to-torch` can write the full published layout
    params = {**get("student"), "teacher": get("teacher"), "center": get("center")}
    return Encoder(EncoderSpec.from_config(config), jax.tree.map(np.asarray, params))


def load_encoder(path: str, chunk_batch: int = 16) -> Encoder:
    """An encoder from an encoder directory (``encoder.json``), a training workdir or one of its checkpoints."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, ENCODER_FILE)):
        enc = _read_encoder_dir(path)
    elif os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isdir(os.path.join(path, "state")):
        enc = _read_training_checkpoint(path)
    else:
        raise FileNotFoundError(
            f"{path}: neither an encoder directory ({ENCODER_FILE}) nor a training workdir / checkpoint; convert a "
            "published PyTorch checkpoint with `python -m matpac_jax.convert --torch-checkpoint=FILE --output=DIR`"
        )
    enc.chunk_batch = chunk_batch
    return enc
