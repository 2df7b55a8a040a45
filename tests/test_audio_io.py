"""Host audio I/O: decoding, mixing down, resampling, int16 conversion and the AudioError cases."""

import numpy as np
import pytest
import soundfile as sf

from matpac_jax.audio.io import AudioError, from_int16, load_audio, resample, to_int16

SR = 16000


def _sine(freq: float, sr: int, seconds: float = 1.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(sr * seconds))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(wave: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / sr)[np.argmax(spectrum)])


def test_wav_16k_mono_round_trip(tmp_path):
    x = np.random.default_rng(0).uniform(-0.9, 0.9, 8000).astype(np.float32)
    sf.write(tmp_path / "a.wav", x, SR, subtype="FLOAT")
    sf.write(tmp_path / "b.wav", x, SR, subtype="PCM_16")
    y = load_audio(tmp_path / "a.wav")
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_array_equal(y, x)
    y16 = load_audio(str(tmp_path / "b.wav"))
    assert y16.dtype == np.float32 and y16.shape == x.shape
    np.testing.assert_allclose(y16, x, atol=1 / 32767)


def test_stereo_is_mixed_to_the_channel_mean(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.uniform(-0.5, 0.5, (4000, 2)).astype(np.float32)
    sf.write(tmp_path / "s.wav", x, SR, subtype="FLOAT")
    y = load_audio(tmp_path / "s.wav")
    assert y.shape == (4000,)
    np.testing.assert_allclose(y, x.mean(axis=1), atol=1e-7)


@pytest.mark.parametrize("orig_sr", [44100, 8000])
def test_resampled_to_16k_keeps_length_and_frequency(tmp_path, orig_sr):
    x = _sine(1000.0, orig_sr, seconds=1.3)
    sf.write(tmp_path / "r.wav", x, orig_sr, subtype="FLOAT")
    y = load_audio(tmp_path / "r.wav", sample_rate=SR)
    assert y.dtype == np.float32
    assert abs(len(y) - round(len(x) * SR / orig_sr)) <= 1
    assert abs(_peak_hz(y, SR) - 1000.0) < 2.0
    inner = y[len(y) // 4 : -len(y) // 4]  # away from the filter's edge transients
    assert abs(np.sqrt(np.mean(inner**2)) - 0.5 / np.sqrt(2)) < 0.01


def test_resample_identity_and_dtype():
    x = _sine(440.0, SR, 0.1).astype(np.float64)
    y = resample(x, SR, SR)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, x.astype(np.float32))
    z = resample(x, SR, 22050)
    assert z.dtype == np.float32 and len(z) == round(len(x) * 22050 / SR)


@pytest.mark.parametrize(
    "fmt, subtype, atol",
    [("FLAC", "PCM_16", 1 / 32767), ("OGG", "VORBIS", None), ("MP3", "MPEG_LAYER_III", None)],
)
def test_compressed_formats_decode(tmp_path, fmt, subtype, atol):
    if fmt not in sf.available_formats():
        pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) cannot write {fmt}")
    x = _sine(1000.0, SR, seconds=1.0)
    path = tmp_path / f"c.{fmt.lower()}"
    sf.write(path, x, SR, format=fmt, subtype=subtype)
    y = load_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - len(x)) <= 2048  # lossy codecs may pad / trim a frame
    if atol is not None:
        np.testing.assert_allclose(y, x, atol=atol)
    assert abs(_peak_hz(y, SR) - 1000.0) < 2.0


def test_compressed_formats_at_other_rates_resample(tmp_path):
    x = _sine(1000.0, 22050, seconds=1.0)
    sf.write(tmp_path / "c.ogg", np.stack([x, x], axis=1), 22050, format="OGG", subtype="VORBIS")
    y = load_audio(tmp_path / "c.ogg")
    assert abs(len(y) - SR) <= 1024
    assert abs(_peak_hz(y, SR) - 1000.0) < 2.0


def test_silence_is_valid(tmp_path):
    sf.write(tmp_path / "z.wav", np.zeros(1600, np.float32), SR)
    y = load_audio(tmp_path / "z.wav", min_samples=1600)
    assert y.shape == (1600,) and not y.any()


def test_int16_round_trip():
    x = np.concatenate([np.random.default_rng(2).uniform(-1, 1, 10000), [-1.0, 0.0, 1.0]]).astype(np.float32)
    pcm = to_int16(x)
    assert pcm.dtype == np.int16 and pcm.min() >= -32767 and pcm.max() <= 32767
    assert pcm[-3:].tolist() == [-32767, 0, 32767]
    y = from_int16(pcm)
    assert y.dtype == np.float32
    assert np.abs(y - x).max() <= 1 / 32767
    np.testing.assert_array_equal(to_int16(y), pcm)  # idempotent on quantised audio
    assert to_int16(np.array([2.0, -3.0], np.float32)).tolist() == [32767, -32767]  # clipped
    with pytest.raises(ValueError, match="non-finite"):
        to_int16(np.array([0.0, np.nan], np.float32))


def _assert_audio_error(path, reason_part, **kwargs):
    with pytest.raises(AudioError) as info:
        load_audio(path, **kwargs)
    err = info.value
    assert err.path == str(path)
    assert reason_part in err.reason
    assert str(err) == f"{path}: {err.reason}"
    return err


def test_missing_file(tmp_path):
    _assert_audio_error(tmp_path / "nope.wav", "not found")


def test_directory_is_not_audio(tmp_path):
    _assert_audio_error(tmp_path, "not a regular file")


def test_corrupt_file(tmp_path):
    path = tmp_path / "bad.wav"
    path.write_bytes(b"not audio")
    err = _assert_audio_error(path, "cannot decode")
    assert "Format not recognised" in err.reason  # soundfile's message is kept


def test_empty_file_with_a_valid_header(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, np.float32), SR)
    assert sf.info(path).frames == 0
    _assert_audio_error(path, "empty")


def test_nan_samples(tmp_path):
    path = tmp_path / "nan.wav"
    x = np.zeros(100, np.float32)
    x[10], x[20] = np.nan, np.inf
    sf.write(path, x, SR, subtype="FLOAT")
    err = _assert_audio_error(path, "non-finite")
    assert "2 " in err.reason


def test_too_short(tmp_path):
    path = tmp_path / "short.wav"
    sf.write(path, _sine(440.0, 8000, seconds=0.1), 8000)  # 800 samples -> 1600 at 16 kHz
    err = _assert_audio_error(path, "too short", min_samples=16000)
    assert "1600" in err.reason and "16000" in err.reason
    assert load_audio(path, min_samples=1600).shape == (1600,)


def _halved(tmp_path, name: str, **kw) -> str:
    """A 2-s file written by libsndfile, then cut to half its bytes (a partial download / interrupted copy)."""
    whole = tmp_path / f"whole-{name}"
    sf.write(whole, (0.3 * np.sin(np.arange(32000) / 5)).astype(np.float32), 16000, **kw)
    data = whole.read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: len(data) // 2])
    assert load_audio(whole).shape == (32000,)  # the whole file is fine
    return str(cut)


@pytest.mark.parametrize(
    "name, kw, reason",
    [
        ("t.wav", {}, "data chunk declares 64000 bytes"),
        ("t.mp3", {"format": "MP3"}, "header announces 32000 frames"),
        ("t.flac", {}, "cannot decode"),
        ("t.ogg", {"subtype": "VORBIS"}, "cannot decode"),
    ],
)
def test_truncated_files_are_errors_not_shorter_clips(tmp_path, name, kw, reason):
    path = _halved(tmp_path, name, **kw)
    with pytest.raises(AudioError, match=reason) as e:
        load_audio(path)
    assert e.value.path == path


def test_streaming_wav_with_unknown_length_is_not_truncated(tmp_path):
    import struct

    path = tmp_path / "stream.wav"
    sf.write(path, np.zeros(1600, np.float32) + 0.1, 16000)
    data = bytearray(path.read_bytes())
    i = data.index(b"data")
    data[i + 4 : i + 8] = data[4:8] = struct.pack("<I", 0xFFFFFFFF)  # what a writer to a pipe leaves
    path.write_bytes(bytes(data))
    assert load_audio(path).shape == (1600,)
