"""Published student weights into our students (distill.published): EfficientAT's mn layout (``mn10_im.pt``) and
S-SONDO's released Lightning checkpoints, with strict key accounting; the converter CLI; distillation from them.

Layouts checked against the published code:
- EfficientAT (fschmid56/EfficientAT a425fdc) models/mn/model.py:169 ``features``, :186-194 ``classifier.{2,5}``,
  block_types.py:120-175 ``block.{j}`` and :21-24 ``conc_se_layers.0.fc{1,2}`` (see tests/mn_reference.py, whose
  keys, shapes and float64 forward were checked once against that model.py run in PyTorch 2.13: identical key set and
  shapes at widths 0.1 / 0.4 / 1.0, outputs within 1e-14 relative, 2,971,664 feature parameters at width 1.0).
- S-SONDO (MedAliAdlouni/ssondo f89abf2) training_ssondo/utils/student_models/MobileNetV3/model.py:325-331 drops
  ``classifier*`` and loads mn10_im.pt strictly; knowledge_distillation_training/system.py:57 (``self.student_model``)
  and :293 (``checkpoint["training_config"]``); utils/student_models/model_utils.py:188-193 the head ``mlp`` =
  Linear, Hardswish, Dropout, Linear; inference_ssondo/ssondo/model.py:474-478 strips ``student_model.`` from
  ``ckpt["state_dict"]`` and loads strictly.
"""

import json

import jax
import ml_collections as mlc
import mn_reference as ref
import numpy as np
import pytest

from matpac_jax import convert, state_dict_io
from matpac_jax.config_lib import ConfigError
from matpac_jax.distill import published
from matpac_jax.distill.published import (
    StateDictMismatch,
    load_student_weights,
    mobilenet_from_torch_state_dict,
    mobilenet_key_map,
)
from matpac_jax.models.students import MobileNetV3, count_params


def _student(width: float, **kw) -> mlc.ConfigDict:
    return mlc.ConfigDict(dict(arch="mobilenet", width=width, head_hidden=1280, dropout=0.2, init_from="") | kw)


def _backbone(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith("classifier.")}


def _ssondo_checkpoint(backbone: dict, hidden: int, out: int, seed: int = 3, model_name: str = "mn10_im") -> dict:
    """What ``read_state_dict`` makes of a released S-SONDO Lightning checkpoint: ``state_dict.student_model.*``,
    ``training_config.*`` (the recipe's front-end) and Lightning's metadata, flattened."""
    rng = np.random.default_rng(seed)
    d = next(v.shape[0] for k, v in backbone.items() if k.startswith("features.16.0."))
    sd = {f"state_dict.student_model.model.{k}": v for k, v in backbone.items()}
    head = {"mlp.0.weight": (hidden, d), "mlp.0.bias": (hidden,), "mlp.3.weight": (out, hidden), "mlp.3.bias": (out,)}
    for k, shape in head.items():
        sd[f"state_dict.student_model.classification_head.{k}"] = rng.normal(0, 0.05, shape).astype(np.float32)
    config = {"student_model.model_name": model_name, "student_model.sr": 32000, "student_model.width_mult": 1.0,
              "preprocess.logmelspec.win_len": 0.032, "preprocess.logmelspec.hop_len": 0.016,
              "preprocess.logmelspec.n_mels": 128, "preprocess.logmelspec.f_min": 50,
              "preprocess.logmelspec.f_max": 16000, "preprocess.slice_audio.win_len": 10}  # fmt: skip
    sd |= {f"training_config.{k}": np.asarray(v) for k, v in config.items()}
    sd |= {"epoch": np.asarray(199), "global_step": np.asarray(166_000), "optimizer_states": np.asarray([{}], object)}
    return sd


def _tree_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_efficientat_mn_loads_and_matches_the_float64_reference(tmp_path):
    width = 0.4  # every layer kind of mn10 (expansion, SE, residual, both activations) at a small size
    sd = ref.efficientat_state_dict(width, seed=1)
    path = str(tmp_path / "mn04_im.safetensors")
    state_dict_io.write_safetensors(path, sd)
    variables = load_student_weights(path, _student(width))
    assert set(variables["params"]) == {"backbone"}  # no projection head in EfficientAT's file
    mel = np.random.default_rng(2).normal(size=(2, 32, 40)).astype(np.float32)
    backbone = {k: v["backbone"] for k, v in variables.items()}
    ours = np.asarray(jax.jit(MobileNetV3(width).apply)(backbone, mel), np.float64)
    want = ref.forward(sd, mel, width)
    scale = np.abs(want).max()
    assert ours.shape == want.shape == (2, 6 * ref.divisible(160 * width))
    assert np.abs(ours - want).max() < 1e-5 * scale
    # the gate matters: EfficientAT's sigmoid, not torchvision's hard-sigmoid, is what matches
    assert np.abs(ref.forward(sd, mel, width, gate=ref.hard_sigmoid) - want).max() > 1e-2 * scale


@pytest.mark.parametrize("width", [0.1, 0.4, 1.0])
def test_key_map_is_efficientat_key_for_key_and_mn10_has_the_published_size(width):
    sd = _backbone(ref.efficientat_state_dict(width))
    tracked = {k for k in sd if k.endswith("num_batches_tracked")}
    assert set(mobilenet_key_map(width)) == set(sd) - tracked
    if width == 1.0:
        variables = mobilenet_from_torch_state_dict(sd, width)
        assert count_params(variables["params"]) == 2_971_664  # EfficientAT mn10 features (checked in PyTorch)
        # torch [out, in, kh, kw] -> flax [kh, kw, in, out]; Linear [out, in] -> 1×1 conv [1, 1, in, out]
        np.testing.assert_array_equal(
            variables["params"]["block_3"]["depthwise"]["conv"]["kernel"][:, :, 0, 5],
            sd["features.4.block.1.0.weight"][5, 0],
        )
        np.testing.assert_array_equal(
            variables["params"]["block_3"]["se"]["fc1"]["kernel"][0, 0],
            sd["features.4.block.2.conc_se_layers.0.fc1.weight"].T,
        )
        np.testing.assert_array_equal(variables["batch_stats"]["last"]["bn"]["var"], sd["features.16.1.running_var"])


def test_unknown_missing_and_misshapen_keys_are_named(tmp_path):
    sd = _backbone(ref.efficientat_state_dict(0.1))
    extra = dict(sd, **{"features.3.block.9.weight": np.zeros(3, np.float32)})
    with pytest.raises(StateDictMismatch, match=r"unknown keys \['features.3.block.9.weight'\]") as e:
        mobilenet_from_torch_state_dict(extra, 0.1)
    assert e.value.unknown == ["features.3.block.9.weight"] and e.value.missing == []
    gone = "features.5.block.2.conc_se_layers.0.fc2.bias"
    with pytest.raises(StateDictMismatch, match="missing keys") as e:
        mobilenet_from_torch_state_dict({k: v for k, v in sd.items() if k != gone}, 0.1)
    assert e.value.missing == [gone] and e.value.unknown == []
    rgb = dict(sd, **{"features.0.0.weight": np.zeros((8, 3, 3, 3), np.float32)})  # a 3-channel stem
    with pytest.raises(
        StateDictMismatch, match=r"features.0.0.weight \(8, 3, 3, 3\) \(the student needs \(3, 3, 1, 8\)"
    ):
        mobilenet_from_torch_state_dict(rgb, 0.1)
    path = str(tmp_path / "mn01.safetensors")
    state_dict_io.write_safetensors(path, sd)
    with pytest.raises(
        StateDictMismatch, match="mn01.safetensors .plain layout. as EfficientAT mn backbone .width 0.4"
    ):
        load_student_weights(path, _student(0.4))  # another width: its keys and shapes do not match


def test_ssondo_release_layout_loads_backbone_and_head(monkeypatch):
    backbone = _backbone(ref.efficientat_state_dict(0.1, seed=4))
    ckpt = _ssondo_checkpoint(backbone, hidden=16, out=24)
    files = {"release.ckpt": ckpt, "plain.pt": backbone}
    files["state_dict.pt"] = {k[len("state_dict.") :]: v for k, v in ckpt.items() if k.startswith("state_dict.")}
    files["wrapper.pt"] = {k[len("student_model.") :]: v for k, v in files["state_dict.pt"].items()}
    monkeypatch.setattr(convert, "read_state_dict", lambda path: dict(files[path]))
    want = mobilenet_from_torch_state_dict(backbone, 0.1)
    for name in ("release.ckpt", "state_dict.pt", "wrapper.pt"):  # with and without the Lightning / wrapper prefixes
        v = load_student_weights(name, _student(0.1))
        _tree_equal({k: v[k]["backbone"] for k in v}, want)
        head = v["params"]["head"]
        np.testing.assert_array_equal(
            head["fc1"]["kernel"], ckpt["state_dict.student_model.classification_head.mlp.0.weight"].T
        )
        np.testing.assert_array_equal(
            head["fc2"]["bias"], ckpt["state_dict.student_model.classification_head.mlp.3.bias"]
        )
    assert "head" not in load_student_weights("plain.pt", _student(0.1))["params"]

    files["extra.ckpt"] = dict(ckpt, **{"state_dict.student_model.teacher_proj.weight": np.zeros(2, np.float32)})
    with pytest.raises(StateDictMismatch, match=r"unknown keys \['student_model.teacher_proj.weight'\]"):
        load_student_weights("extra.ckpt", _student(0.1))
    files["nohead.ckpt"] = {k: v for k, v in ckpt.items() if not k.endswith("mlp.3.bias")}
    with pytest.raises(
        StateDictMismatch, match=r"nohead.ckpt: .*missing keys \['student_model.classification_head.mlp.3.bias'\]"
    ):
        load_student_weights("nohead.ckpt", _student(0.1))
    files["inner.ckpt"] = dict(ckpt, **{"state_dict.student_model.model.classifier.2.bias": np.zeros(2, np.float32)})
    with pytest.raises(
        StateDictMismatch, match=r"ssondo layout, prefixes removed.*unknown keys \['classifier.2.bias'\]"
    ):
        load_student_weights("inner.ckpt", _student(0.1))  # the released backbone has no classifier: strict
    files["eres.ckpt"] = _ssondo_checkpoint(backbone, 16, 24, model_name="ERes2Net")
    with pytest.raises(ValueError, match="holds an S-SONDO 'ERes2Net' student .eres2net., not mobilenet"):
        load_student_weights("eres.ckpt", _student(0.1))


@pytest.mark.parametrize("arch", ["eres2net", "dymn"])
def test_other_archs_dispatch_to_their_modules_with_strict_keys(arch, monkeypatch):
    monkeypatch.setattr(convert, "read_state_dict", lambda p: {"student_model.model.bogus.weight": np.zeros(2)} | {
        f"student_model.classification_head.{k}": np.zeros(2) for k in published.HEAD_KEYS})  # fmt: skip
    student = published.student_config_for({"dymn": "dymn10"}.get(arch, arch)).student
    with pytest.raises(StateDictMismatch, match=r"release.ckpt \(ssondo layout, prefixes removed\) as ") as e:
        load_student_weights("release.ckpt", student)
    assert e.value.unknown == ["bogus.weight"] and len(e.value.missing) > 50


def test_converter_cli_writes_a_student_directory(tmp_path, monkeypatch, capsys):
    from matpac_jax.models.student import Student
    from matpac_jax.saved_model import MODEL_FILE

    sd = ref.efficientat_state_dict(1.0, seed=5)
    path = str(tmp_path / "mn10_im.safetensors")
    state_dict_io.write_safetensors(path, sd)
    out = tmp_path / "students" / "mn10_im"
    assert published.main([f"--input={path}", "--arch=mn10", f"--output={out}"]) == 0
    assert "2,971,664 parameters; dropped 4 classifier keys" in capsys.readouterr().out
    student = Student.load(str(out))
    _tree_equal(jax.device_get(student.variables), mobilenet_from_torch_state_dict(_backbone(sd), 1.0))
    recipe = published.student_config_for("mn10")
    meta = json.loads((out / MODEL_FILE).read_text())["spec"]
    assert meta["audio"] == recipe.audio.to_dict() and meta["student"]["arch"] == "mobilenet"

    # a released checkpoint: the front-end comes from its training_config (here the recipe's: same values)
    ckpt = _ssondo_checkpoint(_backbone(sd), hidden=1280, out=3840)
    ckpt["training_config.preprocess.logmelspec.hop_len"] = np.asarray(0.02)
    monkeypatch.setattr(convert, "read_state_dict", lambda p: dict(ckpt))
    assert published.main(["--input=release.ckpt", "--arch=mn10", f"--output={tmp_path / 'rel'}"]) == 0
    audio = json.loads((tmp_path / "rel" / MODEL_FILE).read_text())["spec"]["audio"]
    assert audio == recipe.audio.to_dict() | {"hop_length": 640}

    ckpt["state_dict.student_model.model.features.2.block.9.weight"] = np.zeros(1, np.float32)
    assert published.main(["--input=release.ckpt", "--arch=mn10", f"--output={tmp_path / 'bad'}"]) == 2
    assert "unknown keys ['features.2.block.9.weight']" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):
        published.main(["--input=x.pt", "--arch=mn20", "--output=y"])


@pytest.mark.parametrize("sr", [float("inf"), "32k", 0, True])
def test_a_training_config_that_cannot_describe_a_front_end_exits_2_naming_the_key(sr, tmp_path, monkeypatch, capsys):
    ckpt = _ssondo_checkpoint(_backbone(ref.efficientat_state_dict(1.0, seed=5)), hidden=1280, out=3840)
    ckpt["training_config.student_model.sr"] = np.asarray(sr)
    monkeypatch.setattr(convert, "read_state_dict", lambda p: dict(ckpt))
    assert published.main(["--input=release.ckpt", "--arch=mn10", f"--output={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training_config student_model.sr=" in err and "finite number > 0" in err
    assert not (tmp_path / "out").exists()


def test_the_converter_never_replaces_a_model_of_another_kind(tmp_path, capsys):
    """--output naming an existing model directory of another kind is refused before anything is read or written
    (a student over an encoder, an encoder over a student)."""
    from matpac_jax.saved_model import MODEL_FILE, write_model_dir

    vit = tmp_path / "encoder"
    write_model_dir(str(vit), "vit", {"dim": 8}, {"w": np.zeros(2, np.float32)})
    before = {p.name: p.read_bytes() for p in vit.iterdir()}
    assert published.main(["--input=missing.pt", "--arch=mn10", f"--output={vit}"]) == 2
    assert "already holds a 'vit' model directory" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in vit.iterdir()} == before and (vit / MODEL_FILE).is_file()
    student = tmp_path / "student"  # and the reverse: an encoder converted over a student
    write_model_dir(str(student), "student", {"student": {}}, {"w": np.zeros(2, np.float32)})
    assert convert.main(["--torch-checkpoint=missing.pt", f"--output={student}"]) == 2
    assert "already holds a 'student' model directory" in capsys.readouterr().err


def test_init_from_starts_distillation_from_published_weights(tmp_path, monkeypatch, capsys):
    from matpac_jax import parallel
    from matpac_jax.config_lib import load_config_file
    from matpac_jax.distill.task import DistillTask
    from matpac_jax.train.program import compile_program
    from matpac_jax.train.task import TaskInput

    c = load_config_file(published._RECIPE, "ssondo.py", "smoke")  # MobileNetV3 of width 0.1, head 64
    c.distill.targets = "raw"
    assert c.student.init_from == "none"  # the smoke MobileNetV3 starts from scratch on purpose
    backbone = _backbone(ref.efficientat_state_dict(0.1, seed=6))
    files = {"release.ckpt": _ssondo_checkpoint(backbone, hidden=64, out=24),
             "other_head.ckpt": _ssondo_checkpoint(backbone, hidden=32, out=24)}  # fmt: skip

    def read(path):
        if path not in files:
            raise convert.ConversionError(f"{path}: no such file")
        return dict(files[path])

    monkeypatch.setattr(convert, "read_state_dict", read)
    mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])

    c.student.init_from = "release.ckpt"
    task = DistillTask(c, str(tmp_path))
    data = TaskInput(None, {"target_dim": 24})  # the teacher's dimension, known once the input is opened
    init_fn, _, abstract = compile_program(task.build(data), mesh, c)
    state = jax.device_get(init_fn(jax.random.key(0)))
    want = load_student_weights("release.ckpt", c.student)
    _tree_equal(state.params, want["params"])  # backbone and projection head
    _tree_equal(state.batch_stats, want["batch_stats"])

    # a head of other shapes (another teacher or hidden size) is left to its initialisation; the backbone loads
    c.student.init_from = "other_head.ckpt"
    weights = published.initialise_from(c.student, abstract)
    _tree_equal(weights["params"]["backbone"], want["params"]["backbone"])
    assert "head" not in weights["params"]
    assert "its projection head" in capsys.readouterr().out

    for path, width, error in (("missing.pt", 0.1, "missing.pt: no such file"),
                               ("release.ckpt", 0.25, r"EfficientAT mn backbone \(width 0.25\)")):  # fmt: skip
        c.student.init_from, c.student.width = path, width
        with pytest.raises(ConfigError, match=f"config.student.init_from={path}: .*{error}"):
            published.initialise_from(c.student, abstract)


def test_lightning_checkpoint_saved_by_torch_reads_safely(tmp_path):
    torch = pytest.importorskip("torch")
    backbone = _backbone(ref.efficientat_state_dict(0.1, seed=7))
    flat = _ssondo_checkpoint(backbone, hidden=16, out=24)
    state_dict = {
        k[len("state_dict.") :]: torch.from_numpy(np.array(v)) for k, v in flat.items() if k.startswith("state_dict.")
    }
    logmel = {"win_len": 0.032, "hop_len": 0.016, "n_mels": 128, "f_min": 50, "f_max": 16000}
    training_config = {
        "student_model": {"model_name": "mn10_im", "sr": 32000, "strides": (2, 2, 2, 2)},
        "preprocess": {"logmelspec": logmel, "slice_audio": {"win_len": 10, "step_size": 10}},
    }
    path = str(tmp_path / "release.ckpt")
    lightning = {  # what pytorch_lightning's trainer adds around the state dict (optimizer, scheduler, callbacks)
        "epoch": 3, "global_step": 10, "pytorch-lightning_version": "2.4.0",
        "optimizer_states": [{"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(3)}},
                              "param_groups": [{"lr": 8e-4, "betas": (0.9, 0.999), "params": [0]}]}],
        "lr_schedulers": [{"base_lrs": [8e-4], "last_epoch": 3, "_last_lr": [8e-4]}],
        "callbacks": {"ModelCheckpoint{'monitor': 'val/kd_loss'}": {"best_model_score": torch.tensor(0.1),
                                                                    "dirpath": "/runs/x"}},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4}}}},
    }  # fmt: skip
    torch.save(lightning | {"state_dict": state_dict, "training_config": training_config}, path)
    v = load_student_weights(path, _student(0.1))
    _tree_equal({k: v[k]["backbone"] for k in v}, mobilenet_from_torch_state_dict(backbone, 0.1))
    audio = published.frontend_of(published.split_published(convert.read_state_dict(path))["training_config"])
    assert (audio["win_length"], audio["hop_length"], audio["f_max"], audio["seconds"]) == (1024, 512, 16000.0, 10.0)
