"""Every loader the package has, against hostile or damaged inputs: each case is refused with an error of the loader's
refusal class (ValueError and its subclasses ConfigError / ConversionError / PrepareError, or audio's AudioError; a
CLI's exit 2 with one ``error:`` line) whose message names the file and the problem; never another exception, never a
silent result. A new loader joins by one line in ``CASES``: (name, build(tmp_path, fixtures) -> path, read(path),
what the message must say).

Model directories are built from a small converted encoder (``good_dir``); a damaged copy whose weights or spec were
rewritten is written as version 2 (no digest, as an older writer or a hostile one writes it), so the check behind the
digest is what refuses it."""

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import struct
import wave
import zipfile

import numpy as np
import pytest
from test_convert_safety import MALFORMED, _Payload
from test_inference import HEADS, published_state_dict

from matpac_jax import embed
from matpac_jax.audio.io import AudioError, load_audio
from matpac_jax.convert import from_torch
from matpac_jax.data import prepare
from matpac_jax.data.tfds_source import open_split
from matpac_jax.distill import published
from matpac_jax.inference import Encoder
from matpac_jax.load import load_model
from matpac_jax.saved_model import MODEL_FILE, WEIGHTS_FILE
from matpac_jax.state_dict_io import read_state_dict
from matpac_jax.trained_state import read_trained_state
from matpac_jax.trees import flatten

REFUSALS = (ValueError, AudioError)  # ConfigError, ConversionError, PrepareError, CheckpointError are ValueErrors


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    """A 2-block ViT (dim 64, a 3-class AudioSet head) saved as a version-3 model directory."""
    spec, params, _ = from_torch(published_state_dict(seed=5, head_classes=3), heads=HEADS)
    return Encoder(spec, params).save(str(tmp_path_factory.mktemp("good") / "vit"))


# --- builders of bad model directories


def _copy(tmp_path, good: str) -> str:
    return shutil.copytree(good, str(tmp_path / "model"))


def _rewritten(tmp_path, good, weights=None, spec=None, raw: bytes | None = None) -> str:
    """A copy of ``good`` with its flat weights changed by ``weights(flat)``, its spec by ``spec(spec)``, or its
    weights file replaced by ``raw`` bytes; written as version 2 (no digest)."""
    d = _copy(tmp_path, good)
    meta = json.loads(open(f"{d}/{MODEL_FILE}").read())
    flat = dict(np.load(f"{d}/{WEIGHTS_FILE}"))
    if weights is not None:
        flat = weights(flat) or flat
    if spec is not None:
        spec(meta["spec"])
    buf = io.BytesIO()
    np.savez(buf, **flat)
    open(f"{d}/{WEIGHTS_FILE}", "wb").write(buf.getvalue() if raw is None else raw)
    meta = {k: v for k, v in meta.items() if k != "sha256"} | {"version": 2}
    open(f"{d}/{MODEL_FILE}", "w").write(json.dumps(meta))
    return d


def _npy_header(shape, dtype="<f4") -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": dtype, "fortran_order": False, "shape": shape})
    return out.getvalue()


def _zip(name: str, data: bytes, method=zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", method) as z:
        z.writestr(name, data)
    return out.getvalue()


def _bomb(tmp_path, good):
    """8 MiB of zeros declared honestly, deflated to ~8 kB: a decompression bomb in miniature."""
    n = 2 << 20
    return _rewritten(tmp_path, good, raw=_zip("tokenizer/cls_token.npy", _npy_header((n,)) + bytes(4 * n), 8))


def _lying_header(tmp_path, good):
    """A header declaring 4 TiB of float32 in a 16-byte member."""
    return _rewritten(tmp_path, good, raw=_zip("tokenizer/cls_token.npy", _npy_header((1 << 40,)) + bytes(16)))


def _set(key, value):
    return lambda flat: flat.__setitem__(key, value)


def _drop(*keys):
    return lambda flat: {k: v for k, v in flat.items() if k not in keys}


def _spec(field, value):
    return lambda spec: spec.__setitem__(field, value)


def _flip_byte(tmp_path, good, name: str, find: bytes, replace: bytes) -> str:
    d = _copy(tmp_path, good)
    data = open(f"{d}/{name}", "rb").read()
    assert find in data
    open(f"{d}/{name}", "wb").write(data.replace(find, replace, 1))
    return d


def _flip_weight_bit(tmp_path, good) -> str:
    d = _copy(tmp_path, good)
    data = bytearray(open(f"{d}/{WEIGHTS_FILE}", "rb").read())
    data[len(data) // 2] ^= 0x10  # inside some array's bytes: the zip's CRC or the digest catches it
    open(f"{d}/{WEIGHTS_FILE}", "wb").write(bytes(data))
    return d


def _fc1(flat) -> str:
    return next(k for k in flat if k.endswith("mlp/fc1/kernel") or k.endswith("fc1/kernel"))


# --- builders of other bad files


def _write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def _wav(tmp_path, samples: np.ndarray, name="clip.wav", truncate: int = 0) -> str:
    path = tmp_path / name
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16_000)
        w.writeframes(samples.astype("<i2").tobytes())
    if truncate:
        path.write_bytes(path.read_bytes()[:-truncate])
    return str(path)


def _float_wav_with_nan(tmp_path) -> str:
    """A WAVE_FORMAT_IEEE_FLOAT file whose samples are NaN."""
    data = np.full(1600, np.nan, "<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, 16_000, 64_000, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return _write(tmp_path, "nan.wav", b"RIFF" + struct.pack("<I", len(body)) + body)


def _bad_checkpoint(tmp_path) -> str:
    """A workdir whose only checkpoint has no checksums.json (a half-copied or hand-made one)."""
    step = tmp_path / "run" / "checkpoints" / "5" / "state"
    step.mkdir(parents=True)
    (step / "junk").write_bytes(b"\0" * 10)
    return str(tmp_path / "run")


def _bad_tfds(tmp_path) -> str:
    _write(tmp_path, "data/toy/1.0.0/dataset_info.json", b"{not json at all")
    return str(tmp_path / "data")


def _cli(main, *argv):
    """Run a CLI: its one-line ``error:`` message is raised as a ValueError (a zero exit or a traceback fails)."""

    def run(path):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main([a.format(path=path, out=os.path.join(os.path.dirname(path), "out")) for a in argv])
        lines = err.getvalue().strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err.getvalue())
        raise ValueError(lines[0])

    return run


# (name, build(tmp_path, good_dir) -> path, read(path), what the message says besides the path)
CASES = [
    # model directories (load_model; the CLIs through embed)
    ("model: deflate bomb", _bomb, load_model, "decompression bomb"),
    ("model: header declares 4 TiB", _lying_header, load_model, "declares (1099511627776,)"),
    ("model: weights not a zip", lambda t, g: _rewritten(t, g, raw=b"PK\3\4garbage"), load_model, "not an .npz"),
    (
        "model: transposed kernel",
        lambda t, g: _rewritten(t, g, lambda f: _set(_fc1(f), f[_fc1(f)].T)(f)),
        load_model,
        "fc1/kernel is float32",
    ),
    ("model: missing kernel", lambda t, g: _rewritten(t, g, lambda f: _drop(_fc1(f))(f)), load_model, "missing"),
    (
        "model: unknown weight",
        lambda t, g: _rewritten(t, g, _set("encoder/extra", np.zeros(3, np.float32))),
        load_model,
        "unknown ['encoder/extra']",
    ),
    (
        "model: leaf and parent",
        lambda t, g: _rewritten(t, g, _set("tokenizer/proj", np.zeros(3, np.float32))),
        load_model,
        "both a weight and a group",
    ),
    (
        "model: head with only its bias",
        lambda t, g: _rewritten(t, g, _drop("head/kernel", "head/norm_mean", "head/norm_var")),
        load_model,
        "head/",
    ),
    (
        "model: NaN weight",
        lambda t, g: _rewritten(t, g, lambda f: f["encoder/norm/scale"].__setitem__(0, np.nan)),
        load_model,
        "non-finite",
    ),
    (
        "model: float64 weight",
        lambda t, g: _rewritten(
            t, g, lambda f: _set("encoder/norm/bias", f["encoder/norm/bias"].astype(np.float64))(f)
        ),
        load_model,
        "float64",
    ),
    ("model: patch 0", lambda t, g: _rewritten(t, g, spec=_spec("patch", 0)), load_model, "patch = 0"),
    ("model: dim a string", lambda t, g: _rewritten(t, g, spec=_spec("dim", "64")), load_model, "dim = '64'"),
    ("model: n_mels negative", lambda t, g: _rewritten(t, g, spec=_spec("n_mels", -80)), load_model, "n_mels = -80"),
    ("model: heads not dividing dim", lambda t, g: _rewritten(t, g, spec=_spec("heads", 3)), load_model, "divide"),
    (
        "model: norm_std infinite",
        lambda t, g: _rewritten(t, g, spec=lambda s: s["frontend"].update(norm_std=1e999)),
        load_model,
        "not a number|finite|Infinity",
    ),
    (
        "model: flipped bit in model.json",
        lambda t, g: _flip_byte(t, g, MODEL_FILE, b"-7.056", b"-7.057"),
        load_model,
        "does not match its sha256",
    ),
    ("model: flipped bit in weights.npz", _flip_weight_bit, load_model, WEIGHTS_FILE),
    (
        "model: embed CLI",
        lambda t, g: _rewritten(t, g, spec=_spec("patch", 0)),
        _cli(embed.main, "--checkpoint={path}", "--input={path}", "--output={out}.npz"),
        "patch = 0",
    ),
    # training workdirs and checkpoints
    ("checkpoint: unverifiable", lambda t, g: _bad_checkpoint(t), read_trained_state, "verified"),
    # PyTorch and safetensors state dicts (convert)
    (
        "pt: pickle that runs os.system",
        lambda t, g: _write(t, "evil.pt", pickle.dumps({"w": _Payload(t / "ran")})),
        read_state_dict,
        "system|PyTorch",
    ),  # without torch installed no pickle is opened at all
    ("pt: garbage", lambda t, g: _write(t, "junk.pt", b"\x80\x04garbage" * 10), read_state_dict, ""),
    (
        "safetensors: truncated",
        lambda t, g: _write(t, "a.safetensors", MALFORMED["truncated data"][0]),
        read_state_dict,
        "not a valid safetensors file",
    ),
    (
        "safetensors: huge header",
        lambda t, g: _write(t, "b.safetensors", MALFORMED["huge header length"][0]),
        read_state_dict,
        "header length",
    ),
    # published S-SONDO / EfficientAT students
    (
        "student: garbage .ckpt",
        lambda t, g: _write(t, "s.ckpt", b"garbage" * 10),
        _cli(published.main, "--input={path}", "--arch=mn10", "--output={out}"),
        "",
    ),
    # tfds directories
    ("tfds: garbled dataset_info.json", lambda t, g: _bad_tfds(t), lambda p: open_split("toy", p, "train"), "damaged"),
    # audio files
    ("audio: not audio", lambda t, g: _write(t, "x.wav", b"not a wav file" * 50), load_audio, ""),
    ("audio: empty file", lambda t, g: _write(t, "e.flac", b""), load_audio, ""),
    ("audio: truncated wav", lambda t, g: _wav(t, np.ones(16_000), truncate=20_000), load_audio, ""),
    ("audio: NaN samples", lambda t, g: _float_wav_with_nan(t), load_audio, "finite"),
    # CSV inputs (prepare's sources, embed's list)
    (
        "csv: prepare, not UTF-8",
        lambda t, g: _write(t, "l.csv", b"path\n\xff\xfe.wav\n"),
        _cli(prepare.main, "--input={path}", "--output={out}", "--num-shards=1"),
        "UTF-8",
    ),
    ("csv: embed, no path column", lambda t, g: _write(t, "m.csv", b"file\na.wav\n"), embed.list_inputs, "'path'"),
    ("csv: embed, NUL in a path", lambda t, g: _write(t, "q.csv", b"path\na\0b.wav\n"), embed.list_inputs, "NUL"),
]


# Cases a loader still fails, with where the fix belongs: xfail until it lands (strict=False: then they pass).
KNOWN_GAPS: dict[str, str] = {}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_hostile_input_is_refused_naming_the_file_and_the_problem(case, tmp_path, good_dir, request):
    name, build, read, fragment = case
    if name in KNOWN_GAPS:
        request.applymarker(pytest.mark.xfail(reason=KNOWN_GAPS[name], strict=False))
    path = build(tmp_path, good_dir)
    try:
        result = read(path)
    except REFUSALS as e:
        message = str(e)
    except Exception as e:  # noqa: BLE001 -- the point: any other exception type is a failure of this loader
        pytest.fail(f"{name}: {type(e).__name__} instead of a refusal: {e}")
    else:
        pytest.fail(f"{name}: read without complaint: {type(result).__name__}")
    shown = os.path.basename(os.path.normpath(path))
    assert shown in message, f"{name}: the message does not name {shown}: {message}"
    assert re.search(fragment, message) if "|" in fragment else fragment in message, f"{name}: {message}"
    assert not (tmp_path / "ran").exists()


def test_the_good_directory_reads_and_its_digest_is_written(good_dir):
    meta = json.loads(open(f"{good_dir}/{MODEL_FILE}").read())
    assert meta["version"] == 3 and set(meta["sha256"]) == {MODEL_FILE, WEIGHTS_FILE}
    model = load_model(good_dir)
    assert set(flatten(model.params)) >= {"head/kernel", "head/bias", "head/norm_mean", "head/norm_var"}


def test_a_version_2_directory_without_digest_still_reads(good_dir, tmp_path):
    model = load_model(_rewritten(tmp_path, good_dir))
    assert model.weights_digest() == load_model(good_dir).weights_digest()
