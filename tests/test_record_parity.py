"""Front-end parity at the record level: a 44.1 kHz stereo file -> decode -> resample -> int16 record -> grain crop ->
on-device log-mel, against a float64 reference computed from the same original audio."""

import jax
import numpy as np
import soundfile as sf
import soxr
from test_frontend import realistic_signal, reference_log_mel

from matpac_jax.audio.frontend import LogMelConfig, log_mel, num_samples_for_frames
from matpac_jax.audio.io import from_int16, load_audio, to_int16
from matpac_jax.data.pipeline import pretrain_dataset
from matpac_jax.data.records import ClipRecord, encode_record, shard_name, write_shard


def test_log_mel_of_a_record_crop_matches_float64_reference_of_the_original(tmp_path):
    cfg = LogMelConfig()
    sr = 44_100
    rng = np.random.default_rng(7)
    left = realistic_signal(rng, 7 * sr, sr, peak=0.5).astype(np.float64)
    right = 0.6 * left + 0.05 * realistic_signal(rng, 7 * sr, sr, peak=0.5)
    sf.write(tmp_path / "clip.wav", np.stack([left, right], axis=1).astype(np.float32), sr, subtype="FLOAT")

    audio = load_audio(tmp_path / "clip.wav")  # mono mean, soxr HQ -> 16 kHz, float32
    reference = soxr.resample(np.stack([left, right]).astype(np.float32).mean(0).astype(np.float64), sr, 16_000, "HQ")
    assert audio.shape == reference.shape
    np.testing.assert_allclose(audio, reference, atol=1e-5)

    shard = shard_name(str(tmp_path / "data"), 0, 1)
    write_shard(shard, [encode_record(ClipRecord("clip", audio))])
    n = num_samples_for_frames(608, cfg)
    batch = next(iter(pretrain_dataset(shard, global_batch=1, crop_samples=n, seed=0)))["audio"]
    assert batch.shape == (1, n) and batch.dtype == np.int16

    pcm = to_int16(audio)
    windows = np.lib.stride_tricks.sliding_window_view(pcm, n)
    (offsets,) = np.nonzero((windows == batch[0]).all(axis=1))
    assert len(offsets) == 1, "the crop is one contiguous slice of the stored clip"
    stored = from_int16(pcm)
    got = np.asarray(jax.jit(log_mel, static_argnums=1)(batch, cfg))[0]  # int16 in, scaled on device
    assert got.shape == (80, 608)

    # The chain adds nothing beyond the front-end's own float32 error: reference of the stored (int16) samples.
    stored_ref = reference_log_mel(stored[offsets[0] : offsets[0] + n], cfg)
    assert np.max(np.abs(got - stored_ref)) < 1e-4

    # Against the original float64 audio the only extra error is int16 storage, visible only near the log floor.
    original_ref = reference_log_mel(reference[offsets[0] : offsets[0] + n], cfg)
    floor = (np.log(cfg.log_offset) - cfg.norm_mean) / cfg.norm_std
    err = np.abs(got - original_ref)
    # (normalised units: +1 is e^4.2 ≈ 67x the log offset in mel power, +2 is ≈ 4,400x)
    assert np.max(err[original_ref > floor + 1.0]) < 1e-2
    assert np.max(err[original_ref > floor + 2.0]) < 1e-3
    assert np.max(err) < 0.05
