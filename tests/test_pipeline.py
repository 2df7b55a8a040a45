"""The grain pretraining pipeline on small synthetic shards: crops, determinism, process split, short clips, resume."""

import numpy as np
import pytest

from matpac_jax.audio.frontend import LogMelConfig, num_samples_for_frames
from matpac_jax.audio.io import from_int16
from matpac_jax.data.pipeline import pretrain_dataset
from matpac_jax.data.records import ClipRecord, decode_record, encode_record, shard_name, write_shard

CROP = 2000
NUM_SHARDS, PER_SHARD = 3, 20


def _lengths() -> list[int]:
    """Clip lengths: clips 0..9 are shorter than a crop, the rest between 1x and ~2.5x a crop."""
    return [500 + 100 * i if i < 10 else CROP + 150 * (i - 10) for i in range(NUM_SHARDS * PER_SHARD)]


def _marker(i: int) -> float:
    return (i + 1) / 128


def _write(directory, lengths, marker: bool) -> list[np.ndarray]:
    """Shards of clips (constant ``marker`` value per clip, or a random waveform); returns the decoded audio."""
    rng = np.random.default_rng(0)
    waves = [np.full(n, _marker(i)) if marker else rng.uniform(-0.9, 0.9, n) for i, n in enumerate(lengths)]
    encoded = [encode_record(ClipRecord(f"clip{i}", w)) for i, w in enumerate(waves)]
    per = -(-len(encoded) // NUM_SHARDS)
    for s in range(NUM_SHARDS):
        write_shard(shard_name(directory, s, NUM_SHARDS), encoded[s * per : (s + 1) * per])
    return [decode_record(e).audio for e in encoded]


@pytest.fixture(scope="module")
def marked(tmp_path_factory):
    d = tmp_path_factory.mktemp("marked")
    _write(d, _lengths(), marker=True)
    return str(d / "*.arrayrecord")


@pytest.fixture(scope="module")
def waves(tmp_path_factory):
    d = tmp_path_factory.mktemp("waves")
    return str(d / "*.arrayrecord"), _write(d, _lengths(), marker=False)


def _ds(files, **kw):
    args = dict(global_batch=8, crop_samples=CROP, seed=0, process_index=0, process_count=1)
    return pretrain_dataset(files, **(args | kw))


def _take(ds, n: int) -> list[np.ndarray]:
    it = iter(ds)
    return [from_int16(next(it)["audio"]) for _ in range(n)]


def _clip_ids(batches: list[np.ndarray]) -> list[int]:
    """The clip of each row of marker batches (a constant row; zero padding ignored)."""
    ids = []
    for row in np.concatenate(batches):
        assert np.all((row == row[0]) | (row == 0))
        ids.append(round(float(row[0]) * 128) - 1)
    return ids


def test_crop_samples():
    assert num_samples_for_frames(608, LogMelConfig()) == 97520
    assert num_samples_for_frames(1, LogMelConfig()) == 400


def test_batches_are_int16(waves):
    it = iter(_ds(waves[0]))
    audio = next(it)["audio"]
    assert audio.dtype == np.int16 and audio.shape == (8, CROP)


def test_each_epoch_is_a_permutation(marked):
    n = NUM_SHARDS * PER_SHARD
    ids = _clip_ids(_take(_ds(marked, short_clips="pad"), -(-3 * n // 8)))  # three epochs
    epochs = [ids[e * n : (e + 1) * n] for e in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3


def test_crops_are_contiguous_slices(waves):
    files, audio = waves
    batches = _take(_ds(files), 6)
    for b in batches:
        assert b.shape == (8, CROP)
    long_clips = [w for w in audio if len(w) >= CROP]
    for row in np.concatenate(batches):
        hits = [
            (i, s)
            for i, w in enumerate(long_clips)
            for s in np.flatnonzero(w[: len(w) - CROP + 1] == row[0])
            if np.array_equal(row, w[s : s + CROP])
        ]
        assert len(hits) == 1


def test_seed_determinism(marked):
    a, b, c = (_take(_ds(marked, seed=s), 5) for s in (3, 3, 4))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_processes_split_each_epoch(marked):
    n = NUM_SHARDS * PER_SHARD
    kw = dict(global_batch=2, short_clips="pad")
    per_process = [_clip_ids(_take(_ds(marked, process_index=p, process_count=2, **kw), n)) for p in range(2)]
    for epoch in range(2):  # each process sees n / 2 elements per epoch
        halves = [set(ids[epoch * n // 2 : (epoch + 1) * n // 2]) for ids in per_process]
        assert not halves[0] & halves[1]
        assert halves[0] | halves[1] == set(range(n))
    first = per_process[0][: n // 2] + per_process[1][: n // 2]
    second = per_process[0][n // 2 :] + per_process[1][n // 2 :]
    assert first != second  # reshuffled per epoch (order differs)


def test_skip_and_pad(marked):
    skipped = _clip_ids(_take(_ds(marked), 20))
    assert min(skipped) >= 10 and len(set(skipped)) == 50  # 160 rows: every long clip, no short one
    padded = np.concatenate(_take(_ds(marked, short_clips="pad"), 15))
    ids = _clip_ids([padded])
    assert set(ids) == set(range(60))
    for row, i in zip(padded, ids, strict=True):
        n = _lengths()[i]
        expected = np.zeros(CROP, np.float32)
        expected[: min(n, CROP)] = decode_record(encode_record(ClipRecord("m", np.full(1, _marker(i))))).audio[0]
        assert np.array_equal(row, expected)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_exact_resume(marked, workers):
    ds = _ds(marked, seed=7, workers=workers)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it)["audio"] for _ in range(4)]
    fresh = iter(ds)
    fresh.set_state(state)
    got = [next(fresh)["audio"] for _ in range(4)]
    for closable in (it, fresh):
        if hasattr(closable, "close"):
            closable.close()
    assert all(np.array_equal(x, y) for x, y in zip(expected, got, strict=True))


def test_errors(marked, tmp_path):
    with pytest.raises(ValueError, match="config.data.train: no files match"):
        _ds(str(tmp_path / "nothing-*.arrayrecord"))
    with pytest.raises(ValueError, match="is a URL; shards are read from a filesystem path"):
        _ds("gs://bucket/audioset/*.arrayrecord")
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        _ds(marked, process_count=3)
    with pytest.raises(ValueError, match="short_clips='drop'"):
        _ds(marked, short_clips="drop")
    _write(tmp_path, [100] * 6, marker=True)
    with pytest.raises(ValueError, match="shorter than a crop"):
        _take(_ds(str(tmp_path / "*.arrayrecord")), 1)
