"""Using models: load_encoder / embed / tag against a float64 numpy implementation of SPEC §5 written on the
published (PyTorch) key layout, conversion in both directions, strict key accounting, long audio."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import reference as ref
from helpers import ROOT, assert_close_to_scale
from test_frontend import reference_log_mel

from matpac_jax.convert import from_torch, to_torch
from matpac_jax.inference import Encoder
from matpac_jax.load import load_encoder
from matpac_jax.state_dict_io import ConversionError, read_safetensors, write_safetensors
from matpac_jax.trees import flatten

DIM, DEPTH, HEADS, GRID_T, PATCH, N_MELS = 64, 2, 4, 8, 16, 80  # a small ViT: 128-frame chunks


def published_state_dict(seed=0, grid_t=GRID_T, head_classes=0) -> dict[str, np.ndarray]:
    """Random weights under the SPEC §5 key names and shapes (float32, like a torch file)."""
    rng = np.random.default_rng(seed)
    n = lambda *shape, s=0.05: rng.normal(0, s, shape).astype(np.float32)  # noqa: E731
    sd = {
        "cls_token": n(1, 1, DIM, s=0.5),
        "pos_embed": ref.sincos_pos_embed_2d(DIM, N_MELS // PATCH, grid_t)[None].astype(np.float32),
        "patch_embed.proj.weight": n(DIM, 1, PATCH, PATCH, s=0.1),
        "patch_embed.proj.bias": n(DIM),
        "student_encoder.norm.weight": 1 + n(DIM),
        "student_encoder.norm.bias": n(DIM),
    }
    for i in range(DEPTH):
        p = f"student_encoder.blocks.{i}."
        sd |= {
            p + "norm1.weight": 1 + n(DIM), p + "norm1.bias": n(DIM),
            p + "attn.qkv.weight": n(3 * DIM, DIM, s=0.2), p + "attn.qkv.bias": n(3 * DIM),
            p + "attn.proj.weight": n(DIM, DIM, s=0.2), p + "attn.proj.bias": n(DIM),
            p + "norm2.weight": 1 + n(DIM), p + "norm2.bias": n(DIM),
            p + "mlp.fc1.weight": n(4 * DIM, DIM, s=0.2), p + "mlp.fc1.bias": n(4 * DIM),
            p + "mlp.fc2.weight": n(DIM, 4 * DIM, s=0.2), p + "mlp.fc2.bias": n(DIM),
        }  # fmt: skip
    if head_classes:
        var = 0.5 + rng.uniform(0, 1, DIM).astype(np.float32)
        sd |= {"head_norm.running_mean": n(DIM), "head_norm.running_var": var, "head_norm.num_batches_tracked": 1000}
        sd |= {"head.weight": n(head_classes, DIM), "head.bias": n(head_classes)}
    return sd


def numpy_layers(sd: dict, mel: np.ndarray) -> np.ndarray:
    """SPEC §5 on one clip's log-mel [F, T], float64: every layer's frame features [DEPTH, T', (F/16)·D]."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    grid_f = N_MELS // PATCH
    grid_t = (sd["pos_embed"].shape[1] - 1) // grid_f
    crop = grid_t * PATCH
    t = mel.shape[1]
    mel = np.pad(mel, ((0, 0), (0, -t % PATCH)))  # the whole clip padded to a patch multiple, then cut in chunks
    out = []
    for start in range(0, mel.shape[1], crop):
        chunk = mel[:, start : start + crop]
        tp = chunk.shape[1] // PATCH
        patches = chunk.reshape(grid_f, PATCH, tp, PATCH).transpose(0, 2, 1, 3).reshape(grid_f * tp, PATCH * PATCH)
        w = sd["patch_embed.proj.weight"].reshape(DIM, PATCH * PATCH)
        x = patches @ w.T + sd["patch_embed.proj.bias"]  # tokens, freq-major
        pos = sd["pos_embed"][0, 1:].reshape(grid_f, grid_t, DIM)[:, :tp].reshape(-1, DIM)
        x = np.concatenate([sd["cls_token"][0] + sd["pos_embed"][0, :1], x + pos])
        layers = []
        for i in range(DEPTH):
            p = lambda name: sd[f"student_encoder.blocks.{i}.{name}"]  # noqa: E731, B023
            h = ref.layer_norm(x, p("norm1.weight"), p("norm1.bias"))
            q, k, v = np.split(h @ p("attn.qkv.weight").T + p("attn.qkv.bias"), 3, axis=-1)
            split = lambda a: a.reshape(-1, HEADS, DIM // HEADS).transpose(1, 0, 2)  # noqa: E731
            att = ref.softmax(split(q) @ split(k).transpose(0, 2, 1) / np.sqrt(DIM // HEADS))
            o = (att @ split(v)).transpose(1, 0, 2).reshape(-1, DIM)
            x = x + o @ p("attn.proj.weight").T + p("attn.proj.bias")
            h = ref.layer_norm(x, p("norm2.weight"), p("norm2.bias"))
            h = ref.gelu_exact(h @ p("mlp.fc1.weight").T + p("mlp.fc1.bias"))
            x = x + h @ p("mlp.fc2.weight").T + p("mlp.fc2.bias")
            layers.append(x)
        layers[-1] = ref.layer_norm(x, sd["student_encoder.norm.weight"], sd["student_encoder.norm.bias"])
        feats = np.stack(layers)[:, 1:].reshape(DEPTH, grid_f, tp, DIM).transpose(0, 2, 1, 3)
        out.append(feats.reshape(DEPTH, tp, grid_f * DIM))
    return np.concatenate(out, axis=1)


def _rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def published():
    sd = published_state_dict()
    spec, params, left = from_torch(sd, heads=HEADS)
    assert left == [] and spec.crop_frames == GRID_T * PATCH and spec.depth == DEPTH
    return sd, Encoder(spec, params)


def test_embed_matches_the_float64_spec_implementation(published):
    sd, enc = published
    rng = np.random.default_rng(1)
    waves = (0.1 * rng.standard_normal((2, 48_000))).astype(np.float32)  # 3 s: 298 frames = 128 + 128 + 42 (-> 48)
    out = enc.embed(waves, 16_000, layers=True)
    assert out["frames"].shape == (2, 19, 320) and out["layers"].shape == (2, DEPTH, 19, 320)
    for b in range(2):
        want = numpy_layers(sd, reference_log_mel(waves[b], enc.spec.frontend))
        assert _rel(out["layers"][b], want) <= 1e-5
        assert _rel(out["frames"][b], want[-1]) <= 1e-5
        assert _rel(out["clip"][b], want[-1].mean(axis=0)) <= 1e-5


def test_one_waveform_other_rates_and_short_audio(published):
    _, enc = published
    wave = (0.1 * np.random.default_rng(2).standard_normal(44_100)).astype(np.float32)
    out = enc.embed(wave, 44_100)  # 1 s at 44.1 kHz -> 16 kHz -> 98 frames -> one chunk padded to 112
    assert out["clip"].shape == (1, 320) and out["frames"].shape == (1, 7, 320)
    from matpac_jax.audio.io import resample

    same = enc.embed(resample(wave, 44_100, 16_000), 16_000)
    np.testing.assert_array_equal(out["clip"], same["clip"])
    with pytest.raises(ValueError, match="shorter than one analysis window"):
        enc.embed(np.zeros(100, np.float32))


def test_twenty_minutes_in_bounded_chunk_batches(published):
    _, enc = published
    enc.chunk_batch = 60
    assert enc.chunk_batch == 64 and enc.mesh.devices.size == len(jax.devices()) == 8  # split over every device
    minutes = 20
    wave = (0.05 * np.random.default_rng(3).standard_normal(minutes * 60 * 16_000)).astype(np.float32)
    out = enc.embed(wave)
    frames = 1 + (wave.size - 400) // 160
    assert out["frames"].shape == (1, -(-frames // PATCH), 320)
    assert np.isfinite(out["clip"]).all()
    # the first minute embedded alone gives the same first frames (chunks are independent)
    head = enc.embed(wave[: 60 * 16_000 + 240])["frames"]  # 6,000 frames: 46 full chunks + 112
    assert_close_to_scale(out["frames"][0, : 46 * GRID_T], head[0, : 46 * GRID_T])


def test_audioset_head_tags_like_the_spec():
    sd = published_state_dict(seed=4, grid_t=62, head_classes=527)
    spec, params, _ = from_torch(sd, heads=HEADS)
    assert spec.crop_frames == 992
    enc = Encoder(spec, params)
    wave = (0.1 * np.random.default_rng(5).standard_normal(16_000 * 12)).astype(np.float32)  # 1,198 frames: 2 chunks
    probs = enc.tag(wave)
    last = numpy_layers(sd, reference_log_mel(wave, spec.frontend))[-1]  # [T', F·D]
    x = last.reshape(last.shape[0], -1, DIM).mean(axis=(0, 1))  # freq-average, time-mean
    x = (x - sd["head_norm.running_mean"]) / np.sqrt(sd["head_norm.running_var"].astype(np.float64) + 1e-5)
    want = ref.softmax(x @ sd["head.weight"].T.astype(np.float64) + sd["head.bias"])
    assert probs.shape == (1, 527) and _rel(probs[0], want) <= 1e-5


def test_round_trip_ours_to_published_layout_and_back_is_exact(published, tmp_path):
    sd, enc = published
    params = jax.device_get(enc.params)
    back = to_torch(enc.spec, params)
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k].astype(np.float32))
    path = str(tmp_path / "m.safetensors")
    write_safetensors(path, back)
    again = read_safetensors(path)
    spec, params, _ = from_torch(again, heads=HEADS)
    for k, v in flatten(params).items():
        np.testing.assert_array_equal(v, flatten(params)[k])


def test_strict_keys(published):
    sd, _ = published
    with pytest.raises(ConversionError, match=r"unknown keys \['something.else'\]"):
        from_torch(sd | {"something.else": np.zeros(1)}, heads=HEADS)
    broken = dict(sd)
    del broken["student_encoder.blocks.1.mlp.fc2.bias"]
    with pytest.raises(ConversionError, match="missing student_encoder.blocks.1.mlp.fc2.bias"):
        from_torch(broken, heads=HEADS)
    training = sd | {"decoder.decoder_embed.weight": np.zeros((2, 2)), "cls_head_loss.center": np.zeros((1, 4))}
    with pytest.raises(ConversionError, match="missing decoder.decoder_embed.bias; missing decoder.mask_token"):
        from_torch(training, heads=HEADS)  # an incomplete predictor is an error, listing what is missing
    _, _, left = from_torch(training, heads=HEADS, encoder_only=True)
    assert left == ["cls_head_loss.center", "decoder.decoder_embed.weight"]
    wrong = sd | {"student_encoder.blocks.0.attn.proj.weight": np.zeros((DIM, DIM + 1), np.float32)}
    with pytest.raises(ConversionError, match="shapes do not fit"):
        from_torch(wrong, heads=HEADS)


def test_cli_both_ways_and_a_training_checkpoint(tmp_path):
    """Training workdir -> published layout (.safetensors without torch) -> encoder directory: same embeddings."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")

    def run(*args):
        r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    run("matpac_jax.main", "--config=configs/pp.py:smoke", f"--workdir={tmp_path / 'run'}", "--config.total_steps=3",
        "--config.probe.enabled=False")  # fmt: skip
    out = run("matpac_jax.convert", f"--checkpoint={tmp_path / 'run'}", f"--to-torch={tmp_path / 'pp.pt'}")
    written = out.strip().split()[-1]
    assert written.endswith(".pt" if _has_torch() else ".safetensors") and os.path.exists(written)
    run("matpac_jax.convert", f"--torch-checkpoint={written}", f"--output={tmp_path / 'enc'}", "--heads=4")
    wave = (0.1 * np.random.default_rng(6).standard_normal(40_000)).astype(np.float32)
    a, b = load_encoder(str(tmp_path / "run")), load_encoder(str(tmp_path / "enc"))
    pa, pb = flatten(jax.device_get(a.params)), flatten(jax.device_get(b.params))
    assert sorted(pa) == sorted(pb) and any(k.startswith("teacher/") for k in pa)  # the full training layout
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k])
    ea, eb = a.embed(wave, layers=True), b.embed(wave, layers=True)
    for k in ea:
        np.testing.assert_array_equal(ea[k], eb[k])


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _training_state_dict(mcl_heads: int):
    """A full training checkpoint in the published layout, made from a fresh smoke model of ours."""
    from helpers import load_config

    from matpac_jax.convert import to_torch
    from matpac_jax.inference import EncoderSpec
    from matpac_jax.matpac.model import MatpacModel

    config = load_config()
    config.model.mcl_heads = mcl_heads
    model = MatpacModel.from_config(config)
    student, teacher = jax.device_get(model.init(jax.random.key(3)))
    center = np.random.default_rng(0).normal(size=config.model.cls_head.prototypes).astype(np.float32)
    params = {**student, "teacher": teacher, "center": center}
    spec = EncoderSpec.from_config(config)
    return spec, params, to_torch(spec, params), model


@pytest.mark.parametrize("mcl_heads", [5, 1])
def test_full_training_checkpoint_round_trip(mcl_heads):
    spec, params, sd, _ = _training_state_dict(mcl_heads)
    want = {"decoder.decoder_embed.weight", "decoder.mask_token", "decoder.decoder_pos_embed",
            "decoder.decoder_blocks.0.attn.qkv.weight", "decoder.decoder_norm.weight",
            "cls_student_head.mlp.4.weight", "cls_student_head.last_layer.weight_g",
            "cls_student_head.last_layer.weight_v", "cls_head_loss.center", "_ema.blocks.1.mlp.fc2.bias",
            "_ema.norm.weight", "_cls_head_ema.last_layer.weight_v"}  # fmt: skip
    assert want <= set(sd)
    if mcl_heads == 5:
        assert sd["mcl_heads.mcl_heads.4.weight"].shape == (64, 32) and "decoder.decoder_pred.weight" not in sd
    else:
        assert "decoder.decoder_pred.weight" in sd and not any(k.startswith("mcl_heads.") for k in sd)
    assert sd["cls_student_head.last_layer.weight_g"].shape == (64, 1) and sd["cls_head_loss.center"].shape == (1, 64)
    spec2, back, left = from_torch(sd, heads=spec.heads)
    assert left == [] and spec2 == spec
    got, exp = flatten(back), flatten(params)
    assert sorted(got) == sorted(exp)
    for k in exp:
        np.testing.assert_array_equal(got[k], exp[k])
    _, only, left = from_torch(sd, heads=spec.heads, encoder_only=True)
    assert sorted(only) == ["encoder", "tokenizer"] and len(left) == len(sd) - len(to_torch(spec, only))


def test_converted_cls_head_computes_the_published_head():
    """DINO head in the published layout (float64): Linear-GELU-Linear-GELU-Linear, L2-normalise, weight-normalised
    last layer g·v/|v|; ours with the converted parameters gives the same logits."""
    spec, params, sd, model = _training_state_dict(5)
    _, back, _ = from_torch(sd, heads=spec.heads)
    x = np.random.default_rng(1).normal(size=(3, 64))
    h = x
    for i in (0, 2, 4):
        h = h @ sd[f"cls_student_head.mlp.{i}.weight"].T.astype(np.float64) + sd[f"cls_student_head.mlp.{i}.bias"]
        h = ref.gelu_exact(h) if i < 4 else h
    h = h / np.linalg.norm(h, axis=-1, keepdims=True)
    v = sd["cls_student_head.last_layer.weight_v"].astype(np.float64)
    w = sd["cls_student_head.last_layer.weight_g"] * v / np.linalg.norm(v, axis=1, keepdims=True)
    want = h @ w.T
    got = np.asarray(model.cls_head.apply({"params": back["cls_head"]}, x.astype(np.float32)))
    assert _rel(got, want) <= 1e-5


@pytest.mark.skipif(not _has_torch(), reason="torch not installed (optional extra)")
def test_pt_files_keep_the_published_nesting(tmp_path):
    """.pt written like a published training checkpoint (EMA teachers as nested dicts) reads back key for key."""
    import torch

    from matpac_jax.state_dict_io import read_state_dict, write_state_dict

    spec, _, sd, _ = _training_state_dict(5)
    path = write_state_dict(str(tmp_path / "full.pt"), sd)
    raw = torch.load(path, weights_only=False)
    assert isinstance(raw["_ema"], dict) and "blocks.0.norm1.weight" in raw["_ema"]
    torch.save({"model": raw, "cfg": {"note": "fairseq wrapper"}}, tmp_path / "fairseq.pt")
    for p in (path, str(tmp_path / "fairseq.pt")):
        back = read_state_dict(p)
        assert sorted(back) == sorted(sd)
        for k in sd:
            np.testing.assert_array_equal(back[k], sd[k])


# --- Position tables and front-end buffers a published state dict can hold (matpac_jax.published_layout).


def _with_positions(pos_rows: np.ndarray, cls_row=None, seed=9, grid_t=12) -> dict:
    sd = published_state_dict(seed=seed, grid_t=grid_t)
    sd["pos_embed"] = np.concatenate([np.zeros((1, DIM)) if cls_row is None else cls_row[None], pos_rows])[None]
    sd["pos_embed"] = sd["pos_embed"].astype(np.float32)
    return sd


def _embeds_as_published(sd: dict, enc: Encoder) -> None:
    """The float64 SPEC §5 implementation reads sd's pos_embed as the published forward does (CLS row included)."""
    wave = (0.1 * np.random.default_rng(1).standard_normal(48_000)).astype(np.float32)  # 298 frames: a cut last chunk
    got = enc.embed(wave, 16_000, layers=True)["layers"][0]
    assert _rel(got, numpy_layers(sd, reference_log_mel(wave, enc.spec.frontend))) <= 1e-5


def test_a_table_fine_tuned_the_m2d_way_is_kept_as_weights_and_embeds_as_published(tmp_path):
    from test_positions import torch_formula_bicubic

    grid = np.moveaxis(ref.sincos_pos_embed_2d(DIM, 5, 8)[1:].reshape(5, 8, DIM), -1, 0)  # the 5x8 pretrained table
    rows = np.moveaxis(torch_formula_bicubic(grid, (5, 12), align_corners=False), 0, -1).reshape(60, DIM)
    sd, notes = _with_positions(rows), []
    spec, params, _ = from_torch(sd, heads=HEADS, notes=notes)
    how = "the 5x8 sin-cos table resampled bicubically to 5x12 as m2d does"
    assert notes == [f"pos_embed: {how}, kept as weights (tokenizer/pos_embed)"]
    np.testing.assert_array_equal(params["tokenizer"]["pos_embed"], sd["pos_embed"][0, 1:])
    enc = load_encoder(Encoder(spec, params).save(str(tmp_path / "m")))
    _embeds_as_published(sd, enc)
    back = to_torch(enc.spec, jax.device_get(enc.params))
    np.testing.assert_array_equal(back["pos_embed"], sd["pos_embed"])
    notes = []
    _, plain, _ = from_torch(published_state_dict(seed=9, grid_t=12), heads=HEADS, notes=notes)
    assert "pos_embed" not in plain["tokenizer"]
    assert notes == ["pos_embed: the 2-D sin-cos table of the 5x12 grid (recomputed)"]


def test_a_learned_table_and_cls_row_are_kept_and_convert_back_to_the_same_model():
    rng = np.random.default_rng(4)
    rows, cls_row = rng.normal(0, 0.5, (5 * GRID_T, DIM)), rng.normal(0, 0.5, DIM)
    sd, notes = _with_positions(rows, cls_row, grid_t=GRID_T), []
    spec, params, _ = from_torch(sd, heads=HEADS, notes=notes)
    assert notes[0].startswith("pos_embed: neither sin-cos nor a resampled sin-cos table (")
    cls_note = "its CLS row is added to cls_token (as the published forward does)"
    assert notes[0].endswith(f"kept as weights (tokenizer/pos_embed); {cls_note}")
    enc = Encoder(spec, params)
    _embeds_as_published(sd, enc)
    back = to_torch(spec, jax.device_get(enc.params))
    assert not back["pos_embed"][0, 0].any()  # the CLS row now lives in cls_token: the same sum
    np.testing.assert_allclose(back["cls_token"] + back["pos_embed"][:, :1], sd["cls_token"] + sd["pos_embed"][:, :1])
    _embeds_as_published(back, Encoder(*from_torch(back, heads=HEADS)[:2]))


def torchaudio_buffers(f_min: float = 50.0) -> dict[str, np.ndarray]:
    """The two buffers of the published front-end, ``torchaudio.transforms.MelSpectrogram(16000, n_fft=400,
    win_length=400, hop_length=160, f_min, f_max=8000, n_mels=80, norm='slaney', mel_scale='slaney')`` (aurianworld/
    matpac inference_matpac/matpac/preprocess.py:94-111), built in float32 as torchaudio does: ``torch.hann_window``
    (periodic) and ``torchaudio.functional.melscale_fbanks`` (_hz_to_mel in Python floats, linspace of mels,
    _mel_to_hz, _create_triangular_filterbank, Slaney area normalisation)."""
    f32 = np.float32
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400, dtype=f32) / f32(400))).astype(f32)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    to_mel = lambda f: f / f_sp if f < min_log_hz else min_log_hz / f_sp + np.log(f / min_log_hz) / logstep  # noqa: E731
    mels = np.linspace(to_mel(f_min), to_mel(8000.0), 82, dtype=f32)
    hz = (f32(f_sp) * mels).astype(f32)
    log = mels >= f32(min_log_hz / f_sp)
    hz[log] = f32(min_log_hz) * np.exp(f32(logstep) * (mels[log] - f32(min_log_hz / f_sp)))
    freqs = np.linspace(0, 8000, 201, dtype=f32)
    diff, slopes = hz[1:] - hz[:-1], hz[None, :] - freqs[:, None]
    fb = np.maximum(f32(0), np.minimum(-slopes[:, :-2] / diff[:-1], slopes[:, 2:] / diff[1:]))
    fb = (fb * (f32(2) / (hz[2:] - hz[:-2]))[None]).astype(f32)
    return {"log_mel.MelSpectrogram.spectrogram.window": window, "log_mel.MelSpectrogram.mel_scale.fb": fb}


def test_the_published_full_state_dict_front_end_buffers_are_checked_and_left_out(published, tmp_path, capsys):
    from matpac_jax import convert

    sd, enc = published
    notes = []
    spec, params, _ = from_torch(sd | torchaudio_buffers(), heads=HEADS, notes=notes)
    buffers = list(torchaudio_buffers())
    assert notes[1] == f"left out the torchaudio front-end buffers {buffers}: equal to this front-end's"
    for k, v in flatten(params).items():
        np.testing.assert_array_equal(v, flatten(jax.device_get(enc.params))[k])
    with pytest.raises(
        ConversionError, match=r"mel_scale.fb differs from this front-end's by .* of its peak: the file"
    ):
        from_torch(sd | torchaudio_buffers(f_min=0.0), heads=HEADS)
    short = {"log_mel.MelSpectrogram.spectrogram.window": np.hanning(800).astype(np.float32)}
    with pytest.raises(ConversionError, match=r"window has shape \[800\], this front-end's is \[400\]"):
        from_torch(sd | short, heads=HEADS)
    with pytest.raises(ConversionError, match=r"unknown keys \['log_mel.MelSpectrogram.spectrogram.extra'\]"):
        from_torch(sd | torchaudio_buffers() | {"log_mel.MelSpectrogram.spectrogram.extra": np.zeros(1)}, heads=HEADS)

    path = str(tmp_path / "full.safetensors")  # the CLI prints the account
    write_safetensors(path, sd | torchaudio_buffers())
    assert convert.main([f"--torch-checkpoint={path}", f"--output={tmp_path / 'out'}", f"--heads={HEADS}"]) == 0
    out = capsys.readouterr().out
    assert "pos_embed: the 2-D sin-cos table of the 5x8 grid (recomputed)" in out
    assert "left out the torchaudio front-end buffers" in out
