"""The clip record format (schema v1) and ArrayRecord shards."""

import json
import os
import struct

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from matpac_jax.audio.io import from_int16, to_int16
from matpac_jax.data.records import (
    SCHEMA_VERSION,
    ClipRecord,
    audioset_key,
    decode_header,
    decode_record,
    encode_record,
    read_shard,
    shard_name,
    write_shard,
)


def _clip(i: int = 0, n: int = 3000, labels=(3, 0, 526)) -> ClipRecord:
    rng = np.random.default_rng(i)
    audio = np.clip(rng.standard_normal(n) * 0.3, -1.2, 1.2).astype(np.float32)  # some samples beyond [-1, 1]
    return ClipRecord(key=f"--PJHx_ph{i}_{30000 + i}", audio=audio, labels=labels, path=f"/data/é/clip{i}.flac")


@pytest.mark.parametrize("codec", ["pcm16", "flac"])
def test_round_trip(codec):
    clip = _clip()
    data = encode_record(clip, codec=codec)
    assert data[:4] == b"MPJR" and data[4] == SCHEMA_VERSION
    out = decode_record(data)
    assert out.audio.dtype == np.float32 and out.audio.shape == clip.audio.shape
    np.testing.assert_array_equal(out.audio, from_int16(to_int16(clip.audio)))  # flac is lossless
    assert (out.key, out.path, out.labels, out.sample_rate) == (clip.key, clip.path, (3, 0, 526), 16000)
    assert decode_header(data) == {
        "key": clip.key,
        "path": clip.path,
        "sample_rate": 16000,
        "num_samples": 3000,
        "codec": codec,
        "labels": [3, 0, 526],
    }


def test_flac_is_smaller_for_quiet_audio():
    clip = ClipRecord(key="k", audio=(0.01 * np.sin(np.arange(16000) * 0.1)).astype(np.float32))
    assert len(encode_record(clip, "flac")) < len(encode_record(clip, "pcm16")) / 2


@pytest.mark.parametrize("codec", ["pcm16", "flac"])
def test_empty_clip_and_no_labels(codec):
    clip = ClipRecord(key="empty", audio=np.zeros(0, np.float32), sample_rate=8000)
    out = decode_record(encode_record(clip, codec))
    assert out.audio.shape == (0,) and out.audio.dtype == np.float32
    assert out.labels == () and out.path == "" and out.sample_rate == 8000


def test_encode_rejects_bad_clips():
    with pytest.raises(ValueError, match="codec"):
        encode_record(_clip(), codec="mp3")
    with pytest.raises(ValueError, match="mono"):
        encode_record(ClipRecord(key="k", audio=np.zeros((10, 2), np.float32)))
    with pytest.raises(ValueError, match="non-finite"):
        encode_record(ClipRecord(key="k", audio=np.array([0.0, np.nan], np.float32)))
    with pytest.raises(ValueError, match="key"):
        encode_record(ClipRecord(key="", audio=np.zeros(4, np.float32)))


def test_decode_header_does_not_need_the_payload():
    data = encode_record(_clip(n=16000), "flac")
    (header_len,) = struct.unpack("<I", data[5:9])
    header_only = data[: 9 + header_len]
    assert len(header_only) < len(data) / 10
    assert decode_header(header_only)["num_samples"] == 16000
    with pytest.raises(ValueError, match="truncated"):
        decode_record(header_only)


def test_bad_magic():
    data = encode_record(_clip())
    with pytest.raises(ValueError, match="magic"):
        decode_record(b"RIFF" + data[4:])
    with pytest.raises(ValueError, match="magic"):
        decode_header(b"RIFF" + data[4:])


def test_unknown_version():
    data = encode_record(_clip())
    with pytest.raises(ValueError, match="version 2"):
        decode_record(data[:4] + bytes([2]) + data[5:])


@pytest.mark.parametrize("codec", ["pcm16", "flac"])
def test_truncated(codec):
    data = encode_record(_clip(), codec)
    for cut in (len(data) - 1, len(data) // 2):
        with pytest.raises(ValueError, match="truncated"):
            decode_record(data[:cut])
    with pytest.raises(ValueError, match="truncated"):
        decode_header(data[:7])
    with pytest.raises(ValueError, match="truncated header"):
        decode_header(data[:12])


def test_corrupt_header():
    def with_header(obj) -> bytes:
        raw = json.dumps(obj).encode()
        return b"MPJR" + bytes([1]) + struct.pack("<I", len(raw)) + raw

    good = decode_header(encode_record(_clip()))
    with pytest.raises(ValueError, match="lacks field 'labels'"):
        decode_header(with_header({k: v for k, v in good.items() if k != "labels"}))
    with pytest.raises(ValueError, match="unknown codec"):
        decode_header(with_header({**good, "codec": "opus"}))
    with pytest.raises(ValueError, match="num_samples"):
        decode_header(with_header({**good, "num_samples": "12"}))
    with pytest.raises(ValueError, match="corrupt record header"):
        decode_header(b"MPJR" + bytes([1]) + struct.pack("<I", 3) + b"{x}")
    assert decode_header(with_header({**good, "extra": 1}))["extra"] == 1  # unknown fields are ignored


def test_audioset_key():
    assert audioset_key("--PJHxphWEs", "30.000") == "--PJHxphWEs_30000"
    assert audioset_key("a_b-c", 2.5) == "a_b-c_2500"
    assert audioset_key("a_b-c", 2.5).rsplit("_", 1) == ["a_b-c", "2500"]


def test_shard_round_trip_and_random_access(tmp_path):
    records = [encode_record(_clip(i, n=100 + 37 * i, labels=(i,)), "flac" if i % 2 else "pcm16") for i in range(20)]
    path = shard_name(tmp_path / "out", 3, 8)
    assert write_shard(path, iter(records)) == 20
    assert sorted(os.listdir(tmp_path / "out")) == ["clips-00003-of-00008.arrayrecord"]
    back = read_shard(path)
    assert back == records
    assert [decode_record(r).key for r in back] == [_clip(i).key for i in range(20)]
    reader = ArrayRecordReader(path, "readahead_buffer_size:0,max_parallelism:0")
    try:
        assert "group_size:1" in reader.writer_options_string()
        assert reader.num_records() == 20
        for i in (17, 0, 5, 19, 5):
            assert reader.read([i]) == [records[i]]
            assert decode_record(reader.read([i])[0]).labels == (i,)
    finally:
        reader.close()


def test_empty_shard(tmp_path):
    path = str(tmp_path / "e.arrayrecord")
    assert write_shard(path, []) == 0
    assert read_shard(path) == []


def test_write_shard_replaces_an_existing_file(tmp_path):
    path = str(tmp_path / "s.arrayrecord")
    write_shard(path, [b"old"])
    write_shard(path, [b"new", b"er"])
    assert read_shard(path) == [b"new", b"er"]
    assert os.listdir(tmp_path) == ["s.arrayrecord"]


def test_failed_write_leaves_nothing(tmp_path):
    def records():
        for i in range(3):
            yield encode_record(_clip(i))
        raise RuntimeError("decoder crashed")

    path = shard_name(tmp_path, 0, 1)
    with pytest.raises(RuntimeError, match="decoder crashed"):
        write_shard(path, records())
    assert not os.path.exists(path)
    assert os.listdir(tmp_path) == []

    with pytest.raises(TypeError, match="record 1 is str"):
        write_shard(path, [b"ok", "not bytes"])
    assert os.listdir(tmp_path) == []


def test_read_shard_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_shard(str(tmp_path / "missing.arrayrecord"))
    bad = tmp_path / "bad.arrayrecord"
    bad.write_bytes(b"junk" * 100)
    with pytest.raises(ValueError, match="not a readable ArrayRecord"):
        read_shard(str(bad))


def test_shard_name():
    assert shard_name("/out", 7, 1024) == "/out/clips-00007-of-01024.arrayrecord"
    assert shard_name("gs://b/x", 0, 1, prefix="eval") == "gs://b/x/eval-00000-of-00001.arrayrecord"
    with pytest.raises(ValueError):
        shard_name("/out", 4, 4)
