"""AudioSet's class order end to end: ``prepare`` stores each mid's position in ``class_labels_indices.csv`` sorted by
mid (the published head's unit, aurianworld/matpac inference_matpac/matpac/model.py:92-94), fine-tuning trains that
unit, and ``embed --tag --labels`` reads it back under the clip's class name; shards of an older ``prepare`` (AudioSet
labels as the file's ``index`` column, no ``label_order`` in the manifest) are refused, naming the fix."""

import json

import numpy as np
import pytest
import soundfile as sf
from helpers import load_config

import matpac_jax.embed as embed
from matpac_jax.config_lib import ConfigError
from matpac_jax.data.audioset_classes import read_audioset_classes
from matpac_jax.data.prepare import prepare
from matpac_jax.data.records import decode_record, read_shard, shard_name
from matpac_jax.tasks import make_task, train_and_evaluate

# (index, mid, display_name) in a class_labels_indices.csv's own order. As in AudioSet, index 0 is Speech and the
# smallest mid is Firecracker's, so index order and mid order agree nowhere that matters here.
CLASSES = [
    (0, "/m/09x0r", "Speech"), (1, "/m/04rlf", "Music"), (2, "/m/0bt9lr", "Dog"), (3, "/m/01yrx", "Cat"),
    (4, "/m/07yv9", "Vehicle"), (5, "/m/0g6b5", "Fireworks"), (6, "/g/122z_qxw", "Firecracker"),
    (7, "/t/dd00088", "Gush"),
]  # fmt: skip
UNIT = {"Firecracker": 0, "Cat": 1, "Music": 2, "Vehicle": 3, "Speech": 4, "Dog": 5, "Fireworks": 6, "Gush": 7}
MID = {name: mid for _, mid, name in CLASSES}


def _labels_csv(path) -> str:
    path.write_text("index,mid,display_name\n" + "".join(f'{i},{m},"{n}"\n' for i, m, n in CLASSES))
    return str(path)


def _corpus(root, clips: dict[str, list[str]], seconds: float = 2.0) -> str:
    """One WAV per YTID (noise for Speech clips, a tone otherwise) and the AudioSet segment CSV naming its classes."""
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = ["# YTID, start_seconds, end_seconds, positive_labels"]
    for ytid, names in clips.items():
        t = np.arange(int(16_000 * seconds)) / 16_000
        wave = 0.1 * rng.standard_normal(t.size) if "Speech" in names else 0.3 * np.sin(2 * np.pi * 440 * t)
        sf.write(root / f"{ytid}_0.wav", wave, 16_000)
        rows.append(f'{ytid}, 0.000, {seconds:.3f}, "{",".join(MID.get(n, n) for n in names)}"')
    (root / "segments.csv").write_text("\n".join(rows) + "\n")
    return str(root / "segments.csv")


def test_the_head_order_is_the_mid_order_of_the_labels_file(tmp_path):
    classes = read_audioset_classes(_labels_csv(tmp_path / "labels.csv"))
    assert list(classes.names) == sorted(UNIT, key=UNIT.get)
    assert classes.unit[MID["Speech"]] == UNIT["Speech"] == 4 and classes.names[0] == "Firecracker"
    assert classes.ontology[UNIT["Speech"]] == 0  # the file's index column, kept for what it is
    (tmp_path / "twice.csv").write_text("index,mid,display_name\n0,/m/a,A\n1,/m/a,B\n")
    with pytest.raises(ValueError, match=r"twice.csv, line 3: mid '/m/a' appears twice"):
        read_audioset_classes(str(tmp_path / "twice.csv"))


def test_prepare_stores_the_mid_sorted_position_of_each_label(tmp_path):
    clips = {"aaaaaaaaaaa": ["Speech"], "bbbbbbbbbbb": ["Music", "Dog"], "ccccccccccc": ["Gush"],
             "ddddddddddd": ["/m/unknown"]}  # fmt: skip
    segments = _corpus(tmp_path / "audio", clips)
    manifest = prepare(segments, str(tmp_path / "out"), 1, labels_csv=_labels_csv(tmp_path / "labels.csv"))
    stored = {r.key: r.labels for r in map(decode_record, read_shard(shard_name(tmp_path / "out", 0, 1)))}
    assert stored == {
        "aaaaaaaaaaa_0": (UNIT["Speech"],),  # 4, not Speech's index 0 (unit 0 is Firecracker)
        "bbbbbbbbbbb_0": (UNIT["Music"], UNIT["Dog"]),
        "ccccccccccc_0": (UNIT["Gush"],),
    }
    assert manifest["label_order"] == "mid"
    assert [s["reason"] for s in manifest["skipped"]] == ["unknown label mid /m/unknown"]


def _finetune_config(data, labels_classes: int):
    """The smoke fine-tuning on prepared records: head-only at a high rate, so 6 steps teach the head the labels."""
    c = load_config("finetune_as.py", "smoke")
    c.data.source, c.data.train, c.data.workers, c.finetune.eval = "records", str(data), 0, str(data)
    c.finetune.num_classes, c.finetune.freeze_encoder, c.optim.lr = labels_classes, True, 0.05
    c.mesh = {"data": 1}
    return c


def test_a_clip_labelled_speech_trains_the_unit_tag_names_speech(tmp_path, capsys):
    clips = {f"speech{i:05d}": ["Speech"] for i in range(6)} | {f"music{i:06d}": ["Music"] for i in range(2)}
    segments = _corpus(tmp_path / "audio", clips)
    labels = _labels_csv(tmp_path / "labels.csv")
    prepare(segments, str(tmp_path / "data"), 2, labels_csv=labels)
    c = _finetune_config(tmp_path / "data", len(CLASSES))
    batch = next(iter(make_task(c, str(tmp_path / "probe")).make_input().source))
    assert set(np.flatnonzero(batch["targets"].sum(axis=0))) <= {UNIT["Speech"], UNIT["Music"]}

    train_and_evaluate(c, str(tmp_path / "run"))
    capsys.readouterr()
    wav = tmp_path / "audio" / "speech00000_0.wav"
    out = tmp_path / "tags.npz"
    argv = [f"--checkpoint={tmp_path / 'run' / 'model'}", f"--input={wav}", f"--output={out}", "--tag",
            f"--labels={labels}", "--top-k=1"]  # fmt: skip
    assert embed.main(argv) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("speech00000_0.wav: Speech (")
    assert int(np.argmax(np.load(out)["tags"][0])) == UNIT["Speech"]


def test_finetuning_refuses_shards_of_an_older_prepare_naming_the_fix(tmp_path):
    segments = _corpus(tmp_path / "audio", {"aaaaaaaaaaa": ["Speech"], "bbbbbbbbbbb": ["Music"]})
    labels = _labels_csv(tmp_path / "labels.csv")
    prepare(segments, str(tmp_path / "data"), 1, labels_csv=labels)
    manifest_path = tmp_path / "data" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["label_order"]  # what prepare wrote before the order was recorded (labels: the index column)
    manifest_path.write_text(json.dumps(manifest))
    c = _finetune_config(tmp_path / "data", len(CLASSES))
    for train in (str(tmp_path / "data"), f"{tmp_path / 'data'}/*.arrayrecord"):  # the folder, or a glob beside it
        c.data.train = train
        with pytest.raises(ConfigError, match=r"config.data.train: .*no 'label_order'.*Run the same .*prepare"):
            make_task(c, str(tmp_path / "run")).make_input()

    prepare(segments, str(tmp_path / "data"), 1, labels_csv=labels)  # the fix: the same command again
    assert json.loads(manifest_path.read_text())["label_order"] == "mid"
    assert make_task(c, str(tmp_path / "run")).make_input() is not None
    manifest = json.loads(manifest_path.read_text()) | {"label_order": "sideways"}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"config.data.train: .*label_order='sideways'"):
        make_task(c, str(tmp_path / "run")).make_input()
