"""A student embeds clips of any length with a few compiled programs (models.student: frame buckets, four per octave,
batches padded to powers of two) and gives, for each clip, its unpadded embedding up to float rounding: the padding
frames are masked out of every convolution across time and every pooling over time (models.padding).

Measured (max |padded - unpadded| / max |unpadded| per clip, clips of 1 to 144 frames in buckets of 64 to 160, CPU,
float32, these test sizes): at most 4.5e-7 for MobileNetV3 and ERes2Net, 2.1e-7 for DyMN, a few float32 ulps of the
scale. ``RTOL`` allows about seven times the largest.
"""

import types

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
import soxr
from helpers import assert_close_to_scale, load_config

from matpac_jax.audio.frontend import log_mel, num_frames
from matpac_jax.models.buckets import MIN_FRAME_BUCKET, TRACES, bucket
from matpac_jax.models.student import Student

RTOL = 3e-6  # about seven times the largest measured difference (module docstring), relative to the scale
SMALL = {
    "mobilenet": dict(width=0.1),
    "dymn": dict(width=0.1),
    "eres2net": dict(channels=4, blocks=(1, 1, 1, 1, 1)),
}  # the smallest students the other tests build, on the smoke front-end (32 kHz, 32 mels, 50 frames a second)


def make_student(arch: str) -> Student:
    config = load_config("ssondo.py", "smoke")
    config.student.arch = arch
    config.student.update(SMALL[arch])
    spec = mlc.ConfigDict({"student": config.student.to_dict(), "audio": config.audio.to_dict()})
    return Student(spec, Student.initial_variables(types.SimpleNamespace(**spec), seed=1))


@pytest.fixture(scope="module")
def mn():
    return make_student("mobilenet")


def unpadded(student: Student, clip: np.ndarray) -> np.ndarray:
    """The clip's embedding computed on its own frames, no padding, no mask (what training computes)."""
    forward = jax.jit(lambda v, w: student.backbone.apply(v, log_mel(w, student.frontend)))
    return np.asarray(forward(student.variables, clip[None]))[0]


def noise(seconds: float, rate: int, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * rate))).astype(np.float32)


def test_thirty_lengths_at_mixed_rates_compile_one_program_per_bucket(mn):
    rates = (22_050, 44_100, 48_000)
    seconds = np.geomspace(0.05, 3.0, 30)
    waves = [noise(s, rates[i % 3], i) for i, s in enumerate(seconds)]
    at_rate = [soxr.resample(w, rates[i % 3], mn.sample_rate, quality="HQ") for i, w in enumerate(waves)]
    frames = [num_frames(len(w), mn.frontend) for w in at_rate]
    buckets = {bucket(max(t, MIN_FRAME_BUCKET), 4) for t in frames}
    assert len(set(map(len, at_rate))) == 30 and len(buckets) <= 6  # 64, 80, 96, 112, 128, 160 frames
    before = TRACES["student"]
    one = [mn.embed(w, rates[i % 3])["clip"][0] for i, w in enumerate(waves)]  # one file at a time, as embed.py
    assert TRACES["student"] - before <= len(buckets)  # one program (batch of one) per bucket
    for r in rates:  # a list of files per call, as the probe: batches of 1 to 16 clips per bucket
        mine = [i for i in range(30) if rates[i % 3] == r]
        for i, e in zip(mine, mn.embed_clips([waves[i] for i in mine], r), strict=True):
            assert_close_to_scale(e["clip"], one[i], rtol=RTOL)
    programs = TRACES["student"] - before
    assert programs <= 3 * len(buckets) <= len(seconds) // 2, programs  # measured: 6 for 30 lengths


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_padded_clips_give_their_unpadded_embeddings_up_to_rounding(arch):
    student = make_student(arch)
    shortest = 0.355 if arch == "eres2net" else 0.035  # 17 frames (ERes2Net's least: two steps after 16-fold
    seconds = (shortest, 0.7, 1.5)  # downsampling) or 1, then 34 and 74 frames: buckets 64, 64 and 80
    clips = [noise(s, student.sample_rate, i) for i, s in enumerate(seconds)]
    got = student.embed_clips(clips)
    for clip, g in zip(clips, got, strict=True):
        assert_close_to_scale(g["clip"], unpadded(student, clip), rtol=RTOL)


def test_rows_beside_zero_rows_of_batch_padding_are_exactly_those_of_a_full_batch(mn):
    """Three clips go in a batch of four with a zero row; with a fourth real clip, the same program gives the same
    three rows bit for bit (rows never interact at inference)."""
    wave = np.stack([noise(0.9, mn.sample_rate, i) for i in range(4)])
    np.testing.assert_array_equal(mn.embed(wave[:3])["clip"], mn.embed(wave)["clip"][:3])


def test_a_clip_of_a_bucket_length_is_its_unpadded_embedding_up_to_rounding(mn):
    """64 frames, a bucket: nothing is padded, but the masked program sums in another order than the plain one
    (measured: 6e-7 of the scale, not bit for bit)."""
    samples = mn.frontend.n_fft + 63 * mn.frontend.hop_length
    clip = noise(1.0, mn.sample_rate, 7)[:samples]
    assert num_frames(samples, mn.frontend) == 64 == bucket(64, 4)
    assert_close_to_scale(mn.embed(clip)["clip"][0], unpadded(mn, clip), rtol=RTOL)


def test_the_mask_of_a_full_crop_is_no_mask(mn):
    """Training passes no ``frames``: a mask that keeps every frame computes the same numbers."""
    mel = jax.random.normal(jax.random.key(0), (2, 32, 50))
    plain = mn.backbone.apply(mn.variables, mel)
    np.testing.assert_array_equal(mn.backbone.apply(mn.variables, mel, frames=jnp.array([50, 50])), plain)


def test_an_eres2net_student_refuses_clips_shorter_than_its_pooling_needs():
    student = make_student("eres2net")
    assert num_frames(student.min_samples, student.frontend) == 17
    with pytest.raises(ValueError, match=f"at least {student.min_samples} samples"):
        student.embed(np.zeros(student.min_samples - 1, np.float32))
