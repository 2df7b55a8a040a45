"""Weight files are data, never code: a hostile pickle is refused without running anything (with or without
PyTorch), malformed safetensors fail with a ConversionError naming the file and the problem, and every file the
converter writes is written atomically."""

import importlib.util
import json
import os
import pickle
import struct
import sys
import zipfile

import numpy as np
import pytest
from test_inference import HEADS, published_state_dict

import matpac_jax.convert as convert
import matpac_jax.state_dict_io as state_dict_io
from matpac_jax.fileio import TMP_MARK
from matpac_jax.state_dict_io import ConversionError, read_safetensors, read_state_dict, write_safetensors

HAS_TORCH = importlib.util.find_spec("torch") is not None


class _Payload:
    """Unpickling this runs ``os.system``: it creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _hostile_files(tmp_path):
    """(marker, [raw pickle, torch.save-style zip]) holding a payload where a fairseq file holds its weights."""
    marker = tmp_path / "ran"
    data = pickle.dumps({"model": {"cls_token": _Payload(marker)}}, protocol=2)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(data)
    zipped = tmp_path / "zipped.pt"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("archive/data.pkl", data)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return marker, [str(raw), str(zipped)]


def test_hostile_pickle_is_refused_and_never_run(tmp_path, capsys):
    marker, files = _hostile_files(tmp_path)
    for path in files:
        assert [g.rsplit(".", 1)[1] for g in state_dict_io._checkpoint_globals(path)] == ["system"]  # posix / nt
        with pytest.raises(ConversionError) as e:
            read_state_dict(path)
        msg = str(e.value)
        assert path in msg
        if HAS_TORCH:  # no advice to load it with weights_only=False: that call would run the payload
            assert "refused to unpickle" in msg and "system runs commands or code when unpickled" in msg
            assert "weights_only=False" not in msg and "weights.pt" not in msg
        else:
            assert "needs PyTorch" in msg
        out = tmp_path / "enc"
        assert convert.main([f"--torch-checkpoint={path}", f"--output={out}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and path in err
        assert not out.exists()
    assert not marker.exists()


def test_a_refused_pickle_is_never_advised_to_be_loaded_some_other_way_when_it_runs_code():
    """The payload's own global (posix.system for os.system) gets no re-save advice: the re-save command loads the
    file with weights_only=False, which would run it. An ordinary class (argparse.Namespace of an old trainer) does."""
    hostile = state_dict_io._refusal("x.pt", ["posix.system"], "")
    assert "posix.system runs commands or code when unpickled" in hostile and "weights_only=False" not in hostile
    plain = state_dict_io._refusal("x.pt", ["argparse.Namespace"], "")
    assert "it needs argparse.Namespace" in plain and "weights_only=False" in plain and "if you trust" in plain


def test_without_torch_a_pt_file_is_refused_not_unpickled(tmp_path, monkeypatch):
    """Even where PyTorch is installed: with it unavailable, nothing falls back to the pickle module."""
    monkeypatch.setitem(sys.modules, "torch", None)
    marker, files = _hostile_files(tmp_path)
    for path in files:
        with pytest.raises(ConversionError, match="needs PyTorch"):
            read_state_dict(path)
    assert not marker.exists()
    with pytest.raises(ConversionError, match="no such file"):
        read_state_dict(str(tmp_path / "missing.pt"))


def test_pickle_globals_reads_opcodes_only(tmp_path):
    import argparse
    from collections import OrderedDict

    data = pickle.dumps([argparse.Namespace(a=1), OrderedDict(b=2), argparse.Namespace(c=3)], protocol=4)
    assert state_dict_io.pickle_globals(data) == ["argparse.Namespace", "collections.OrderedDict"]
    assert state_dict_io.pickle_globals(b"\x80\x02garbage") == []


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed (optional extra)")
def test_fairseq_checkpoint_plain_data_is_read_and_other_objects_refused(tmp_path):
    import argparse
    import datetime
    from collections import OrderedDict

    import torch

    sd = published_state_dict(seed=3)
    model = OrderedDict((k, torch.from_numpy(np.asarray(v, np.float32))) for k, v in sd.items())
    meters = OrderedDict(train=[(0, "loss", "AverageMeter", {"val": np.float64(1.5), "sum": 3.0, "count": 2})])
    fairseq = {
        "args": argparse.Namespace(arch="matpac", lr=[5e-4]),
        "cfg": {"common": {"seed": 1}, "model": {"_name": "matpac"}},
        "model": model,
        "criterion": None,
        "optimizer_history": [{"criterion_name": "x", "optimizer_name": "Adam", "num_updates": 10}],
        "task_state": {},
        "extra_state": {"metrics": meters, "best": np.float32(0.5), "train_iterator": {"epoch": 2}},
        "last_optimizer_state": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-3}]},
    }
    torch.save(fairseq, tmp_path / "fairseq.pt")
    back = read_state_dict(str(tmp_path / "fairseq.pt"))
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], np.asarray(sd[k], np.float32))
    if hasattr(torch.serialization, "get_safe_globals"):  # the allowlist was scoped to that one load
        assert argparse.Namespace not in torch.serialization.get_safe_globals()
    torch.save(fairseq | {"extra_state": {"when": datetime.datetime(2024, 1, 1)}}, tmp_path / "other.pt")
    with pytest.raises(ConversionError, match=r"refused to unpickle: it needs datetime\.datetime"):
        read_state_dict(str(tmp_path / "other.pt"))
    (tmp_path / "cut.pt").write_bytes((tmp_path / "fairseq.pt").read_bytes()[:500])
    with pytest.raises(ConversionError, match="cut.pt"):
        read_state_dict(str(tmp_path / "cut.pt"))


# --- safetensors


def _st(header, data: bytes = b"", length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


_F32_3 = {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}
MALFORMED = {
    "short": (b"\x01\x02", "shorter than the 8-byte header length"),
    "huge header length": (_st(_F32_3, bytes(12), length=1 << 62), "header length"),
    "header past the end": (_st(_F32_3, bytes(12), length=400), "header length 400 exceeds"),
    "not JSON": (_st(b"{not json"), "not JSON"),
    "not UTF-8": (_st(b'{"\xff": 1}'), "not JSON"),
    "duplicate names": (_st(b'{"x": 1, "x": 2}'), "duplicate keys"),
    "a list": (_st([1, 2]), "JSON list"),
    "entry not an object": (_st({"x": 3}), "expected {dtype, shape, data_offsets}"),
    "unknown dtype": (_st({"x": {"dtype": "Q4", "shape": [3], "data_offsets": [0, 12]}}, bytes(12)), "dtype 'Q4'"),
    "negative shape": (_st({"x": {"dtype": "F32", "shape": [-3], "data_offsets": [0, 12]}}, bytes(12)), "shape"),
    "float offsets": (_st({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0.0, 12]}}, bytes(12)), "offsets"),
    "reversed offsets": (_st({"x": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}}, bytes(12)), "outside"),
    "truncated data": (_st(_F32_3, bytes(8)), "outside the 8 data bytes"),
    "size mismatch": (_st({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, bytes(12)), "do not hold"),
    "trailing data": (_st(_F32_3, bytes(20)), "20 bytes of data follow"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_safetensors_raise_a_conversion_error(tmp_path, case):
    data, fragment = MALFORMED[case]
    path = str(tmp_path / "bad.safetensors")
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(ConversionError) as e:
        read_safetensors(path)
    assert str(e.value).startswith(f"{path}: not a valid safetensors file: ") and fragment in str(e.value)


def test_malformed_safetensors_cli_exit_2_one_line(tmp_path, capsys):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(MALFORMED["truncated data"][0])
    assert convert.main([f"--torch-checkpoint={path}", f"--output={tmp_path / 'enc'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.safetensors: not a valid safetensors file" in err
    assert convert.main([f"--torch-checkpoint={tmp_path / 'none.safetensors'}", f"--output={tmp_path / 'e'}"]) == 2
    assert "none.safetensors" in capsys.readouterr().err


def test_safetensors_integer_and_half_tensors_read_as_float32(tmp_path):
    values = {"n": np.array([1000], "<i8"), "h": np.array([[0.5, -2.0]], "<f2"), "d": np.array([1.25], "<f8")}
    names = {"n": "I64", "h": "F16", "d": "F64"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, b"", 0
    for k, v in values.items():
        header[k] = {"dtype": names[k], "shape": list(v.shape), "data_offsets": [offset, offset + v.nbytes]}
        blobs += v.tobytes()
        offset += v.nbytes
    path = tmp_path / "m.safetensors"
    path.write_bytes(_st(header, blobs))
    back = read_safetensors(str(path))
    for k, v in values.items():
        assert back[k].dtype == np.float32
        np.testing.assert_array_equal(back[k], v.astype(np.float32))


# --- atomic outputs


def test_safetensors_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    write_safetensors(str(path), {"a": np.ones(3, np.float32)})
    before = path.read_bytes()

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_safetensors(str(path), {"a": np.zeros(5, np.float32)})
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["w.safetensors"]


@pytest.fixture(scope="module")
def small_safetensors(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd") / "pp.safetensors"
    write_safetensors(str(path), published_state_dict(seed=4))
    return str(path)


def test_convert_output_checked_first_and_written_atomically(small_safetensors, tmp_path, monkeypatch, capsys):
    from matpac_jax.inference import Encoder
    from matpac_jax.load import load_encoder

    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert convert.main([f"--torch-checkpoint={small_safetensors}", f"--output={blocker / 'enc'}"]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert convert.main(["--checkpoint=/nonexistent/run", f"--to-torch={blocker / 'x.safetensors'}"]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a directory" in err and "nonexistent" not in err  # the output is checked before the input

    out = tmp_path / "enc"
    assert convert.main([f"--torch-checkpoint={small_safetensors}", f"--output={out}", f"--heads={HEADS}"]) == 0
    first = {n: (out / n).read_bytes() for n in os.listdir(out)}
    assert load_encoder(str(out)).spec.heads == HEADS

    def half_then_fail(self, directory):
        with open(os.path.join(directory, "weights.npz"), "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Encoder, "save", half_then_fail)
    assert convert.main([f"--torch-checkpoint={small_safetensors}", f"--output={out}", f"--heads={HEADS}"]) == 2
    assert "disk full" in capsys.readouterr().err
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == first  # the old directory is untouched
    assert not [n for n in os.listdir(tmp_path) if TMP_MARK in n]
